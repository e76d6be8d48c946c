"""The request log: one JSON line per request, written in batches off the event loop.

An ``EntrySink``: ``emit_entry`` only appends the (immutable) entry to a batch; every
``flush_interval_s`` a worker thread encodes the batch and writes it to ``stderr`` or to a
file (``logging.request_log``) in one ``write``, so the event loop never waits on a disk or
a pipe and pays no per-request thread hand-off.

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

import asyncio
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from proxy.accounting import LedgerEntry

__all__ = ["RequestLog", "request_line"]

log = logging.getLogger("proxy.reqlog")


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


class RequestLog:
    """Writes request lines to ``path`` (appending) or to ``stderr`` when ``path`` is None.

    ``emit_entry`` appends to an in-memory batch (no lock, no thread hand-off per
    request); every ``flush_interval_s`` the batch is encoded and written by a worker thread
    in one ``write``, so the event loop never encodes many lines nor waits on a pipe or a
    disk. ``close`` writes what is left.
    """

    def __init__(
        self, path: Path | None = None, *, include_content: bool = False, flush_interval_s: float = 0.2
    ) -> None:
        self.include_content = include_content
        self.path = path
        self.flush_interval_s = flush_interval_s
        self._batch: list[LedgerEntry] = []
        self._task: asyncio.Task[None] | None = None
        self._fd: int | None = None
        self._started = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="request-log")

    def start(self) -> None:
        if self.path is None:
            try:
                self._fd = sys.stderr.fileno()
            except (AttributeError, OSError, ValueError):  # stderr replaced (e.g. captured): write text
                self._fd = None
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="request-log")
        self._started = True

    def emit_entry(self, entry: LedgerEntry) -> None:
        if self._started:
            self._batch.append(entry)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval_s)
            if self._batch:
                batch, self._batch = self._batch, []
                await asyncio.get_running_loop().run_in_executor(self._executor, self._write, batch)

    def _write(self, batch: list[LedgerEntry]) -> None:
        include = self.include_content
        data = b"".join(orjson.dumps(request_line(e, include), option=orjson.OPT_APPEND_NEWLINE) for e in batch)
        fd = self._fd
        try:
            if fd is None:
                sys.stderr.write(data.decode())
                sys.stderr.flush()
                return
            while data:
                data = data[os.write(fd, data) :]
        except (OSError, ValueError) as exc:
            log.warning("request log write failed: %s", exc)

    def close(self) -> None:
        """Write what is queued, stop the task, close the file."""
        self._started = False
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._executor.shutdown(wait=True)  # a batch being written finishes before the fd closes
        batch, self._batch = self._batch, []
        if batch:
            self._write(batch)
        if self._fd is not None and self.path is not None:
            os.close(self._fd)
        self._fd = None
