"""The request log: one JSON line per request, written by a thread off the event loop.

An ``EntrySink``: ``emit_entry`` only puts the (immutable) entry on a queue; a
``logging.handlers.QueueListener`` thread builds the JSON line and writes it to ``stderr`` or
to a file (``logging.request_log``), so the event loop never encodes, nor waits on a disk or
a pipe.

Fields: ``time`` (ISO 8601, UTC), ``request_id`` (the ``x-request-id`` the client got),
``key``, ``team``, ``route`` (the routing rule or alias), ``requested_model``, ``model``
(sent upstream), ``answered_model``, ``provider``, ``generation_id``, ``stream``,
``status``, ``error_code``, ``latency_s``, ``ttfb_s``, ``ttft_s``, ``prompt_tokens``,
``completion_tokens``, ``cached_tokens``, ``reasoning_tokens``, ``cost_usd``,
``cost_source``, ``estimated``, ``attempts`` (count), ``cancelled``.

Never a secret: records carry key *names* only, never a key or a header. Never message
content, unless ``include_content`` is set *and* the pipeline put the content in
``record.extra["content"]``.
"""

from __future__ import annotations

import logging
import queue
import sys
from datetime import UTC, datetime
from logging.handlers import QueueListener
from pathlib import Path
from typing import Any

import orjson

from proxy.accounting import LedgerEntry

__all__ = ["RequestLog", "request_line"]


def request_line(entry: LedgerEntry, include_content: bool = False) -> dict[str, Any]:
    """The log line of one accounted request (see the module docstring)."""
    rec = entry.record
    usage = rec.usage
    extra = rec.extra or {}
    attempts = extra.get("attempts")
    line: dict[str, Any] = {
        "time": datetime.fromtimestamp(rec.ts, UTC).isoformat(timespec="milliseconds"),
        "request_id": rec.request_id,
        "key": rec.key_name,
        "team": rec.team,
        "route": rec.rule,
        "requested_model": rec.requested_model,
        "model": rec.routed_model,
        "answered_model": rec.model,
        "provider": rec.provider,
        "generation_id": rec.generation_id,
        "stream": rec.stream,
        "status": rec.status,
        "error_code": rec.error_code,
        "latency_s": round(rec.latency_s, 4),
        "ttfb_s": None if rec.ttfb_s is None else round(rec.ttfb_s, 4),
        "ttft_s": None if rec.ttft_s is None else round(rec.ttft_s, 4),
        "prompt_tokens": usage.prompt_tokens if usage else 0,
        "completion_tokens": usage.completion_tokens if usage else 0,
        "cached_tokens": usage.cached_tokens if usage else 0,
        "reasoning_tokens": usage.reasoning_tokens if usage else 0,
        "cost_usd": float(entry.cost_usd),
        "cost_source": entry.cost_source,
        "estimated": entry.estimated,
        "attempts": len(attempts) if isinstance(attempts, list) else 1,
        "cancelled": rec.cancelled,
    }
    if include_content and "content" in extra:
        line["content"] = extra["content"]
    return line


class _Listener(QueueListener):
    """Turns each queued ``LedgerEntry`` into a log record, in the listener thread."""

    def __init__(self, entries: queue.SimpleQueue[Any], target: logging.Handler, include_content: bool) -> None:
        super().__init__(entries, target)
        self.include_content = include_content

    def prepare(self, record: Any) -> logging.LogRecord:
        message = orjson.dumps(request_line(record, self.include_content)).decode()
        return logging.makeLogRecord({"name": "proxy.requests", "levelno": logging.INFO, "msg": message})


class RequestLog:
    """Writes request lines to ``path`` (appending) or to ``stderr`` when ``path`` is None."""

    def __init__(self, path: Path | None = None, *, include_content: bool = False) -> None:
        self.include_content = include_content
        target: logging.Handler
        if path is None:
            target = logging.StreamHandler(sys.stderr)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            target = logging.FileHandler(path, encoding="utf-8", delay=True)
        target.setFormatter(logging.Formatter("%(message)s"))
        self._target = target
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._listener = _Listener(self._queue, target, include_content)
        self._started = False

    def start(self) -> None:
        self._listener.start()
        self._started = True

    def emit_entry(self, entry: LedgerEntry) -> None:
        if self._started:
            self._queue.put_nowait(entry)

    def close(self) -> None:
        """Write what is queued, stop the thread, close the target."""
        if self._started:
            self._started = False
            self._listener.stop()
        self._target.close()
