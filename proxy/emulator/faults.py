"""Fault injection: OpenRouter error replies, stream mutilations, fail-N-times counters.

Error bodies are the files of ``data/fixtures/errors/`` (copies of the shared fixtures,
openrouter-api.md §4), compacted with key order kept; extra headers follow
``fixtures/errors/README.md``: 429 → ``X-RateLimit-Limit/Remaining/Reset`` (reset in epoch
ms), 502 → ``X-Generation-Id``, 503 → ``Retry-After: 30``.  ``error-500`` has no fixture; its
body is composed from §4.2/§4.3 (masked message, ``metadata.error_type:"server"``).

Stream faults cut the planned event list at its middle delta (``midpoint``) and say how the
response ends (``Tail``): cleanly, by stalling until the client leaves, or by raising.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import orjson

from proxy.emulator.render import DONE, StreamPlan
from proxy.emulator.types import ERROR_FAULTS, Headers
from proxy.emulator.wire import JSON_HEADERS, error_body

__all__ = ["ErrorBook", "ErrorReply", "FailCounter", "Tail", "error_headers", "midpoint", "shape_stream"]

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
_SERVER_ERROR: Final = error_body("Internal Server Error", 500, {"error_type": "server"})
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
        self._bodies: dict[str, bytes] = {"error-500": _SERVER_ERROR}
        for fault, name in _FILES.items():
            self._bodies[fault] = orjson.dumps(orjson.loads((errors_dir / name).read_bytes()))
        assert set(self._bodies) == ERROR_FAULTS

    def reply(self, fault: str, generation_id: str, retry_after: int | None) -> ErrorReply:
        """The response of error fault ``fault`` (one of ``ERROR_FAULTS``)."""
        status = int(fault.removeprefix("error-"))
        return ErrorReply(status, error_headers(status, generation_id, retry_after), self._bodies[fault])


def midpoint(plan: StreamPlan) -> int:
    """Index at which faults cut: after the first delta and about half of the others."""
    deltas = plan.finish - plan.first_data
    return plan.first_data + min(deltas, max(2, deltas // 2))


def shape_stream(plan: StreamPlan, fault: str | None) -> tuple[list[bytes], Tail]:
    """Events actually sent for ``fault`` and how the response ends."""
    events = plan.events
    cut = midpoint(plan)
    if fault == "midstream-error":
        return [*events[:cut], plan.error_event(), DONE], "end"
    if fault == "stall":
        return events[:cut], "stall"
    if fault == "cut":
        return events[:cut], "cut"
    if fault == "no-done":
        return events[:-1], "end"
    if fault == "malformed":
        return [*events[:cut], plan.malformed_event(), *events[cut:]], "end"
    return events, "end"


class FailCounter:
    """Per-key attempt counters for ``fail_times`` ("fail N times, then succeed")."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def applies(self, key: str, times: int | None) -> bool:
        """Count one attempt under ``key``; True while at most ``times`` have been counted."""
        if times is None:
            return True
        count = self._counts.get(key, 0)
        if count >= times:
            return False
        self._counts[key] = count + 1
        return True

    def clear(self) -> None:
        self._counts.clear()
