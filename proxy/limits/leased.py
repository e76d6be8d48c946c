"""Leased admission (``limits.admission: leased``): most requests are admitted without Redis.

Each worker keeps, per counter key, an **allotment**: an amount already reserved in Redis
that it may hand out locally. A request whose every check fits in this worker's live
allotments is admitted with no Redis round trip. Any other request takes the exact path
(one ``EVALSHA`` reserving its own costs, ``RedisBackend.reserve_granting``) and asks in the
same call for new allotments for the checks that lack one; a request lacking an allotment
whose grant is in flight waits for that call and looks again. Design and trade-offs:
``docs/proposals/leased-admission.md``.

* **Granting** (in the script): a check is granted ``min(want, (limit - used - cost) /
  (factor + 1))`` with ``factor = 4 x limits.replicas``, so at least four times what all
  the deployment's workers may hold stays free; nothing when that is under the check's
  ``Check.least`` (50 requests, 50,000 tokens, 10 slots, $0.50), so small limits keep the
  exact path. ``want`` is twice the most this worker's previous allotment of that key had
  out at once, and at least ``least``.
* **Counting.** An allotment is an ordinary reservation: a window's is counted in the
  current bucket, a hold's (slots, budgets) is member ``r:<rid>+`` of the hold, leased for
  the allotment's life plus ``limits.lease_s``. Nothing is ever admitted beyond a limit;
  other workers may be refused while capacity sits in this worker's allotments (at most
  1/``factor`` of what was free when granted, for at most ``LIFE_MS``).
* **Life.** An allotment admits for ``LIFE_MS`` (1 s), and a window's only within its
  bucket (100 ms buckets for per-second windows). Then it is **returned**, in the
  background (``SWEEP_S``): a window's unused part is subtracted from its bucket; a hold
  shrinks to what its requests in flight still hold, and goes when the last settles.
* **Settling** a locally admitted request needs no Redis call of its own: its token window
  correction (in the allotment's bucket) and budget spend (moved from the allotment to
  ``spent``) join an outbox that the sweeper sends with the returns, coalesced per counter
  (``coalesce``) into one ``SETTLE`` per hash tag, every ``SWEEP_S``; a slot goes back to the
  allotment. Until then Redis still counts the request's reservation, so the counters lag
  actual use only where it exceeded the reservation, by at most a sweep. Budget alerts come
  from the batch's result (``on_spent``): each threshold is still seen by one batch.
* **Headers.** ``x-ratelimit-remaining-*`` of a locally admitted request is what Redis
  reported at the grant minus this worker's use since; limits and resets are exact.

Failures: while the store fails, nothing is admitted locally (every request reaches the
store, so the failover sees the outage and its probe is real); a batch the store did not
take also stops local admission until a request's own call succeeds. A grant call that
fails or is cancelled raises like ``reserve`` and what it may have granted is taken back
later (``retry_s``; idempotent, so harmless when it never ran). Each batch is sent with a
once-marker (SETTLE's ``once_ms``, ``proxy.limits.lua``), so one that failed or was
cancelled, perhaps after Redis ran it, is sent again (``retry_s`` later, up to
``_RETRY_ATTEMPTS`` times, and once more at shutdown) and still counts once; a repeat
returns the first try's result, so its budget alerts still fire once. A batch given up on
ends with its windows or leases. A worker that dies leaves its allotments, and its
outbox's corrections, counted until their window passes or their lease ends.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from proxy.limits.backend import Check, CheckState, Decision, Release
from proxy.limits.redis import RedisBackend
from proxy.store import StoreUnavailable

__all__ = ["LIFE_MS", "SWEEP_S", "LeasedBackend", "coalesce"]

log = logging.getLogger("proxy.limits")

LIFE_MS = 1000
SWEEP_S = 0.1
_FACTOR_PER_REPLICA = 4
_CLOSE = 1  # ``Release.bucket`` of a hold allotment release: release all of it and delete it
_RETRY_ATTEMPTS = 3
_MAX_KEYS = 10_000


@dataclass(slots=True, eq=False)
class _Allotment:
    """One key's allotment in this worker. Amounts in the counter's unit; times Unix ms."""

    key: str
    aid: str  # the grant's id: a hold's member ``r:<aid>``, a window's record ``a:<aid>``
    window: bool
    bucket: int  # a window's bucket holding the grant
    granted: int
    left: int  # still to hand out
    low: int  # the least ``left`` has been (sizes the next grant)
    expires_ms: int  # admits until then
    used: int  # the counter's use as Redis reported it at the grant, without the grant
    spent: int  # a hold's ``spent`` then
    reset_at_ms: int  # a window's end then
    inflight: int = 0  # a hold's requests admitted from it and not settled yet
    returned: bool = False


class _Resend(NamedTuple):
    """A settlement to send (again) under its once id, not before ``due`` (monotonic s)."""

    releases: list[Release]
    once: str
    tries: int  # failed this many times already
    due: float
    first: float  # when it was first sent (monotonic s): its marker lives ``once_ms`` from then


class _Taken(NamedTuple):
    """What a locally admitted request took: one allotment and cost per check."""

    allotments: tuple[_Allotment, ...]
    costs: tuple[int, ...]


def _tag(key: str) -> str:
    """The Redis Cluster hash tag of a counter key (``{t:team}``), its settlement's slot."""
    start = key.find("{")
    return key[start : key.find("}", start) + 1] if start >= 0 else key


def coalesce(releases: Sequence[Release]) -> list[Release]:
    """``releases`` as one release per window bucket and per allotment, in that order of
    first appearance: window deltas summed (SETTLE's kind 1), an allotment's amounts and
    spends summed, and closing when any of them closes it (kind 3: closing releases all of it,
    so the amounts no longer matter); a window allotment's return (kind 4) is kept as is."""
    merged: dict[tuple[str, int | str], Release] = {}
    for release in releases:
        if release.window and release.allotment:
            merged[(release.key, "a:" + release.allotment)] = release
            continue
        slot = (release.key, release.bucket if release.window else release.allotment)
        prev = merged.get(slot)
        if prev is None:
            merged[slot] = release
        else:
            merged[slot] = prev._replace(
                bucket=max(prev.bucket, release.bucket) if not release.window else prev.bucket,
                delta=prev.delta + release.delta,
                spend=prev.spend + release.spend,
            )
    return list(merged.values())


class LeasedBackend:
    """A ``Backend`` admitting from allotments of ``inner``'s counters (see the module doc).

    ``replicas``: worker processes sharing the store (``limits.replicas``); ``retry_s``:
    how long after a failure a settlement or return is sent again, and what a failed grant
    call may have granted is taken back. Counters: ``local_admissions`` (also reported to
    ``on_local_admission``), ``grants`` (allotments received), ``resend_failures``
    (tries of batches the store did not take, and settlements after ``aclose``; also
    reported to ``on_settle_failure``).
    """

    name = "redis"

    def __init__(
        self,
        inner: RedisBackend,
        replicas: int,
        *,
        retry_s: float = 1.0,
        life_ms: int = LIFE_MS,
        sweep_s: float = SWEEP_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.inner = inner
        self.factor = _FACTOR_PER_REPLICA * replicas
        self.life_ms = life_ms
        self.sweep_s = sweep_s
        self.retry_s = retry_s
        self._clock = clock
        self._live: dict[str, _Allotment] = {}
        self._taken: dict[str, _Taken] = {}
        self._granting: dict[str, asyncio.Future[None]] = {}  # key -> done when its grant call is over
        self._peaks: dict[str, int] = {}  # the most a key's last allotment had out at once
        self._denied: dict[str, int] = {}  # key -> until when (Unix ms) no grant is asked for it
        self._outbox: list[Release] = []  # local settlements and returns, sent by the next sweep
        self._resend: list[_Resend] = []  # failed settlements and returns, to send again
        self.wid = secrets.token_hex(6)  # this worker, in its batches' once ids
        self._batches = 0  # numbers each batch of returns: its once id
        # a once-marker outlives every retry of its settlement
        self._once_ms = int(1000 * (_RETRY_ATTEMPTS + 1) * (retry_s + sweep_s + inner.timeout_s)) + 5000
        self._store_down = False  # the last store call failed: admit nothing locally until one works
        self._closed = False  # aclose sent the last batch
        self._sweeper: asyncio.Task[None] | None = None
        self.local_admissions = 0
        self.grants = 0
        self.resend_failures = 0
        self.on_local_admission: Callable[[], None] | None = None  # e.g. a Prometheus counter's ``inc``
        # (budget key, spent before, spent after) in nano-USD, for each budget spend a batch applied
        self.on_spent: Callable[[str, int, int], None] | None = None
        self.on_settle_failure: Callable[[], None] | None = None  # each batch try the store did not take

    # -- admission ------------------------------------------------------------------

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
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep(), name="limits-allotments")
        if dry:
            return await self.inner.reserve(checks, rid, now_ms, lease_ms, dry=True, shape=shape)
        if self._store_down or not checks:  # while the store fails every request probes it
            return await self._exact(checks, rid, now_ms, lease_ms, shape)
        live = self._live
        for waited in (False, True):
            taken: list[_Allotment] = []
            for check in checks:
                allotment = live.get(check.key)
                if allotment is None or now_ms >= allotment.expires_ms or allotment.left < check.cost:
                    break
                taken.append(allotment)
            else:
                return self._admit(checks, taken, rid, now_ms)
            # an allotment for this key is being granted: wait for it rather than take the
            # exact path (at a per-second window's bucket change every request in flight would)
            grant = self._granting.get(check.key)
            if grant is None or waited or not self._leasable(checks, now_ms):
                break
            await asyncio.shield(grant)
            if self._store_down:  # that call failed: this request probes the store itself
                break
            now_ms = int(self._clock() * 1000)
        return await self._reserve_granting(checks, rid, now_ms, lease_ms, shape)

    def _leasable(self, checks: Sequence[Check], now_ms: int) -> bool:
        """Whether every check may be leased now: none is too small a limit to grant its
        least, nor was just refused an allotment (else allotments for the others would only
        sit idle)."""
        denied = self._denied
        factor = self.factor + 1
        return all(c.least and c.least * factor <= c.limit and now_ms >= denied.get(c.key, 0) for c in checks)

    def _admit(self, checks: Sequence[Check], taken: list[_Allotment], rid: str, now_ms: int) -> Decision:
        states = []
        for check, allotment in zip(checks, taken, strict=True):
            allotment.left -= check.cost
            allotment.low = min(allotment.low, allotment.left)
            reset = 0
            if allotment.window:
                reset = max(0, allotment.reset_at_ms - now_ms)
            else:
                allotment.inflight += 1
            used = allotment.used + allotment.granted - allotment.left
            states.append(CheckState(used, allotment.spent, reset, 0, allotment.bucket))
        self._taken[rid] = _Taken(tuple(taken), tuple([c.cost for c in checks]))
        self.local_admissions += 1
        if self.on_local_admission is not None:
            self.on_local_admission()
        return Decision(True, tuple(states))

    async def _exact(
        self, checks: Sequence[Check], rid: str, now_ms: int, lease_ms: int, shape: Hashable | None
    ) -> Decision:
        try:
            decision = await self.inner.reserve(checks, rid, now_ms, lease_ms, shape=shape)
        except StoreUnavailable:
            self._store_down = True
            raise
        self._store_down = False
        return decision

    async def _reserve_granting(
        self, checks: Sequence[Check], rid: str, now_ms: int, lease_ms: int, shape: Hashable | None
    ) -> Decision:
        if self._store_down or not self._leasable(checks, now_ms):
            return await self._exact(checks, rid, now_ms, lease_ms, shape)
        denied = self._denied
        wants = []
        for check in checks:
            want = 0
            if check.key not in self._granting:
                allotment = self._live.get(check.key)
                if allotment is None:
                    want = max(check.least, 2 * self._peaks.get(check.key, 0))
                elif now_ms >= allotment.expires_ms or allotment.left < check.cost:
                    want = max(check.least, 2 * (allotment.granted - allotment.low))
            wants.append(want)
        if not any(wants):
            return await self._exact(checks, rid, now_ms, lease_ms, shape)
        asked = [c.key for c, w in zip(checks, wants, strict=True) if w]
        granting = asyncio.get_running_loop().create_future()
        for key in asked:
            self._granting[key] = granting
        try:
            decision, grants = await self.inner.reserve_granting(
                checks, wants, rid, now_ms, lease_ms, factor=self.factor, life_ms=self.life_ms, shape=shape
            )
        except BaseException as exc:  # failed or cancelled: take back whatever it may have granted
            if isinstance(exc, StoreUnavailable):
                self._store_down = True
            aid = rid + "+"
            undo = [
                Release(c.key, True, 0, -1, 0, aid) if c.window is not None else Release(c.key, False)
                for c, w in zip(checks, wants, strict=True)
                if w
            ]
            # idempotent, and nothing when the call never ran: sent with the queued retries
            now = time.monotonic()
            self._resend.append(_Resend(undo, aid, 0, now + self.retry_s, now))
            raise
        finally:
            for key in asked:
                del self._granting[key]
            granting.set_result(None)
        self._store_down = False
        if not decision.admitted:
            return decision
        states = list(decision.states)
        for i, (check, want, granted) in enumerate(zip(checks, wants, grants, strict=True)):
            if granted <= 0:
                if want:  # too little left to lease: this key stays exact for an allotment's life
                    if len(denied) >= _MAX_KEYS:
                        denied.clear()
                    denied[check.key] = now_ms + self.life_ms
                continue
            state = states[i]
            used = state.used - granted
            states[i] = state._replace(used=used)
            old = self._live.get(check.key)
            if old is not None:
                self._retire(old)
            window = check.window
            expires = now_ms + self.life_ms
            if window is not None:
                expires = min(expires, (state.bucket + 1) * window.bucket_ms)
            self._live[check.key] = _Allotment(
                key=check.key,
                aid=rid + "+",
                window=window is not None,
                bucket=state.bucket,
                granted=granted,
                left=granted,
                low=granted,
                expires_ms=expires,
                used=used,
                spent=state.spent,
                reset_at_ms=now_ms + state.reset_ms,
            )
            self.grants += 1
        return Decision(True, tuple(states))

    # -- settlement -----------------------------------------------------------------

    async def add_spend(self, keys: Sequence[str], delta: int) -> list[int]:
        return await self.inner.add_spend(keys, delta)  # budgets' spend is Redis's, allotments or not

    async def settle(
        self, releases: Sequence[Release], rid: str, now_ms: int, *, shape: Hashable | None = None
    ) -> list[int]:
        taken = self._taken.pop(rid, None)
        if taken is None:
            return await self.inner.settle(releases, rid, now_ms, shape=shape)
        if self._closed:  # after shutdown's last batch: nothing would send it
            self._count_failure()
            log.warning("request %s settled after the limits store closed: its reservation ends with its lease", rid)
            return []
        of_key = {a.key: (a, cost) for a, cost in zip(taken.allotments, taken.costs, strict=True)}
        outbox = self._outbox
        for release in releases:
            if release.window:
                if release.delta:
                    outbox.append(release)
                continue
            allotment, cost = of_key[release.key]
            allotment.inflight -= 1
            if allotment.returned:  # shrunk to its requests in flight: this one's part goes
                if allotment.inflight <= 0:
                    outbox.append(Release(release.key, False, _CLOSE, 0, release.spend, allotment.aid))
                else:
                    outbox.append(Release(release.key, False, 0, cost, release.spend, allotment.aid))
            else:
                # the allotment gives back at most this request's reservation, so it still
                # covers the others in flight when the spend exceeds it (``spent`` gets all)
                moved = min(release.spend, cost)
                allotment.left += cost - moved
                if release.spend:
                    outbox.append(Release(release.key, False, 0, moved, release.spend, allotment.aid))
        return []

    # -- returning --------------------------------------------------------------------

    def _retire(self, allotment: _Allotment) -> None:
        """Stop admitting from ``allotment`` and queue the return of its unused part."""
        if allotment.returned:
            return
        allotment.returned = True
        if self._live.get(allotment.key) is allotment:
            del self._live[allotment.key]
        if len(self._peaks) >= _MAX_KEYS:
            self._peaks.clear()
        self._peaks[allotment.key] = allotment.granted - allotment.low
        left, allotment.left = max(0, allotment.left), 0
        if allotment.window:  # always: the return also deletes the grant's record
            self._outbox.append(Release(allotment.key, True, allotment.bucket, left, 0, allotment.aid))
        elif allotment.inflight <= 0:
            self._outbox.append(Release(allotment.key, False, _CLOSE, 0, 0, allotment.aid))
        elif left > 0:
            self._outbox.append(Release(allotment.key, False, 0, left, 0, allotment.aid))

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_s)
            try:
                now_ms = int(self._clock() * 1000)
                for allotment in [a for a in self._live.values() if now_ms >= a.expires_ms]:
                    self._retire(allotment)
                await self._send_queued(now_ms)
            except Exception:  # the sweeper must outlive any one failure
                log.exception("returning expired allotments failed")

    async def _send_queued(self, now_ms: int, *, all_due: bool = False) -> None:
        """Send the outbox (local settlements and returns), coalesced into one batch per hash
        tag, and the failed batches that are due again (all of them with ``all_due``), all at
        once, each under its once id: a failed one is queued again ``retry_s`` later, up to
        ``_RETRY_ATTEMPTS`` tries (a cancelled one always: shutdown sends it), and counts once
        even when a failed try ran; one given up on, or too old to be sent safely again
        (its marker may be gone), ends with its windows or leases."""
        if not self._outbox and not self._resend:
            return
        groups: dict[str, list[Release]] = {}
        for release in self._outbox:
            groups.setdefault(_tag(release.key), []).append(release)
        self._outbox = []
        now = time.monotonic()
        # a try that could still run after its first try's marker ends must not be sent
        stale = now + self.inner.timeout_s + 1.0 - self._once_ms / 1000
        pending, waiting = [], []
        for item in self._resend:
            if item.first < stale:
                log.warning("a limits settlement was not taken in time: given up, it ends with its window or lease")
            elif all_due or item.due <= now:
                pending.append(item)
            else:
                waiting.append(item)
        self._resend = waiting
        for group in groups.values():
            self._batches += 1
            pending.append(_Resend(coalesce(group), f"{self.wid}:{self._batches}", 0, now, now))
        if pending:
            await asyncio.gather(*[self._send(item, now_ms) for item in pending])

    async def _send(self, item: _Resend, now_ms: int) -> None:
        """One try of a queued settlement; a spend it applied goes to ``on_spent``."""
        try:
            spents = await self.inner.settle(item.releases, item.once, now_ms, once_ms=self._once_ms, defer=False)
        except BaseException as exc:  # failed, or cancelled (shutdown): it may have run
            self._count_failure()
            failed = isinstance(exc, StoreUnavailable)
            if not failed or item.tries + 1 < _RETRY_ATTEMPTS:
                self._resend.append(item._replace(tries=item.tries + 1, due=time.monotonic() + self.retry_s))
            else:
                log.warning(
                    "a limits settlement failed %d times: given up, it ends with its window or lease", item.tries + 1
                )
            if not failed:
                raise
            self._store_down = True  # admit nothing locally until a request's own call succeeds
            log.debug("settlement not taken (%s): sent again later", exc)
            return
        on_spent = self.on_spent
        if on_spent is None:
            return
        for release, spent in zip(item.releases, spents, strict=True):
            if release.spend > 0 and spent >= 0 and not release.window:  # -1: not applied
                try:
                    on_spent(release.key, spent - release.spend, spent)
                except Exception:
                    log.exception("reporting a budget's spend failed")

    def _count_failure(self) -> None:
        self.resend_failures += 1
        if self.on_settle_failure is not None:
            self.on_settle_failure()

    # -- life cycle -------------------------------------------------------------------

    async def warm(self) -> None:
        """Load the scripts now (never raises)."""
        await self.inner.warm()

    async def aclose(self) -> None:
        """Return every allotment (bounded by the store's timeout), then close ``inner``."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None
        for allotment in list(self._live.values()):
            self._retire(allotment)
        for _ in range(3):  # settlements that come in meanwhile go too
            await self._send_queued(int(self._clock() * 1000), all_due=True)
            if not self._outbox:
                break
        self._closed = True
        await self.inner.aclose()
