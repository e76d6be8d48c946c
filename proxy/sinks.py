"""Where finished requests go: the usage-record sinks.

A ``RecordSink`` receives every ``UsageRecord`` once, synchronously, from the pipeline's
``finally``; it must not block (buffer and write in the background). The usage log, the
store's usage totals, metrics and the request log are sinks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

from proxy.store import Store, StoreUnavailable
from proxy.types import UsageRecord

__all__ = ["Activity", "RecordSink", "StoreTotalsSink"]

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


class Activity:
    """Requests and streams in flight in this worker; listeners see every change.

    The pipeline calls ``enter``/``leave`` around every chat completion and
    ``stream_open``/``stream_close`` around every relayed stream. Listeners (e.g. metrics
    gauges) are called with ``(requests, streams)`` after each change.
    """

    __slots__ = ("listeners", "requests", "streams")

    def __init__(self) -> None:
        self.requests = 0
        self.streams = 0
        self.listeners: list[Callable[[int, int], None]] = []

    def _changed(self) -> None:
        for listener in self.listeners:
            listener(self.requests, self.streams)

    def enter(self) -> None:
        self.requests += 1
        if self.listeners:
            self._changed()

    def leave(self) -> None:
        self.requests -= 1
        if self.listeners:
            self._changed()

    def stream_open(self) -> None:
        self.streams += 1
        if self.listeners:
            self._changed()

    def stream_close(self) -> None:
        self.streams -= 1
        if self.listeners:
            self._changed()
