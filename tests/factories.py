"""Small factories shared by the tests: a free loopback port and a ``UsageRecord``."""

from __future__ import annotations

import socket
import time
from typing import Any

from proxy.types import Usage, UsageRecord

__all__ = ["free_port", "usage_record"]


def free_port() -> int:
    """A loopback port free right now (released on return, then bound by the caller's server)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def usage_record(
    *,
    key: str = "alice",
    team: str | None = "research",
    model: str = "openai/gpt-4o-mini",
    status: int = 200,
    usage: Usage | None = None,
    generation_id: str | None = "gen-1",
    ts: float | None = None,
    error_code: str | None = None,
    rule: str | None = None,
    extra: dict[str, Any] | None = None,
) -> UsageRecord:
    """A ``UsageRecord`` with sensible defaults (a whole, successful OpenAI answer)."""
    return UsageRecord(
        request_id=f"req-{time.monotonic_ns()}",
        ts=time.time() if ts is None else ts,
        key_name=key,
        team=team,
        requested_model=model,
        routed_model=model,
        rule=rule,
        model=model,
        provider="OpenAI",
        generation_id=generation_id,
        stream=False,
        status=status,
        usage=usage,
        finish_reason="stop",
        latency_s=0.25,
        ttfb_s=0.1,
        error_code=error_code,
        extra=extra,
    )
