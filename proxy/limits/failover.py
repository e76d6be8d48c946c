"""The shared counters with a local fallback: what happens when Redis is slow or down.

``Failover.reserve`` tries the shared backend. When it fails (an error, or slower than
``store_timeout_ms``) the store is not tried again for ``store_retry_s``; the next request
after that probes it, so a dead Redis costs no per-request timeout and a restarted one is
picked up by itself (redis-py reconnects); while it is down, one request at a time probes
it. Meanwhile ``fail_open`` decides on local
in-memory counters with every limit divided by ``replicas`` (an even share of the
deployment), and ``fail_closed`` raises ``LimitsUnavailable`` (503). Either way the mode is
never silent: a response header (set by the limiter), ``degraded_total`` and an error log
line at most every 10 s, plus a line when the store is back. ``on_degraded`` and
``on_settle_failure`` (e.g. Prometheus counters' ``inc``) are called on each count.

The timeout counts from the call, so it includes waiting for a pooled connection: a worker
flooded with hundreds of simultaneous admissions can exceed a small timeout while Redis is
healthy (raise ``store_timeout_ms`` if ``degraded_total`` climbs under load). A reservation
cut short may still have run in Redis: its window counts stay (an over-count, never an
under-count) and its holds are released in the background by request id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import replace
from typing import Any

from proxy.config import LimitsSettings
from proxy.errors import LimitsUnavailable
from proxy.limits.backend import Backend, Check, Decision, Release
from proxy.limits.memory import MemoryBackend
from proxy.limits.policy import Bound
from proxy.store import StoreUnavailable

__all__ = ["Failover"]

log = logging.getLogger("proxy.limits")
_SETTLE_TRIES = 10
_MAX_PENDING_SETTLES = 10_000

_LOG_EVERY_S = 10.0


class Failover:
    """``backend`` with a local ``MemoryBackend`` behind it (none when it is memory already)."""

    def __init__(self, settings: LimitsSettings, backend: Backend, clock: Callable[[], float]) -> None:
        self.settings = settings
        self.backend = backend
        self.local: MemoryBackend | None = None if isinstance(backend, MemoryBackend) else MemoryBackend()
        self._clock = clock
        self._lease_ms = int(settings.lease_s * 1000)
        self.degraded_total = 0
        self.settle_failures_total = 0
        self.on_degraded: Callable[[], None] | None = None
        self.on_settle_failure: Callable[[], None] | None = None
        self._retry_at = 0.0
        self._down_since: float | None = None
        self._last_error: str | None = None
        self._last_log = 0.0
        self._unlogged = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending: dict[str, list[Release]] = {}  # request id -> holds a retry still has to release

    async def start(self) -> None:
        """Load the store's scripts and open a connection now rather than on a burst."""
        warm = getattr(self.backend, "warm", None)
        if warm is not None:
            await warm()

    async def aclose(self) -> None:
        """Stop the retries, giving each pending release one last try (at most a second
        in all), then close the backend."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        pending, self._pending = self._pending, {}
        if pending:
            now_ms = int(self._clock() * 1000)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await asyncio.gather(
                        *(self.backend.settle(holds, rid, now_ms) for rid, holds in pending.items()),
                        return_exceptions=True,
                    )
        close = getattr(self.backend, "aclose", None)
        if close is not None:
            await close()

    async def reserve(
        self,
        bounds: tuple[Bound, ...],
        checks: Sequence[Check],
        rid: str,
        now_ms: int,
        *,
        dry: bool = False,
        shape: Hashable | None = None,
    ) -> tuple[Decision, Backend, tuple[Bound, ...]]:
        """``(decision, backend that decided, bounds as applied)``; the bounds carry the
        local shares when the local counters decided. Raises ``LimitsUnavailable``."""
        local = self.local
        if local is None:
            decision = await self.backend.reserve(checks, rid, now_ms, self._lease_ms, dry=dry, shape=shape)
            return decision, self.backend, bounds
        now = time.monotonic()
        if now >= self._retry_at:
            if self._down_since is not None:
                self._retry_at = now + self.settings.store_retry_s  # one probe at a time while down
            try:
                decision = await self.backend.reserve(checks, rid, now_ms, self._lease_ms, dry=dry, shape=shape)
            except StoreUnavailable as exc:
                self._failed(str(exc))
                if not dry:
                    self._release_later(checks, rid)
            else:
                self._recovered()
                return decision, self.backend, bounds
        if not dry:
            self.degraded_total += 1
            if self.on_degraded is not None:
                self.on_degraded()
            self._log_degraded()
            if self.settings.failure_policy == "fail_closed":
                raise LimitsUnavailable(
                    "The gateway cannot check rate limits right now (its limits store is unreachable). Retry shortly."
                )
        share = self.settings.replicas
        scaled = tuple(replace(b, rule=replace(b.rule, limit=max(1, b.rule.limit // share))) for b in bounds)
        local_checks = [c._replace(limit=b.rule.limit) for c, b in zip(checks, scaled, strict=True)]
        return await local.reserve(local_checks, rid, now_ms, self._lease_ms, dry=dry), local, scaled

    async def settle(
        self, backend: Backend, releases: Sequence[Release], rid: str, now_ms: int, *, shape: Hashable | None = None
    ) -> list[int] | None:
        """Settle on the backend that reserved; ``None`` (counted, logged) when it failed."""
        try:
            return await backend.settle(releases, rid, now_ms, shape=shape if backend is self.backend else None)
        except StoreUnavailable as exc:
            self.settle_failures_total += 1
            if self.on_settle_failure is not None:
                self.on_settle_failure()
            self._failed(str(exc))
            self._log_degraded()
            holds = [r for r in releases if not r.window]
            if holds and backend is self.backend:
                # A hold (slot, budget) settles at most once (the script spends only while the
                # request's hold exists), so retrying is safe even if the first try ran.
                self._settle_later(holds, rid)
            return None

    async def add_spend(self, keys: Sequence[str], delta: int) -> list[int] | None:
        """``Backend.add_spend`` on the shared store; ``None`` (logged) when it failed: that
        correction is lost for the budget (the ledger keeps it)."""
        try:
            return await self.backend.add_spend(keys, delta)
        except StoreUnavailable as exc:
            log.warning("a budget correction of %d nano-USD was not applied (store: %s)", delta, exc)
            return None

    def _release_later(self, checks: Sequence[Check], rid: str) -> None:
        """A reservation failed (it may have run): release its holds once the store is back."""
        holds = [Release(c.key, False) for c in checks if c.window is None]
        if holds:
            self._settle_later(holds, rid)

    def _settle_later(self, holds: list[Release], rid: str) -> None:
        if len(self._tasks) >= _MAX_PENDING_SETTLES:  # a long outage under load: the leases end them
            return
        self._pending[rid] = holds
        task = asyncio.get_running_loop().create_task(self._settle_until_taken(holds, rid))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _settle_until_taken(self, holds: list[Release], rid: str) -> None:
        """Retry until the store takes it: after ``store_retry_s``, then twice as long each
        time up to 8 times as long, ``_SETTLE_TRIES`` times (about a minute at the default);
        then the holds expire with their lease."""
        first = wait = self.settings.store_retry_s
        for _ in range(_SETTLE_TRIES):
            await asyncio.sleep(wait)
            try:
                await self.backend.settle(holds, rid, int(self._clock() * 1000))
                break
            except StoreUnavailable:
                wait = min(wait * 2, first * 8)
        self._pending.pop(rid, None)

    def state(self) -> dict[str, Any]:
        """What the requests found (see ``Limiter.state``); no I/O, no side effect."""
        down = self._down_since
        return {
            "store": self.backend.name,
            "degraded": down is not None,
            "failure_policy": self.settings.failure_policy,
            "down_for_s": round(time.monotonic() - down, 3) if down is not None else None,
            "last_error": self._last_error,
            "degraded_total": self.degraded_total,
        }

    def _failed(self, error: str) -> None:
        now = time.monotonic()
        self._retry_at = now + self.settings.store_retry_s
        self._last_error = error
        if self._down_since is None:
            self._down_since = now
            self._last_log = 0.0

    def _recovered(self) -> None:
        if self._down_since is not None:
            self._retry_at = 0.0  # the probe answered: every request uses the store again
            log.warning(
                "limits store is reachable again after %.1f s; %d request(s) were decided without it",
                time.monotonic() - self._down_since,
                self._unlogged,
            )
            self._down_since = None
            self._unlogged = 0

    def _log_degraded(self) -> None:
        self._unlogged += 1
        now = time.monotonic()
        if now - self._last_log >= _LOG_EVERY_S:
            self._last_log = now
            if self.settings.failure_policy == "fail_open":
                how = f"admitting on local limits (each limit / {self.settings.replicas})"
            else:
                how = "answering 503"
            log.error("limits store unavailable (%s): %s, %s", self._last_error, self.settings.failure_policy, how)
