"""Circuit breakers per upstream target (a model id, or ``url:<base URL>``).

Each breaker counts attempts and failures in a rolling window of one-second buckets.
``closed``: every attempt may go. It opens when the window holds at least
``min_requests`` attempts and the failed share reaches ``failure_rate``. ``open``: attempts
are refused (the pipeline tries the next model, or answers 503 at once) until
``open_s`` has passed; then ``half_open``: one probe at a time may go; its success closes
the breaker (counts reset), its failure opens it again.

Shared across replicas: ``sync`` publishes every breaker this process opens to the store
(target -> wall-clock time it closes) and adopts the open states other replicas published,
every ``sync_interval_s`` seconds, off the request path. ``allow`` and ``record`` are plain
in-memory operations.

A closed breaker with no attempt in its window holds nothing a new one would not, so the
same background loop forgets it (``prune``): a breaker exists per model id the clients
name, and without this a client naming ever new models would grow the worker forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from proxy.config import BreakerSettings

__all__ = ["BreakerStore", "Breakers"]

log = logging.getLogger("proxy.breaker")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class BreakerStore(Protocol):
    async def breaker_publish(self, target: str, open_until: float) -> None: ...

    async def breaker_states(self) -> dict[str, float]: ...


@dataclass(slots=True)
class _Breaker:
    buckets: dict[int, list[int]] = field(default_factory=dict)  # second -> [attempts, failures]
    state: str = CLOSED
    open_until: float = 0.0  # monotonic
    probe_since: float | None = None
    published: bool = False


class Breakers:
    """All breakers of one worker. ``clock`` is monotonic seconds, ``wall`` Unix seconds."""

    def __init__(
        self,
        settings: BreakerSettings,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._wall = wall
        self._breakers: dict[str, _Breaker] = {}
        self.listeners: list[Callable[[str, str], None]] = []
        self._task: asyncio.Task[None] | None = None

    def _get(self, target: str) -> _Breaker:
        breaker = self._breakers.get(target)
        if breaker is None:
            breaker = self._breakers[target] = _Breaker()
        return breaker

    def _set(self, target: str, breaker: _Breaker, state: str) -> None:
        if breaker.state != state:
            breaker.state = state
            log.warning("circuit breaker for %s is now %s", target, state)
            for listener in self.listeners:
                listener(target, state)

    def peek(self, target: str) -> bool:
        """Would ``allow`` say yes now? (Claims nothing.)"""
        if not self.settings.enabled:
            return True
        breaker = self._breakers.get(target)
        if breaker is None or breaker.state == CLOSED:
            return True
        now = self._clock()
        if breaker.state == OPEN:
            return now >= breaker.open_until
        return breaker.probe_since is None or now - breaker.probe_since > self.settings.open_s

    def allow(self, target: str) -> bool:
        """May an attempt go to ``target`` now? (Claims the probe when half-open.)"""
        if not self.settings.enabled:
            return True
        breaker = self._breakers.get(target)
        if breaker is None or breaker.state == CLOSED:
            return True
        now = self._clock()
        if breaker.state == OPEN:
            if now < breaker.open_until:
                return False
            self._set(target, breaker, HALF_OPEN)
            breaker.probe_since = None
        if breaker.probe_since is None or now - breaker.probe_since > self.settings.open_s:
            breaker.probe_since = now
            return True
        return False

    def release(self, target: str) -> None:
        """An attempt that says nothing of ``target``'s health ended: give back the half-open
        probe it may have taken, so the next attempt can probe."""
        breaker = self._breakers.get(target)
        if breaker is not None and breaker.state == HALF_OPEN:
            breaker.probe_since = None

    def record(self, target: str, ok: bool) -> None:
        """The outcome of one attempt on ``target``."""
        if not self.settings.enabled:
            return
        breaker = self._get(target)
        now = self._clock()
        if breaker.state == HALF_OPEN:
            if ok:
                breaker.buckets.clear()
                breaker.probe_since = None
                self._set(target, breaker, CLOSED)
            else:
                self._open(target, breaker, now)
            return
        second = int(now)
        bucket = breaker.buckets.get(second)
        if bucket is None:
            bucket = breaker.buckets[second] = [0, 0]
            horizon = second - int(self.settings.window_s)
            for old in [s for s in breaker.buckets if s <= horizon]:
                del breaker.buckets[old]
        bucket[0] += 1
        if not ok:
            bucket[1] += 1
            if breaker.state == CLOSED:
                attempts = sum(b[0] for b in breaker.buckets.values())
                failures = sum(b[1] for b in breaker.buckets.values())
                if attempts >= self.settings.min_requests and failures >= self.settings.failure_rate * attempts:
                    self._open(target, breaker, now)

    def _open(self, target: str, breaker: _Breaker, now: float) -> None:
        breaker.open_until = now + self.settings.open_s
        breaker.probe_since = None
        breaker.published = False
        self._set(target, breaker, OPEN)

    def state(self, target: str) -> str:
        breaker = self._breakers.get(target)
        return breaker.state if breaker else CLOSED

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Every known breaker: ``{target: {"state", "attempts", "failures", "open_for_s"}}``."""
        now = self._clock()
        return {
            target: {
                "state": b.state,
                "attempts": sum(x[0] for x in b.buckets.values()),
                "failures": sum(x[1] for x in b.buckets.values()),
                "open_for_s": round(max(0.0, b.open_until - now), 3) if b.state == OPEN else 0.0,
            }
            for target, b in sorted(self._breakers.items())
        }

    async def sync_once(self, store: BreakerStore) -> None:
        """Publish local openings, adopt remote ones (one store round trip each way)."""
        now, wall = self._clock(), self._wall()
        for target, breaker in list(self._breakers.items()):
            if breaker.state == OPEN and not breaker.published:
                await store.breaker_publish(target, wall + (breaker.open_until - now))
                breaker.published = True
        for target, until in (await store.breaker_states()).items():
            remaining = until - wall
            breaker = self._get(target)
            if remaining > 0 and breaker.state == CLOSED:
                breaker.open_until = now + remaining
                breaker.published = True
                self._set(target, breaker, OPEN)

    def prune(self) -> int:
        """Forget closed breakers without an attempt in the window; how many went."""
        horizon = int(self._clock()) - int(self.settings.window_s)
        idle = [
            target
            for target, b in self._breakers.items()
            if b.state == CLOSED and all(second <= horizon for second in b.buckets)
        ]
        for target in idle:
            del self._breakers[target]
        return len(idle)

    async def start(self, store: BreakerStore) -> None:
        if self.settings.enabled:
            self._task = asyncio.create_task(self._run(store), name="breaker-sync")

    async def _run(self, store: BreakerStore) -> None:
        while True:
            await asyncio.sleep(self.settings.sync_interval_s)
            self.prune()
            try:
                await self.sync_once(store)
            except Exception as exc:  # the store is optional for breakers: keep local state
                log.debug("breaker sync failed: %s", exc)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
