"""The usage log: one JSON line per request, appended off the hot path.

``UsageLog.emit_entry`` (an output of ``proxy.accounting.AccountingSink``, so the line
carries the cost as accounted) only appends the encoded line to a buffer; a background task writes the
buffer every ``flush_interval_s`` seconds (and ``close`` writes what is left), so no
request ever waits on the disk. Several workers may append to one file: each flush is a
single ``write`` on a file opened with ``O_APPEND``.

The buffer is one ``bytearray``, not a list of lines: each line (about 660 bytes, too big
for CPython's small-object allocator) is copied in and freed at once. Half a second of
lines kept as separate objects, interleaved with the requests' own allocations, pinned the
C heap: at 64 connections the worker's RSS grew by about 20 MB more (100 MB against
82 MB, ``loadtests/bench.py``'s traffic).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

from proxy.accounting import LedgerEntry
from proxy.metering import record_json

__all__ = ["UsageLog"]

log = logging.getLogger("proxy.usagelog")


class UsageLog:
    """Buffered JSON-lines writer. ``path=None`` keeps nothing (metering off)."""

    def __init__(self, path: Path | None, flush_interval_s: float = 0.5) -> None:
        self.path = path
        self.flush_interval_s = flush_interval_s
        self._buffer = bytearray()
        self._task: asyncio.Task[None] | None = None
        self._fd: int | None = None
        self._mid_line = False  # a failed write left the file's last line unfinished

    async def start(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._task = asyncio.create_task(self._run(), name="usage-log-flush")

    def emit_entry(self, entry: LedgerEntry) -> None:
        """Buffer the line of an accounted request (an output of ``AccountingSink``)."""
        if self._fd is not None:
            cost = float(entry.cost_usd) if entry.cost_source != "none" else None
            self._buffer += record_json(
                entry.record, cost_usd=cost, cost_source=entry.cost_source, estimated=entry.estimated
            )

    def flush(self) -> None:
        """Write the buffered lines now (one ``write`` call). What a failed write leaves is
        lost and logged; a line it broke off is ended, so later lines stay whole."""
        if not self._buffer or self._fd is None:
            return
        data, self._buffer = memoryview(self._buffer), bytearray()
        size = len(data)
        try:
            if self._mid_line:  # end the line a failed write broke off, so that this one starts clean
                os.write(self._fd, b"\n")
                self._mid_line = False
            while data:
                data = data[os.write(self._fd, data) :]
        except OSError:
            self._mid_line = self._mid_line or 0 < len(data) < size
            log.exception("usage log write failed; %d bytes of records lost", len(data))

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval_s)
            self.flush()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.flush()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
