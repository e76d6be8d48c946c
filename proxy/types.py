"""Values that travel through the request pipeline.

A leaf module: it imports nothing from the project, so every stage can depend on it
without depending on another stage. All values are frozen, slotted dataclasses.

Flow of one chat completion::

    Principal (auth) -> ChatCall (parse) -> RoutePlan (routing) -> ... -> UsageRecord (metering)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["PRIVATE_EXTRA", "ChatCall", "Principal", "RoutePlan", "Ticket", "Usage", "UsageRecord"]

# ``UsageRecord.extra`` keys that never go into a usage-log or ledger line: message content
# (the request log only, with ``logging.include_content``) and the budget keys a request
# charged (the reconciliation ticket only).
PRIVATE_EXTRA = frozenset({"content", "budget"})


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller, resolved from a virtual key.

    ``key_id`` is a short, non-secret fingerprint of the key's SHA-256 hash (12 hex
    characters), safe for logs and usage records. ``name`` and ``team`` come from config.
    """

    key_id: str
    name: str
    team: str | None = None
    tier: str | None = None


@dataclass(frozen=True, slots=True)
class ChatCall:
    """A validated ``POST /v1/chat/completions`` request.

    ``body`` is the parsed JSON object exactly as the client sent it (unknown fields kept,
    so OpenRouter extensions pass through); ``raw`` is the original request body bytes.
    """

    body: dict[str, Any]
    raw: bytes
    model: str
    stream: bool


@dataclass(frozen=True, slots=True)
class RoutePlan:
    """Where a call goes: the models to try upstream, in order, and why.

    ``model`` is the OpenRouter model id of the first attempt; ``fallbacks`` are the models
    the proxy tries next, in order, when an attempt fails before the stream's commit point.
    ``rule`` names the routing rule or alias that decided (``None``: the request as sent).
    ``body`` is the upstream body for ``model`` when routing changed the request, else
    ``None`` (the client's bytes go upstream unchanged). ``request`` is the upstream body
    as a dict (``None`` when unchanged), from which a fallback attempt's body is made by
    replacing ``model``. ``first_token_timeout_s`` overrides the configured
    time-to-first-token limit; ``cache_ttl_s`` enables the response cache (seconds).
    """

    model: str
    rule: str | None = None
    body: bytes | None = None
    request: dict[str, Any] | None = None
    fallbacks: tuple[str, ...] = ()
    first_token_timeout_s: float | None = None
    cache_ttl_s: float | None = None
    policy_hash: str | None = None


@dataclass(frozen=True, slots=True)
class Ticket:
    """An admitted request: what admission reserved, to settle or release afterwards.

    ``headers`` go on the response (``x-ratelimit-*``, degraded-mode markers); ``state``
    is the admission implementation's own data (keys, reserved tokens and USD).
    """

    headers: tuple[tuple[bytes, bytes], ...] = ()
    state: Any = None


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts and cost of one generation, from OpenRouter's ``usage`` object.

    Source: ``openrouter-api.md`` §2.3. Tokens are counts; ``cost_usd`` is OpenRouter's
    ``usage.cost`` in USD credits (``None`` when upstream sent no cost);
    ``web_search_requests`` is ``server_tool_use_details.web_search_requests``.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: float | None = None
    web_search_requests: int = 0


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One metered request, as written to the usage log (one JSON line each).

    Times are seconds: ``ts`` is the Unix time the request arrived, ``latency_s`` the time
    to the last byte sent, ``ttfb_s`` the time to the first upstream byte (``None`` when
    upstream was never reached). ``status`` is the HTTP status the client got. For streams,
    ``done`` says whether ``data: [DONE]`` arrived and ``cancelled`` whether the client
    hung up first; ``error_code`` holds a proxy error code, an upstream status or an
    in-band stream error code. ``extra``: anything else (``attempts``, ``estimated``,
    ``cache``, and the ``PRIVATE_EXTRA`` keys).
    """

    request_id: str
    ts: float
    key_name: str | None
    team: str | None
    requested_model: str | None
    routed_model: str | None
    rule: str | None
    model: str | None
    provider: str | None
    generation_id: str | None
    stream: bool
    status: int
    usage: Usage | None
    finish_reason: str | None
    latency_s: float
    ttfb_s: float | None
    ttft_s: float | None = None
    done: bool | None = None
    cancelled: bool = False
    error_code: str | None = None
    malformed_events: int = 0
    extra: dict[str, Any] | None = None
