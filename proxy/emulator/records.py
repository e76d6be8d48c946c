"""What the emulator remembers: request records for tests, generation records for ``/generation``.

``EmulatedRequest`` is the public, frozen record of one HTTP request (kept in
``Emulator.requests``, last 1000; ``GET /_emulator/requests``); ``Exchange`` is its mutable
draft while the request runs.  Timestamps are ``time.monotonic()`` seconds (one clock per
machine on Linux, so a test in another thread or process can compare them with its own).
``GenerationStore`` keeps the last ``capacity`` generations and renders them in the
key order of ``fixtures/generation.json`` (openrouter-api.md §6.3), money JavaScript-style.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

import orjson

from proxy.emulator.answer import Usage
from proxy.emulator.wire import js_number

__all__ = ["EmulatedRequest", "Exchange", "GenerationRecord", "GenerationStore", "redact_headers", "render_generation"]

REDACTED: Final = "<redacted>"


@dataclass(frozen=True, slots=True)
class EmulatedRequest:
    """One request as the emulator saw and answered it."""

    path: str
    model: str | None
    """Model that answered (after fallback), else the first requested; None off the chat route."""
    requested_model: str | None
    """The body's ``model`` (first candidate; ``DEFAULT_MODEL`` when absent); None off the chat route."""
    stream: bool
    fault: str | None
    """Fault actually applied (None when absent or switched off by its schedule)."""
    headers: dict[str, str]
    """Request headers, lower-case names; ``authorization`` replaced by ``<redacted>``."""
    status: int
    """Status sent in the response head; 0 if the client left before a head was sent."""
    cancelled: bool
    """The client disconnected (or a send failed) before the response was complete."""
    generation_id: str | None
    started: float
    """Monotonic time the request reached the app."""
    ended: float
    """Monotonic time the app finished with it (after the last send, or on learning the
    client left)."""
    data_events: int
    """SSE ``data:`` events handed to the server (including an error event and ``[DONE]``)."""


def redact_headers(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """ASGI headers as a dict (repeats joined by ``", "``), authorization redacted."""
    headers: dict[str, str] = {}
    for name_bytes, value_bytes in raw:
        name = name_bytes.decode("latin-1").lower()
        value = REDACTED if name == "authorization" else value_bytes.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


@dataclass(slots=True)
class Exchange:
    """Mutable draft of an ``EmulatedRequest``, filled in while the request is handled."""

    path: str
    headers: dict[str, str]
    started: float
    model: str | None = None
    requested_model: str | None = None
    stream: bool = False
    fault: str | None = None
    status: int = 0
    cancelled: bool = False
    generation_id: str | None = None
    data_events: int = 0

    def freeze(self, ended: float) -> EmulatedRequest:
        return EmulatedRequest(
            path=self.path,
            model=self.model,
            requested_model=self.requested_model,
            stream=self.stream,
            fault=self.fault,
            headers=self.headers,
            status=self.status,
            cancelled=self.cancelled,
            generation_id=self.generation_id,
            started=self.started,
            ended=ended,
            data_events=self.data_events,
        )


@dataclass(frozen=True, slots=True)
class GenerationRecord:
    id: str
    model: str
    provider: str
    streamed: bool
    cancelled: bool
    finish_reason: str
    native_finish_reason: str
    usage: Usage
    created_at: float
    """Unix seconds when the request arrived."""
    latency_ms: int
    """Time to the response head."""
    generation_time_ms: int
    """Time to the end of the response."""
    user_agent: str | None
    http_referer: str | None


class GenerationStore:
    """Bounded id → record map; the oldest record is evicted first."""

    def __init__(self, capacity: int = 10_000) -> None:
        self._capacity = capacity
        self._records: OrderedDict[str, GenerationRecord] = OrderedDict()

    def add(self, record: GenerationRecord) -> None:
        self._records[record.id] = record
        if len(self._records) > self._capacity:
            self._records.popitem(last=False)

    def get(self, generation_id: str) -> GenerationRecord | None:
        return self._records.get(generation_id)

    def clear(self) -> None:
        self._records.clear()


def render_generation(record: GenerationRecord) -> bytes:
    """``GET /api/v1/generation`` body ``{"data":{…}}``."""
    usage = record.usage
    cost = orjson.Fragment(js_number(usage.cost))
    data = {
        "id": record.id,
        "upstream_id": "chatcmpl-" + record.id.rsplit("-", 1)[-1],
        "total_cost": cost,
        "cache_discount": None,
        "upstream_inference_cost": cost,
        "created_at": datetime.fromtimestamp(record.created_at, UTC).isoformat(),
        "model": record.model,
        "app_id": None,
        "streamed": record.streamed,
        "cancelled": record.cancelled,
        "provider_name": record.provider,
        "latency": record.latency_ms,
        "moderation_latency": None,
        "generation_time": record.generation_time_ms,
        "finish_reason": record.finish_reason,
        "native_finish_reason": record.native_finish_reason,
        "service_tier": "default",
        "tokens_prompt": usage.prompt_tokens,
        "tokens_completion": usage.completion_tokens,
        "native_tokens_prompt": usage.prompt_tokens,
        "native_tokens_completion": usage.completion_tokens,
        "native_tokens_completion_images": 0,
        "native_tokens_reasoning": usage.reasoning_tokens,
        "native_tokens_cached": 0,
        "num_media_prompt": None,
        "num_input_audio_prompt": None,
        "num_media_completion": 0,
        "num_search_results": None,
        "num_fetches": None,
        "web_search_engine": None,
        "origin": "",
        "usage": cost,
        "is_byok": False,
        "external_user": None,
        "api_type": "completions",
        "preset_id": None,
        "router": None,
        "provider_responses": None,
        "user_agent": record.user_agent,
        "http_referer": record.http_referer,
        "data_region": "global",
        "workspace_id": None,
        "request_id": None,
        "session_id": None,
    }
    return orjson.dumps({"data": data})
