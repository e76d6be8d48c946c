"""Fault injection: OpenRouter error replies and stream mutilations.

Error bodies are the files of ``data/fixtures/errors/`` (copies of the shared fixtures,
openrouter-api.md §4), compacted with key order kept; extra headers follow
``fixtures/errors/README.md``: 429 → ``X-RateLimit-Limit/Remaining/Reset`` (reset in epoch
ms), 502 → ``X-Generation-Id``, 503 → ``Retry-After: 30``.  Composed (no fixture; §4.2/§4.3):
``error-500`` (masked message, ``error_type:"server"``), ``error-524`` (``"timeout"``),
``error-529`` (``"provider_overloaded"``), and the typed context-length body of
``error-400-context`` and of a real context overflow (``context_length_error``):
the fixture's message with ``metadata.error_type:"context_length_exceeded"``.

Stream faults cut the planned event list after some data events (``cut_index``: the
``stall_after``/``cut_after`` control, else about half the deltas) and say how the response
ends (``Tail``): cleanly, by stalling until the client leaves, or by raising.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import orjson

from proxy.emulator.render import DONE, StreamPlan
from proxy.emulator.types import ERROR_FAULTS, Headers
from proxy.emulator.wire import JSON_HEADERS, error_body

__all__ = [
    "ErrorBook",
    "ErrorReply",
    "Tail",
    "context_length_error",
    "cut_index",
    "error_headers",
    "midpoint",
    "shape_stream",
]

Tail = Literal["end", "stall", "cut"]

_FILES: Final = {
    "error-400": "400_context_length.json",
    "error-401": "401.json",
    "error-402": "402.json",
    "error-403": "403_moderation.json",
    "error-404": "404_no_endpoints.json",
    "error-408": "408.json",
    "error-429": "429.json",
    "error-502": "502.json",
    "error-503": "503.json",
}
_COMPOSED: Final = {
    "error-500": error_body("Internal Server Error", 500, {"error_type": "server"}),
    "error-524": error_body("Provider timed out", 524, {"error_type": "timeout"}),
    "error-529": error_body("Provider overloaded", 529, {"error_type": "provider_overloaded"}),
}
_CONTEXT_MESSAGE: Final = (
    "This endpoint's maximum context length is {} tokens. However, you requested about {} tokens "
    '({} of text input, {} in the output). Please reduce the length of either one, or use the "middle-out" '
    "transform to compress your prompt automatically."
)
_EXTRA_HEADERS: Final[dict[int, Headers]] = {
    429: [
        (b"x-ratelimit-limit", b"50"),
        (b"x-ratelimit-remaining", b"0"),
        (b"x-ratelimit-reset", b"1787356800000"),
    ],
    503: [(b"retry-after", b"30")],
}
_RETRY_AFTER_STATUSES: Final = frozenset({402, 429, 503})


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """A complete HTTP error response."""

    status: int
    headers: Headers
    body: bytes


def error_headers(status: int, generation_id: str, retry_after: int | None = None) -> Headers:
    """Headers of an OpenRouter error with ``status`` (errors/README.md table)."""
    headers = [*JSON_HEADERS, *_EXTRA_HEADERS.get(status, ())]
    if status == 502:
        headers.append((b"x-generation-id", generation_id.encode()))
    if retry_after is not None and status in _RETRY_AFTER_STATUSES:
        headers = [h for h in headers if h[0] != b"retry-after"]
        headers.append((b"retry-after", str(retry_after).encode()))
    return headers


class ErrorBook:
    """Precomputed bodies of the ``error-NNN`` faults."""

    def __init__(self, errors_dir: Path) -> None:
        self._bodies: dict[str, bytes] = dict(_COMPOSED)
        for fault, name in _FILES.items():
            self._bodies[fault] = orjson.dumps(orjson.loads((errors_dir / name).read_bytes()))
        self._bodies["error-400-context"] = context_length_error(131072, 10535, 131072)
        assert set(self._bodies) == ERROR_FAULTS

    def reply(self, fault: str, generation_id: str, retry_after: int | None) -> ErrorReply:
        """The response of error fault ``fault`` (one of ``ERROR_FAULTS``)."""
        status = int(fault[6:9])  # error-NNN[-flavour]
        return ErrorReply(status, error_headers(status, generation_id, retry_after), self._bodies[fault])


def context_length_error(context_length: int, prompt_tokens: int, max_tokens: int) -> bytes:
    """400 body of a request that does not fit a model's context (§4.2, typed as in §4.3)."""
    total = prompt_tokens + max_tokens
    message = _CONTEXT_MESSAGE.format(context_length, total, prompt_tokens, max_tokens)
    return error_body(message, 400, {"provider_name": None, "error_type": "context_length_exceeded"})


def midpoint(plan: StreamPlan) -> int:
    """Index at which faults cut: after the first delta and about half of the others."""
    deltas = plan.finish - plan.first_data
    return plan.first_data + min(deltas, max(2, deltas // 2))


def cut_index(plan: StreamPlan, after: int | None) -> int:
    """Index just past the ``after``-th data event (comments before it included), capped
    before ``[DONE]``; ``midpoint`` when ``after`` is None."""
    if after is None:
        return midpoint(plan)
    events = plan.events
    seen = 0
    for index in range(plan.first_data, len(events) - 1):
        if seen == after:
            return index
        if events[index].startswith(b"data:"):
            seen += 1
    return len(events) - 1


def shape_stream(plan: StreamPlan, fault: str | None, after: int | None = None) -> tuple[list[bytes], Tail]:
    """Events actually sent for ``fault`` and how the response ends; ``after`` is the
    ``stall_after``/``cut_after`` control of a ``stall``/``cut``."""
    events = plan.events
    cut = midpoint(plan)
    if fault == "midstream-error":
        return [*events[:cut], plan.error_event(), DONE], "end"
    if fault == "stall":
        return events[: cut_index(plan, after)], "stall"
    if fault == "cut":
        return events[: cut_index(plan, after)], "cut"
    if fault == "no-done":
        return events[:-1], "end"
    if fault == "malformed":
        return [*events[:cut], plan.malformed_event(), *events[cut:]], "end"
    return events, "end"
