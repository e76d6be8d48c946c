"""Counters in process memory: the Lua scripts of ``proxy.limits.lua``, step for step in Python.

For one process (the embedded store) and for the local fail-open limits while Redis is
down. ``reserve`` and ``settle`` never await, so each runs atomically on the event loop.
Counters expire as their Redis keys would (``expires``, Unix ms; 0 = never) and expired
ones are swept every few thousand calls. A hold and its lease live in one object here, so
the script's dropping of holds whose lease set was lost has nothing to mirror.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from proxy.limits.backend import Check, CheckState, Decision, Release
from proxy.limits.policy import Window

__all__ = ["MemoryBackend"]

_SWEEP_EVERY = 4096
_LEASE_GRACE_MS = 60_000


@dataclass(slots=True)
class _Win:
    buckets: dict[int, int] = field(default_factory=dict)
    total: int = 0
    expires: int = 0

    def retry_ms(self, need: int, window: Window, now: int) -> int:
        freed = 0
        for b in sorted(self.buckets):
            freed += self.buckets[b]
            if freed >= need:
                return (b + window.buckets + 1) * window.bucket_ms - now
        return -1


@dataclass(slots=True)
class _Hold:
    spent: int = 0
    held: int = 0
    holds: dict[str, tuple[int, int]] = field(default_factory=dict)  # rid -> (amount, lease end ms)
    leases: list[tuple[int, str]] = field(default_factory=list)  # heap of (lease end ms, rid): the ZSET
    expires: int = 0

    def purge(self, now: int) -> None:
        leases = self.leases
        while leases and leases[0][0] <= now:
            _, rid = heapq.heappop(leases)
            held = self.holds.pop(rid, None)
            if held is not None:
                self.held -= held[0]

    def release(self, rid: str) -> tuple[int, int] | None:
        """Drop ``rid``'s hold (ZREM): its heap entry goes lazily, and the heap is rebuilt
        from the live holds once most of it is settled entries, so it stays within about
        twice the holds in flight rather than every request of the last lease period."""
        held = self.holds.pop(rid, None)
        if held is not None:
            self.held -= held[0]
            if len(self.leases) > 2 * len(self.holds) + 64:
                self.leases = [(end, r) for r, (_, end) in self.holds.items()]
                heapq.heapify(self.leases)
        return held

    def first_lease(self) -> int | None:
        while self.leases and self.leases[0][1] not in self.holds:
            heapq.heappop(self.leases)  # settled already (ZREM)
        return self.leases[0][0] if self.leases else None


class MemoryBackend:
    """The in-process ``Backend`` (see ``proxy.limits.backend`` for the semantics)."""

    name = "memory"

    def __init__(self) -> None:
        self._windows: dict[str, _Win] = {}
        self._holds: dict[str, _Hold] = {}
        self._calls = 0

    def _win(self, key: str, now: int) -> _Win:
        win = self._windows.get(key)
        if win is None or (win.expires and win.expires <= now):
            win = self._windows[key] = _Win()
        return win

    def _hold(self, key: str, now: int) -> _Hold:
        hold = self._holds.get(key)
        if hold is None or (hold.expires and hold.expires <= now):
            hold = self._holds[key] = _Hold()
        return hold

    async def reserve(
        self,
        checks: Sequence[Check],
        rid: str,
        now_ms: int,
        lease_ms: int,
        *,
        dry: bool = False,
        shape: Hashable | None = None,
    ) -> Decision:
        self._calls += 1
        if self._calls % _SWEEP_EVERY == 0:
            self._sweep(now_ms)
        states = [self._check_window(c, now_ms) if c.window else self._check_hold(c, now_ms) for c in checks]
        fits = all(s.retry_ms == 0 for s in states)
        if fits and not dry:
            states = [
                (self._take_window(c, s, now_ms) if c.cost > 0 else s)
                if c.window
                else self._take_hold(c, s, rid, now_ms, lease_ms)  # even at zero: settling adds the spend
                for c, s in zip(checks, states, strict=True)
            ]
        return Decision(fits, tuple(states))

    def _check_window(self, check: Check, now: int) -> CheckState:
        window = check.window
        assert window is not None
        g, nb = window.bucket_ms, window.buckets
        b = now // g
        cutoff = b - nb
        win = self._win(check.key, now)
        if win.buckets and min(win.buckets) < cutoff:
            for old in [i for i in win.buckets if i < cutoff]:
                win.total -= win.buckets.pop(old)
        t = win.total
        retry = 0
        if t + check.cost > check.limit:
            retry = -1 if check.cost > check.limit else win.retry_ms(t + check.cost - check.limit, window, now)
        reset = (max(win.buckets) + nb + 1) * g - now if win.buckets else 0
        return CheckState(used=t, reset_ms=reset, retry_ms=retry, bucket=b)

    def _take_window(self, check: Check, state: CheckState, now: int) -> CheckState:
        window = check.window
        assert window is not None
        win = self._win(check.key, now)
        win.buckets[state.bucket] = win.buckets.get(state.bucket, 0) + check.cost
        win.total += check.cost
        reset = (max(win.buckets) + window.buckets + 1) * window.bucket_ms - now
        win.expires = now + reset + 1000
        return CheckState(used=win.total, reset_ms=reset, bucket=state.bucket)

    def _check_hold(self, check: Check, now: int) -> CheckState:
        hold = self._hold(check.key, now)
        hold.purge(now)
        used = hold.spent + hold.held
        retry = 0
        if used + check.cost > check.limit:
            if check.cost > check.limit or hold.spent + check.cost > check.limit:
                retry = -1
            else:
                first = hold.first_lease()
                retry = max(1, first - now) if first is not None else 1
        return CheckState(used=used, spent=hold.spent, retry_ms=retry)

    def _take_hold(self, check: Check, state: CheckState, rid: str, now: int, lease_ms: int) -> CheckState:
        hold = self._hold(check.key, now)
        hold.holds[rid] = (check.cost, now + lease_ms)
        heapq.heappush(hold.leases, (now + lease_ms, rid))
        hold.held += check.cost
        if check.ttl_ms > 0:
            least = max(check.ttl_ms, lease_ms + _LEASE_GRACE_MS)
            if not hold.expires or hold.expires < now + least:  # moved at most once a minute, as in Lua
                hold.expires = now + least + _LEASE_GRACE_MS
        return CheckState(used=state.used + check.cost, spent=state.spent)

    async def settle(
        self, releases: Sequence[Release], rid: str, now_ms: int, *, shape: Hashable | None = None
    ) -> list[int]:
        out = []
        for rel in releases:
            if rel.window:
                win = self._windows.get(rel.key)
                live = win is not None and not (win.expires and win.expires <= now_ms)
                count = win.buckets.get(rel.bucket) if win is not None and live else None
                if win is not None and count is not None and rel.delta:
                    new = max(0, count + rel.delta)
                    win.buckets[rel.bucket] = new
                    win.total += new - count
                out.append(0)
                continue
            hold = self._hold(rel.key, now_ms)
            held = hold.release(rid)
            if rel.spend > 0 and held is not None:  # spend once: only while the hold exists
                hold.spent += rel.spend  # the expiry stays: the take set it past the period's end
            out.append(hold.spent)
        return out

    async def add_spend(self, keys: Sequence[str], delta: int) -> list[int]:
        out = []
        for key in keys:
            hold = self._holds.get(key)
            if hold is not None:
                hold.spent = max(0, hold.spent + delta)
            out.append(-1 if hold is None else hold.spent)
        return out

    def _sweep(self, now: int) -> None:
        for key in [k for k, w in self._windows.items() if (w.expires and w.expires <= now) or not w.buckets]:
            del self._windows[key]
        for key in [k for k, h in self._holds.items() if (h.expires and h.expires <= now) or not (h.holds or h.spent)]:
            del self._holds[key]
