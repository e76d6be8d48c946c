"""Where finished requests go: the usage-record sinks.

A ``RecordSink`` receives every ``UsageRecord`` once, synchronously, from the pipeline's
``finally``; it must not block (buffer and write in the background). The one sink in
service is ``proxy.accounting.AccountingSink``, which prices each record once and hands
it to the usage log, the ledger, metrics, the request log and traces.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from proxy.types import UsageRecord

__all__ = ["Activity", "RecordSink"]


class RecordSink(Protocol):
    def emit(self, record: UsageRecord) -> None:
        """Take one finished request's record; never blocks, never raises."""


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
