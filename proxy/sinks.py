"""Where finished requests go: the usage-record sinks.

A ``RecordSink`` receives every ``UsageRecord`` once, synchronously, from the pipeline's
``finally``; it must not block (buffer and write in the background). The usage log, the
store's usage totals, metrics and the request log are sinks.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from proxy.store import Store, StoreUnavailable
from proxy.types import UsageRecord

__all__ = ["RecordSink", "StoreTotalsSink"]

log = logging.getLogger("proxy.sinks")


class RecordSink(Protocol):
    def emit(self, record: UsageRecord) -> None:
        """Take one finished request's record; never blocks, never raises."""


class StoreTotalsSink:
    """Adds each record to the store's per-day totals, off the request path."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._tasks: set[asyncio.Task[None]] = set()

    def emit(self, record: UsageRecord) -> None:
        if record.key_name is None:
            return
        task = asyncio.get_running_loop().create_task(self._add(record))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _add(self, record: UsageRecord) -> None:
        try:
            await self.store.add_usage(record)
        except StoreUnavailable as exc:
            log.warning("usage totals not updated in the %s store: %s", self.store.name, exc)

    async def drain(self) -> None:
        """Wait for pending writes (at shutdown)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
