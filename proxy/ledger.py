"""The ledger writer: accounted requests go to the store's usage ledger in batches.

``Ledger.emit_entry`` only appends to an in-memory buffer (the hot path never waits on
the store). One background task sends the buffer as batches of up to ``batch_size``
entries, each batch one round trip (``UsageLedger.append``: stream entries, rollups and
reconciliation tickets applied atomically), every ``flush_interval_s`` seconds or as soon
as a batch is full; larger batches are encoded (JSON, counters) in a worker thread so the
event loop is never held for a whole batch. ``close`` writes what is left (bounded by
``close_timeout_s``).

When the store is unavailable the batch stays at the head of the buffer and is retried
with exponential back-off (0.1 s doubling to 5 s). Each batch has an id, so a retry after
an ambiguous failure (a timeout after Redis ran the script) is not applied twice. The
buffer holds at most ``max_buffer`` entries; beyond that the oldest are dropped, counted
and logged, so an outage cannot exhaust memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import deque
from collections.abc import Callable

from proxy.accounting import LedgerEntry, write_of
from proxy.store import LedgerWrite, Retention, StoreUnavailable, UsageLedger

__all__ = ["Ledger"]

log = logging.getLogger("proxy.ledger")

_BACKOFF_MIN_S = 0.1
_BACKOFF_MAX_S = 5.0
_INLINE_ENCODE = 32  # batches up to this size are encoded on the event loop itself


class Ledger:
    """Buffered, batched writer of ``LedgerEntry``s into ``usage`` (an ``EntrySink``).

    ``tickets``: leave reconciliation tickets for estimated entries (when the
    reconciliation job runs). ``on_drop(n)`` is told about entries dropped on overflow.
    """

    def __init__(
        self,
        usage: UsageLedger,
        retention: Retention,
        *,
        flush_interval_s: float = 0.2,
        batch_size: int = 500,
        max_buffer: int = 100_000,
        tickets: bool = True,
        on_drop: Callable[[int], None] | None = None,
    ) -> None:
        self.usage = usage
        self.retention = retention
        self.flush_interval_s = flush_interval_s
        self.batch_size = batch_size
        self.max_buffer = max_buffer
        self.tickets = tickets
        self.on_drop = on_drop
        self.dropped = 0
        self.written = 0
        self._buffer: deque[LedgerEntry] = deque()
        self._pending: tuple[str, list[LedgerWrite], int] | None = None
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._closing = False
        self._failing = False  # the last write failed (logged once until one succeeds)
        self._task: asyncio.Task[None] | None = None

    def emit_entry(self, entry: LedgerEntry) -> None:
        self._buffer.append(entry)
        if len(self._buffer) > self.max_buffer:
            self._buffer.popleft()
            self.dropped += 1
            if self.on_drop is not None:
                self.on_drop(1)
            if self.dropped % 1000 == 1:
                log.error("ledger buffer full (%d entries): %d entries dropped so far", self.max_buffer, self.dropped)
        if len(self._buffer) >= self.batch_size:
            self._wake.set()

    @property
    def backlog(self) -> int:
        """Entries not yet written (buffered or in the batch being sent)."""
        return len(self._buffer) + (self._pending[2] if self._pending else 0)

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="ledger-writer")

    async def _run(self) -> None:
        backoff = 0.0
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), backoff or self.flush_interval_s)
            self._wake.clear()
            backoff = 0.0 if await self.flush() else min(max(backoff * 2, _BACKOFF_MIN_S), _BACKOFF_MAX_S)

    async def flush(self) -> bool:
        """Write everything buffered now; False if the store failed (the rest stays queued)."""
        async with self._lock:
            return await self._flush()

    async def _flush(self) -> bool:
        while self._pending is not None or self._buffer:
            if self._pending is None:
                self._pending = await self._next_batch()
            batch_id, writes, count = self._pending
            try:
                if writes:
                    await self.usage.append(writes, self.retention, batch_id)
            except StoreUnavailable as exc:
                if not self._failing:  # once per outage, not at every retry
                    self._failing = True
                    log.warning("ledger batch of %d entries not written yet (store: %s); will retry", count, exc)
                return False
            if self._failing:
                self._failing = False
                log.warning("ledger writes go through again (%d entries waiting)", len(self._buffer))
            self._pending = None
            self.written += count
        return True

    async def _next_batch(self) -> tuple[str, list[LedgerWrite], int]:
        entries = [self._buffer.popleft() for _ in range(min(self.batch_size, len(self._buffer)))]
        if len(entries) > _INLINE_ENCODE:  # encode big batches in a thread: the event loop keeps running
            writes = await asyncio.to_thread(self._encode, entries)
        else:
            writes = self._encode(entries)
        return uuid.uuid4().hex, writes, len(entries)

    def _encode(self, entries: list[LedgerEntry]) -> list[LedgerWrite]:
        writes = []
        for entry in entries:
            try:
                writes.append(self._write(entry))
            except Exception:
                log.exception("ledger entry of request %s could not be encoded; dropped", entry.record.request_id)
        return writes

    def _write(self, entry: LedgerEntry) -> LedgerWrite:
        line = entry.line()
        ticket = entry.ticket() if self.tickets and entry.reconcilable else None
        try:
            return write_of(line, counters=entry.counters(), ticket=ticket)
        except TypeError:  # an ``extra`` value JSON cannot encode: keep the rest
            line.pop("extra", None)
            return write_of(line, counters=entry.counters(), ticket=ticket)

    async def close(self, close_timeout_s: float = 5.0) -> None:
        """Stop the writer and write what is left, retrying for up to ``close_timeout_s``."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + close_timeout_s
        while not await self.flush():
            if loop.time() + _BACKOFF_MIN_S > deadline:
                log.error("ledger closed with %d entries not written (store unavailable)", self.backlog)
                return
            await asyncio.sleep(_BACKOFF_MIN_S)
