"""Upstream pacing: a leaky bucket in front of OpenRouter that queues bursts.

Instead of passing OpenRouter's 429s through when many clients burst at once, each
upstream request waits for a slot of an ``aiolimiter.AsyncLimiter`` (``requests_per_s``,
bursts of ``burst``). The queue is bounded: with ``max_waiters`` requests already waiting,
or after ``max_wait_s`` seconds of waiting, the request fails with ``UpstreamBusy`` (503
``upstream_busy``, ``Retry-After: 1``; retryable). The bucket is per worker process and
per upstream base URL: the rate across a deployment is ``requests_per_s`` x workers x
replicas. Off by default (``requests_per_s: null``): ``slot()`` then costs nothing.

Use around the upstream call (``proxy/upstream.py``)::

    async with self.pacer.slot():
        response = await self._session.request(...)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiolimiter import AsyncLimiter

from proxy.config import PacingSettings
from proxy.errors import UpstreamBusy

__all__ = ["Pacer"]


class Pacer:
    """One upstream's leaky bucket. ``waiting``/``rejected_total`` are for metrics."""

    def __init__(self, settings: PacingSettings) -> None:
        self.settings = settings
        rate = settings.requests_per_s
        self._limiter = AsyncLimiter(settings.burst, settings.burst / rate) if rate else None
        self.waiting = 0
        self.rejected_total = 0

    @property
    def enabled(self) -> bool:
        return self._limiter is not None

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Wait for an upstream slot; raises ``UpstreamBusy`` when the queue is full or the
        wait exceeds ``max_wait_s`` (seconds)."""
        limiter = self._limiter
        if limiter is not None and not limiter.has_capacity():
            if self.waiting >= self.settings.max_waiters:
                self.rejected_total += 1
                raise UpstreamBusy("The gateway's upstream queue is full. Retry shortly.")
            self.waiting += 1
            try:
                async with asyncio.timeout(self.settings.max_wait_s):
                    await limiter.acquire()
            except TimeoutError:
                self.rejected_total += 1
                raise UpstreamBusy("Timed out waiting for an upstream slot. Retry shortly.") from None
            finally:
                self.waiting -= 1
        elif limiter is not None:
            await limiter.acquire()
        yield
