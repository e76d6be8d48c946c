"""Leased admission (``limits.admission: leased``) on a real redis-server and Redis Cluster.

Workers are limiters on one event loop sharing one store, each with its own allotments,
as separate processes would have.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis as sync_redis

from proxy.errors import QuotaExceeded, RateLimited
from proxy.limits import Limiter
from proxy.limits.backend import Release
from proxy.limits.leased import LeasedBackend, coalesce
from proxy.limits.pricing import NANO
from proxy.store import Store, StoreUnavailable
from proxy.store.redis import cluster_url
from proxy.types import Ticket, Usage

from .limits_support import FakeClock, call, limiter, open_test_store, plan, principal, record

ALICE = principal("alice")
KEY = f"orp:{{k:{ALICE.key_id}}}:k:{ALICE.key_id}"
BUDGET_100 = {"tiers": {"t": {"budget_usd_per_day": 100}}}  # $100 a day: room to lease


def leased(lim: Limiter) -> LeasedBackend:
    backend = lim.failover.backend
    assert isinstance(backend, LeasedBackend)
    return backend


def run(
    url: str,
    spec: dict[str, Any],
    body: Callable[..., Awaitable[Any]],
    workers: int = 1,
    **settings: Any,
) -> Any:
    """``body(limiters, store)`` with ``workers`` leased limiters on one fresh store."""
    settings = {"store_timeout_ms": 5000, "admission": "leased", "replicas": workers, **settings}

    async def main() -> Any:
        store = open_test_store(url)
        lims = [limiter(store, spec, **settings) for _ in range(workers)]
        for lim in lims:
            await lim.start()
        try:
            return await body(lims, store)
        finally:
            for lim in lims:
                await lim.aclose()
            await store.aclose()

    return asyncio.run(main())


async def admit(lim: Limiter, **kw: Any) -> Ticket | RateLimited:
    try:
        return await lim.admit(kw.pop("who", ALICE), call(**kw), plan())
    except RateLimited as exc:
        return exc


async def admit_alice(lim: Limiter, n: int) -> list[Ticket]:
    """``n`` of ALICE's requests (10 output tokens each), admitted one after the other."""
    return [await lim.admit(ALICE, call(max_tokens=10), plan()) for _ in range(n)]


async def settle(lims: list[Limiter], ticket: Ticket, rec: Any) -> None:
    """Settle ``ticket`` on the worker that admitted it."""
    for lim in lims:
        if ticket.state is not None and ticket.state.backend is lim.failover.backend:
            await lim.settle(ticket, rec)
            return
    raise AssertionError("no worker admitted this ticket")


async def until(probe: Callable[[], Any], seconds: float = 5.0) -> Any:
    """Poll ``probe`` until it returns something truthy (the sweeper runs every 100 ms)."""
    result = None
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            while not (result := probe()):  # noqa: ASYNC110 (polling Redis: nothing to wait on)
                await asyncio.sleep(0.02)
    return result


def evalsha_calls(url: str) -> int:
    client = sync_redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats").get("cmdstat_evalsha", {})
        return int(stats.get("calls", 0))
    finally:
        client.close()


def redis_hash(url: str, key: str) -> dict[str, str]:
    """The hash ``key`` of the redis-server or Redis Cluster behind ``url``."""
    plain = cluster_url(url)
    client = (
        sync_redis.RedisCluster.from_url(plain, decode_responses=True)
        if plain is not None
        else sync_redis.Redis.from_url(url, decode_responses=True)
    )
    try:
        return client.hgetall(key)
    finally:
        client.close()


def test_most_admissions_skip_redis_and_the_counts_stay_exact(fresh_redis: str) -> None:
    spec = {
        "tiers": {
            "t": {
                "requests_per_minute": 100_000,
                "tokens_per_minute": 10_000_000,
                "concurrent_requests": 1000,
                "budget_usd_per_day": 100,
            }
        }
    }
    cost = 0.00002

    async def body(lims: list[Limiter], store: Store) -> None:
        (lim,) = lims
        before = evalsha_calls(fresh_redis)
        remaining = []
        for _ in range(300):
            ticket = await lim.admit(ALICE, call(max_tokens=50), plan())
            remaining.append(int(dict(ticket.headers)[b"x-ratelimit-remaining-requests"]))
            await lim.settle(ticket, record(Usage(8, 12, 20, cost_usd=cost)))
        backend = leased(lim)
        assert backend.local_admissions >= 290
        # one worker alone: its remaining counts are exact
        assert remaining == [100_000 - i for i in range(1, 301)]
        # the settlements reach Redis in the sweeper's batches (every 100 ms), not one call each
        spent = await until(lambda: int(redis_hash(fresh_redis, budget_of_day(clock))["spent"]) == 300 * cost * NANO)
        assert spent, redis_hash(fresh_redis, budget_of_day(clock))
        calls = evalsha_calls(fresh_redis) - before
        assert calls <= 40, calls  # a few grants and batches for 300 admissions and settlements
        await backend.aclose()  # returns every allotment
        requests = redis_hash(fresh_redis, f"{KEY}:requests_per_minute")
        tokens = redis_hash(fresh_redis, f"{KEY}:tokens_per_minute")
        assert int(requests["t"]) == 300
        assert int(tokens["t"]) == 300 * 20
        budget = redis_hash(fresh_redis, budget_of_day(clock))
        for hold in (budget, redis_hash(fresh_redis, f"{KEY}:concurrent_requests")):
            assert int(hold["held"]) == 0, hold
            assert not [f for f in hold if f.startswith("r:")], hold
        assert int(budget["spent"]) == round(300 * cost * NANO)

    clock = FakeClock(time.time())  # a real clock's day, advanced by hand
    run(fresh_redis, spec, body, clock=clock)


def budget_of_day(clock: FakeClock) -> str:
    """ALICE's ``budget_usd_per_day`` counter key on ``clock``'s day."""
    return f"{KEY}:budget_usd_per_day:{time.strftime('%Y-%m-%d', time.gmtime(clock.now))}"


@pytest.fixture(params=["redis", "redis-cluster"])
def redis_store(request: pytest.FixtureRequest) -> str:
    """An emptied redis-server, and an emptied three-node Redis Cluster."""
    url: str = request.getfixturevalue("fresh_redis" if request.param == "redis" else "fresh_cluster")
    return url


def test_workers_never_admit_beyond_a_limit_together(redis_store: str) -> None:
    store_url = redis_store
    limit = 2000

    async def body(lims: list[Limiter], store: Store) -> None:
        waves = []
        for _ in range(60):  # waves of 40 requests at once, spread over the workers and keys
            results = await asyncio.gather(
                *(admit(lims[i % 3], who=principal(f"k{i % 5}", team="red")) for i in range(40))
            )
            waves.append(sum(isinstance(r, Ticket) for r in results))
        admitted = sum(waves)
        assert admitted <= limit
        # allotments other workers hold may refuse a request, by at most what the grant
        # rule lets them hold: each under 1/(factor + 1) of the limit
        factor = leased(lims[0]).factor
        assert admitted >= limit - len(lims) * limit / (factor + 1), waves
        assert sum(leased(lim).local_admissions for lim in lims) > admitted / 2
        for lim in lims:
            await leased(lim).aclose()
        if "cluster" not in store_url:
            team = redis_hash(store_url, "orp:{t:red}:t:red:requests_per_day")
            assert int(team["t"]) == admitted  # every allotment returned: the count is exact

    spec = {"teams": {"red": "team"}, "tiers": {"t": {}, "team": {"requests_per_day": limit}}}
    run(store_url, spec, body, workers=3)


def test_spend_is_exact_when_workers_finish_a_budget(fresh_redis: str) -> None:
    # worst case of one call: ceil(6 x 1.2) x 0.15e-6 + 10,000 x 0.6e-6 = ~6,001 micro-USD
    budget = 10.0
    cost = 0.005

    async def body(lims: list[Limiter], store: Store) -> None:
        spent, waited = 0, False
        while True:
            results = await asyncio.gather(*(admit(lims[i % 2], max_tokens=10_000) for i in range(40)))
            tickets = [r for r in results if isinstance(r, Ticket)]
            assert all(isinstance(r, QuotaExceeded) for r in results if not isinstance(r, Ticket))
            await asyncio.gather(*(settle(lims, t, record(Usage(7, 90, 97, cost_usd=cost))) for t in tickets))
            spent += len(tickets)
            if not tickets:
                if waited:
                    break
                await asyncio.sleep(1.3)  # the allotments still held expire and are returned
                waited = True
        assert spent * cost <= budget
        assert spent * cost > budget - 0.012  # nothing stranded: all but the last worst case
        assert sum(leased(lim).local_admissions for lim in lims) > spent / 2
        for lim in lims:
            await leased(lim).aclose()
        hold = redis_hash(fresh_redis, f"{KEY}:budget_usd_per_day:{time.strftime('%Y-%m-%d', time.gmtime())}")
        assert int(hold["spent"]) == round(spent * cost * NANO)
        assert int(hold["held"]) == 0

    run(fresh_redis, {"tiers": {"t": {"budget_usd_per_day": budget}}}, body, workers=2)


def test_tickets_settled_by_the_wrong_ticket_order_still_balance(fresh_redis: str) -> None:
    """Requests settle after their allotment was returned: the hold shrinks to them, then goes."""
    clock = FakeClock(time.time())

    async def body(lims: list[Limiter], store: Store) -> None:
        (lim,) = lims
        tickets = await admit_alice(lim, 20)
        assert leased(lim).local_admissions >= 18
        clock.advance(1.5)  # the allotment expires; the sweeper returns its unused part
        slots = await until(lambda: (h := redis_hash(fresh_redis, f"{KEY}:concurrent_requests"))["held"] == "20" and h)
        assert int(slots["held"]) == 20  # exactly the requests still in flight
        for ticket in tickets:
            await lim.settle(ticket, record(Usage(1, 1, 2, cost_usd=0.00001)))
        slots = await until(lambda: (h := redis_hash(fresh_redis, f"{KEY}:concurrent_requests"))["held"] == "0" and h)
        assert slots and not [f for f in slots if f.startswith("r:")]
        budget = redis_hash(fresh_redis, budget_of_day(clock))
        assert int(budget["held"]) == 0 and int(budget["spent"]) == 20 * 10_000

    spec = {"tiers": {"t": {"concurrent_requests": 500, "budget_usd_per_day": 100}}}
    run(fresh_redis, spec, body, clock=clock)


def test_a_dead_worker_s_allotments_end_with_their_lease(fresh_redis: str) -> None:
    clock = FakeClock(time.time())

    async def body(lims: list[Limiter], store: Store) -> None:
        dead, alive = lims
        ticket = await dead.admit(ALICE, call(), plan())
        assert leased(dead).grants == 1
        backend = leased(dead)
        assert backend._sweeper is not None
        backend._sweeper.cancel()  # the worker dies: nothing is returned or settled
        backend._live.clear()
        del ticket
        taken = [r for r in [await admit(alive) for _ in range(100)] if isinstance(r, Ticket)]
        assert len(taken) == 100 - 1 - 10  # its request and its allotment of 10 stay held
        for ticket in taken:
            await alive.settle(ticket, record())
        clock.advance(119)
        assert len([r for r in [await admit(alive) for _ in range(100)] if isinstance(r, Ticket)]) == 89
        clock.advance(3)  # past the request's lease (120 s) and the allotment's (121 s)
        assert len([r for r in [await admit(alive) for _ in range(100)] if isinstance(r, Ticket)]) == 100 - 89

    run(fresh_redis, {"tiers": {"t": {"concurrent_requests": 100}}}, body, workers=2, clock=clock, lease_s=120)


def test_requests_wait_for_a_grant_in_flight_instead_of_going_exact(fresh_redis: str) -> None:
    async def body(lims: list[Limiter], store: Store) -> None:
        (lim,) = lims
        backend = leased(lim)
        granting = backend.inner.reserve_granting

        async def slow(*args: Any, **kwargs: Any) -> Any:
            await asyncio.sleep(0.2)
            return await granting(*args, **kwargs)

        backend.inner.reserve_granting = slow  # type: ignore[method-assign]
        before = evalsha_calls(fresh_redis)
        tickets = await asyncio.gather(*(lim.admit(ALICE, call(), plan()) for _ in range(5)))
        assert (backend.grants, backend.local_admissions) == (1, 4)
        assert evalsha_calls(fresh_redis) - before == 1  # the one grant call
        assert backend.grants == 1 and backend.local_admissions == 4
        for ticket in tickets:
            await lim.settle(ticket, record())
        await backend.aclose()
        assert int(redis_hash(fresh_redis, f"{KEY}:requests_per_minute")["t"]) == 5

    clock = FakeClock(time.time())  # stopped: the allotment's bucket does not end while it waits
    run(fresh_redis, {"tiers": {"t": {"requests_per_minute": 100_000}}}, body, clock=clock)


def test_small_limits_keep_the_exact_path(fresh_redis: str) -> None:
    async def body(lims: list[Limiter], store: Store) -> None:
        (lim,) = lims
        results = [await admit(lim) for _ in range(40)]
        assert sum(isinstance(r, Ticket) for r in results) == 30
        assert leased(lim).local_admissions == 0 and leased(lim).grants == 0

    run(fresh_redis, {"tiers": {"t": {"requests_per_minute": 30, "concurrent_requests": 40}}}, body)


def test_a_refusal_near_the_limit_is_exact_too(fresh_redis: str) -> None:
    """Near the limit no allotment is granted: the last requests are decided exactly."""

    async def body(lims: list[Limiter], store: Store) -> None:
        (lim,) = lims
        results = [await admit(lim) for _ in range(1100)]
        admitted = [r for r in results if isinstance(r, Ticket)]
        assert len(admitted) == 1000
        error = next(r for r in results if isinstance(r, RateLimited))
        assert dict(error.headers)[b"x-ratelimit-remaining-requests"] == b"0"
        assert leased(lim).local_admissions > 700

    run(fresh_redis, {"tiers": {"t": {"requests_per_minute": 1000}}}, body)


def test_a_small_limit_beside_large_ones_takes_no_allotments(fresh_redis: str) -> None:
    """No allotment is taken for a request that can never be admitted locally."""

    async def body(lims: list[Limiter], store: Store) -> None:
        (lim,) = lims
        for _ in range(20):
            ticket = await lim.admit(ALICE, call(), plan())
            await lim.settle(ticket, record(Usage(8, 12, 20)))
        assert leased(lim).grants == 0 and leased(lim).local_admissions == 0
        assert int(redis_hash(fresh_redis, f"{KEY}:tokens_per_minute")["t"]) == 20 * 20

    spec = {"tiers": {"t": {"requests_per_minute": 30, "tokens_per_minute": 10_000_000}}}
    run(fresh_redis, spec, body)


def test_a_grant_that_fails_after_redis_ran_it_is_taken_back(fresh_redis: str) -> None:
    async def body(lims: list[Limiter], store: Store) -> None:
        (lim,) = lims
        backend = leased(lim)
        granting = backend.inner.reserve_granting

        async def ran_then_timed_out(*args: Any, **kwargs: Any) -> Any:
            await granting(*args, **kwargs)
            raise StoreUnavailable("Redis did not answer within 5000 ms")

        backend.inner.reserve_granting = ran_then_timed_out  # type: ignore[method-assign]
        await admit(lim)  # the store "failed": fail_open decides locally
        backend.inner.reserve_granting = granting  # type: ignore[method-assign]
        requests = redis_hash(fresh_redis, f"{KEY}:requests_per_day")
        assert int(requests["t"]) == 1 + 50  # the request and the grant Redis ran
        slots = redis_hash(fresh_redis, f"{KEY}:concurrent_requests")
        assert int(slots["held"]) == 1 + 10
        await until(lambda: redis_hash(fresh_redis, f"{KEY}:requests_per_day")["t"] == "1", seconds=5)
        slots = await until(lambda: (h := redis_hash(fresh_redis, f"{KEY}:concurrent_requests"))["held"] == "0" and h)
        assert slots, "the allotment (and the request's own hold, by the failover) were not released"
        assert not [f for f in slots if f.startswith("r:")]
        assert not [f for f in redis_hash(fresh_redis, f"{KEY}:requests_per_day") if f.startswith("a:")]

    spec = {"tiers": {"t": {"requests_per_day": 100_000, "concurrent_requests": 1000}}}
    run(fresh_redis, spec, body, store_retry_s=0.2)


def test_while_the_store_fails_nothing_is_admitted_locally(fresh_redis: str) -> None:
    """The failover's probe must reach Redis, not an allotment, or an outage looks over."""

    async def body(lims: list[Limiter], store: Store) -> None:
        (lim,) = lims
        backend = leased(lim)
        for _ in range(3):
            assert isinstance(await admit(lim), Ticket)
        assert backend.local_admissions == 2
        reserve = backend.inner.reserve

        async def down(*args: Any, **kwargs: Any) -> Any:
            raise StoreUnavailable("connection refused")

        granting = backend.inner.reserve_granting
        backend.inner.reserve = down  # type: ignore[method-assign]
        backend.inner.reserve_granting = down  # type: ignore[method-assign]
        backend._live.clear()  # the allotments expire; the next request goes to Redis
        degraded = await lim.admit(ALICE, call(), plan())
        assert (b"x-proxy-degraded", b"store-unavailable") in degraded.headers
        assert backend._store_down
        await asyncio.sleep(0.25)  # past store_retry_s: the next request probes the store
        probe = await lim.admit(ALICE, call(), plan())
        assert (b"x-proxy-degraded", b"store-unavailable") in probe.headers
        assert lim.state()["degraded"] is True
        assert backend.local_admissions == 2
        backend.inner.reserve = reserve  # type: ignore[method-assign]
        backend.inner.reserve_granting = granting  # type: ignore[method-assign]
        await asyncio.sleep(0.25)
        assert (b"x-proxy-degraded", b"store-unavailable") not in (await lim.admit(ALICE, call(), plan())).headers
        assert lim.state()["degraded"] is False

    spec = {"tiers": {"t": {"requests_per_day": 100_000}}}
    run(fresh_redis, spec, body, store_retry_s=0.2)


def test_spend_above_the_reservation_counts_within_a_sweep_and_keeps_others_covered(fresh_redis: str) -> None:
    clock = FakeClock(time.time())

    async def body(lims: list[Limiter], store: Store) -> None:
        (lim,) = lims
        tickets = await admit_alice(lim, 5)
        assert leased(lim).local_admissions == 4
        await lim.settle(tickets[1], record(Usage(1, 1, 2, cost_usd=0.2)))  # far above its worst case
        # counted with the sweeper's next batch (every 100 ms)
        spent = await until(lambda: redis_hash(fresh_redis, budget_of_day(clock)).get("spent") == "200000000", 1)
        assert spent, redis_hash(fresh_redis, budget_of_day(clock))
        for ticket in tickets[:1] + tickets[2:]:
            await lim.settle(ticket, record(Usage(1, 1, 2, cost_usd=0.00001)))
        await leased(lim).aclose()
        budget = redis_hash(fresh_redis, budget_of_day(clock))
        assert int(budget["spent"]) == 200_000_000 + 4 * 10_000
        assert int(budget["held"]) == 0 and not [f for f in budget if f.startswith("r:")]

    run(fresh_redis, BUDGET_100, body, clock=clock)


def _failing_once(backend: LeasedBackend, *, ran: bool) -> list[str]:
    """Make ``backend``'s next store settlement fail, after Redis ran it when ``ran``; returns
    the once ids (a batch's) or rids of the settlements done (the failed one included), each
    once it is over."""
    settle = backend.inner.settle
    sent: list[str] = []

    async def flaky(releases: Any, rid: str, now_ms: int, **kwargs: Any) -> Any:
        if not sent:
            if ran:
                await settle(releases, rid, now_ms, **kwargs)
            sent.append(rid)
            raise StoreUnavailable("Redis did not answer within 5000 ms")
        result = await settle(releases, rid, now_ms, **kwargs)
        sent.append(rid)
        return result

    backend.inner.settle = flaky  # type: ignore[method-assign]
    return sent


async def settle_in_a_failed_batch(lim: Limiter, ticket: Ticket, cost_usd: float, *, ran: bool) -> list[str]:
    """Settle locally admitted ``ticket`` and wait until the sweeper's batch carrying it
    failed (after Redis ran it when ``ran``); returns ``_failing_once``'s list."""
    sent = _failing_once(leased(lim), ran=ran)
    await lim.settle(ticket, record(Usage(1, 1, 2, cost_usd=cost_usd)))
    assert await until(lambda: sent)
    return sent


@pytest.mark.parametrize("ran", [True, False], ids=["ran-then-timed-out", "never-ran"])
def test_a_failed_batch_of_settlements_is_retried_and_counts_once(redis_store: str, ran: bool) -> None:
    fresh_redis = redis_store  # the once-marker is a key of its own: it must work on a cluster too
    clock = FakeClock(time.time())

    async def body(lims: list[Limiter], store: Store) -> None:
        (lim,) = lims
        backend = leased(lim)
        tickets = await admit_alice(lim, 3)
        assert backend.local_admissions == 2
        sent = await settle_in_a_failed_batch(lim, tickets[1], 0.01, ran=ran)
        assert backend.resend_failures == 1
        assert lim.settle_failures_total == 0  # nothing failed on the request's own path
        budget = redis_hash(fresh_redis, budget_of_day(clock))
        assert int(budget.get("spent", 0)) == (10_000_000 if ran else 0)
        # until a call of its own succeeds, the worker admits nothing locally
        ticket = await lim.admit(ALICE, call(max_tokens=10), plan())
        assert backend.local_admissions == 2
        await lim.settle(ticket, record(Usage(1, 1, 2, cost_usd=0.001)))
        # the retry (store_retry_s later) applies what never ran, and nothing twice
        await until(lambda: sent.count(sent[0]) >= 2)
        await asyncio.sleep(0.3)  # any further retry would have come by now
        assert sent.count(sent[0]) == 2
        budget = redis_hash(fresh_redis, budget_of_day(clock))
        assert int(budget["spent"]) == 10_000_000 + 1_000_000
        for ticket in (tickets[0], tickets[2]):
            await lim.settle(ticket, record(Usage(1, 1, 2, cost_usd=0.02)))
        await backend.aclose()
        budget = redis_hash(fresh_redis, budget_of_day(clock))
        assert int(budget["spent"]) == 11_000_000 + 2 * 20_000_000
        assert int(budget["held"]) == 0 and not [f for f in budget if f.startswith("r:")]
        tokens = redis_hash(fresh_redis, f"{KEY}:tokens_per_minute")
        assert int(tokens["t"]) == 4 * 2  # each request's tokens, corrected once

    spec = {"tiers": {"t": {"budget_usd_per_day": 100, "tokens_per_minute": 10_000_000}}}
    run(fresh_redis, spec, body, clock=clock, store_retry_s=0.2)


def test_a_failed_return_is_sent_again_and_counts_once(fresh_redis: str) -> None:
    """A hold allotment's partial return (requests still in flight) ran, then timed out."""

    async def body(lims: list[Limiter], store: Store) -> None:
        (lim,) = lims
        backend = leased(lim)
        tickets = [await lim.admit(ALICE, call(), plan()) for _ in range(3)]
        assert backend.local_admissions == 2
        granted = backend._live[f"{KEY}:concurrent_requests"].granted
        sent = _failing_once(backend, ran=True)
        backend._retire(backend._live[f"{KEY}:concurrent_requests"])  # shrinks to the 2 in flight
        await until(lambda: len(sent) >= 2)
        slots = redis_hash(fresh_redis, f"{KEY}:concurrent_requests")
        assert sent[0] == sent[1]  # the same batch, under its once id
        assert int(slots["held"]) == 1 + 2  # the exact request's slot and the 2 in flight
        assert granted > 2
        for ticket in tickets:
            await lim.settle(ticket, record(Usage(1, 1, 2)))
        slots = await until(lambda: (h := redis_hash(fresh_redis, f"{KEY}:concurrent_requests"))["held"] == "0" and h)
        assert slots and not [f for f in slots if f.startswith("r:")]

    run(fresh_redis, {"tiers": {"t": {"concurrent_requests": 1000}}}, body)


def test_a_retried_settlement_counts_its_spend_after_its_allotment_closed(fresh_redis: str) -> None:
    clock = FakeClock(time.time())

    async def body(lims: list[Limiter], store: Store) -> None:
        (lim,) = lims
        backend = leased(lim)
        tickets = await admit_alice(lim, 3)
        assert backend.local_admissions == 2
        budget_key = budget_of_day(clock)
        sent = await settle_in_a_failed_batch(lim, tickets[1], 0.01, ran=False)
        backend._retire(backend._live[budget_key])
        await lim.settle(tickets[2], record(Usage(1, 1, 2, cost_usd=0.02)))  # the last: closes it
        aid = tickets[0].state.rid + "+"
        gone = await until(lambda: f"r:{aid}" not in redis_hash(fresh_redis, budget_key))
        assert gone  # the allotment is gone before the retry
        assert sent.count(sent[0]) == 1
        await until(lambda: sent.count(sent[0]) >= 2)
        await lim.settle(tickets[0], record(Usage(1, 1, 2, cost_usd=0.04)))
        budget = redis_hash(fresh_redis, budget_key)
        assert int(budget["spent"]) == 10_000_000 + 20_000_000 + 40_000_000
        assert int(budget["held"]) == 0

    run(fresh_redis, BUDGET_100, body, clock=clock, store_retry_s=0.5)


def test_a_return_outlasts_a_store_outage_of_several_sweeps(fresh_redis: str) -> None:
    """Returns are sent again ``retry_s`` apart, not on every 100 ms sweep."""

    async def body(lims: list[Limiter], store: Store) -> None:
        (lim,) = lims
        backend = leased(lim)
        ticket = await lim.admit(ALICE, call(), plan())  # exact, and granted an allotment
        key = f"{KEY}:concurrent_requests"
        assert int(redis_hash(fresh_redis, key)["held"]) == 1 + backend._live[key].granted
        settle = backend.inner.settle
        up_at = time.monotonic() + 0.7
        tries: list[float] = []

        async def down_for_a_while(*args: Any, **kwargs: Any) -> Any:
            tries.append(time.monotonic())
            if time.monotonic() < up_at:
                raise StoreUnavailable("connection refused")
            return await settle(*args, **kwargs)

        backend.inner.settle = down_for_a_while  # type: ignore[method-assign]
        backend._retire(backend._live[key])  # nothing in flight from it: returned whole
        held = await until(lambda: redis_hash(fresh_redis, key)["held"] == "1", seconds=3)
        assert held, f"the allotment was not returned after the outage (tries at {tries})"
        assert len(tries) <= 3
        await lim.settle(ticket, record(Usage(1, 1, 2)))

    run(fresh_redis, {"tiers": {"t": {"concurrent_requests": 1000}}}, body, store_retry_s=0.4)


def test_a_failed_batch_is_sent_once_more_at_shutdown(fresh_redis: str) -> None:
    clock = FakeClock(time.time())

    async def body(lims: list[Limiter], store: Store) -> None:
        (lim,) = lims
        backend = leased(lim)
        tickets = await admit_alice(lim, 2)
        await settle_in_a_failed_batch(lim, tickets[1], 0.01, ran=False)
        await lim.settle(tickets[0], record(Usage(1, 1, 2, cost_usd=0.02)))
        await backend.aclose()  # long before store_retry_s
        budget = redis_hash(fresh_redis, budget_of_day(clock))
        assert int(budget["spent"]) == 30_000_000
        assert int(budget["held"]) == 0

    run(fresh_redis, BUDGET_100, body, clock=clock, store_retry_s=30)


def test_settlements_waiting_in_the_outbox_are_sent_at_shutdown(fresh_redis: str) -> None:
    clock = FakeClock(time.time())

    async def body(lims: list[Limiter], store: Store) -> None:
        (lim,) = lims
        backend = leased(lim)
        tickets = await admit_alice(lim, 2)
        await lim.settle(tickets[0], record(Usage(1, 1, 2, cost_usd=0.02)))  # exact: sent at once
        settle = backend.inner.settle
        started = asyncio.Event()

        async def hangs(*args: Any, **kwargs: Any) -> Any:
            started.set()
            await asyncio.sleep(60)

        backend.inner.settle = hangs  # type: ignore[method-assign]
        await lim.settle(tickets[1], record(Usage(1, 1, 2, cost_usd=0.01)))
        await started.wait()  # the sweeper's batch hangs
        backend.inner.settle = settle  # type: ignore[method-assign]
        await backend.aclose()  # cancels it: sent again, with the allotments' returns
        budget = redis_hash(fresh_redis, budget_of_day(clock))
        assert int(budget["spent"]) == 30_000_000
        assert int(budget["held"]) == 0 and not [f for f in budget if f.startswith("r:")]

    run(fresh_redis, BUDGET_100, body, clock=clock, store_retry_s=30)


def test_a_budget_threshold_fires_once_across_workers_settling_in_batches(fresh_redis: str) -> None:
    clock = FakeClock(time.time())

    async def body(lims: list[Limiter], store: Store) -> None:
        for i in range(80):  # $1 each, far above the reservation: the 50% mark is $50
            ticket = await lims[i % 2].admit(ALICE, call(max_tokens=10), plan())
            await settle(lims, ticket, record(Usage(1, 1, 2, cost_usd=1.0)))
            if i % 10 == 9:
                await asyncio.sleep(0.12)  # let a sweep send the batches
        assert sum(leased(lim).local_admissions for lim in lims) >= 60
        for lim in lims:
            await leased(lim).aclose()
        assert int(redis_hash(fresh_redis, budget_of_day(clock))["spent"]) == 80 * NANO
        assert sum(lim.alerts.fired_total for lim in lims) == 1

    run(fresh_redis, BUDGET_100, body, workers=2, clock=clock, alert_thresholds=[0.5])


def test_coalesce_sums_per_bucket_and_per_allotment_and_closing_wins() -> None:
    releases = [
        Release("w", True, 7, -40),  # token corrections in bucket 7, then 8
        Release("h", False, 0, 5, 100, "a1"),  # budget moves of allotment a1
        Release("w", True, 7, -10),
        Release("h", False, 0, 3, 30, "a2"),
        Release("w", True, 8, 5),
        Release("h", False, 1, 0, 7, "a1"),  # a1's last request: closes it
        Release("w", True, 7, 20, 0, "a9"),  # window allotment a9's return, kept as is
    ]
    assert coalesce(releases) == [
        Release("w", True, 7, -50),
        Release("h", False, 1, 5, 107, "a1"),
        Release("h", False, 0, 3, 30, "a2"),
        Release("w", True, 8, 5),
        Release("w", True, 7, 20, 0, "a9"),
    ]


@pytest.mark.parametrize("ran", [True, False], ids=["ran-then-timed-out", "never-ran"])
def test_a_retried_batch_still_fires_its_budget_alert_once(fresh_redis: str, ran: bool) -> None:
    """The once-marker keeps the first try's result, so the retry reports the spend it applied."""
    clock = FakeClock(time.time())

    async def body(lims: list[Limiter], store: Store) -> None:
        (lim,) = lims
        backend = leased(lim)
        tickets = await admit_alice(lim, 2)
        assert backend.local_admissions == 1
        sent = _failing_once(backend, ran=ran)
        await lim.settle(tickets[1], record(Usage(1, 1, 2, cost_usd=60.0)))  # crosses 50% of $100
        assert await until(lambda: len(sent) >= 2)  # failed, then retried
        assert lim.alerts.fired_total == 1
        await lim.settle(tickets[0], record(Usage(1, 1, 2, cost_usd=0.001)))
        await backend.aclose()
        assert int(redis_hash(fresh_redis, budget_of_day(clock))["spent"]) == 60_001_000_000
        assert lim.alerts.fired_total == 1

    run(fresh_redis, BUDGET_100, body, clock=clock, store_retry_s=0.2, alert_thresholds=[0.5])


def test_old_budget_keys_make_room_without_losing_a_pending_alert(fresh_redis: str) -> None:
    clock = FakeClock(time.time())
    bob = principal("bob")

    async def body(lims: list[Limiter], store: Store) -> None:
        (lim,) = lims
        alice_tickets = await admit_alice(lim, 2)
        bob_tickets = [await lim.admit(bob, call(max_tokens=10), plan()) for _ in range(2)]
        assert leased(lim).local_admissions == 2
        known = next(iter(lim._alerting.values()), None)
        for i in range(9_999):  # budget keys of past periods
            lim._alerting[f"orp:{{k:old}}:k:old:budget_usd_per_day:{i}"] = known  # type: ignore[assignment]
        await lim.settle(alice_tickets[1], record(Usage(1, 1, 2, cost_usd=60.0)))  # crosses 50%
        await lim.settle(bob_tickets[1], record(Usage(1, 1, 2, cost_usd=0.001)))  # past 10,000 keys
        assert len(lim._alerting) <= 10_000
        assert await until(lambda: lim.alerts.fired_total == 1)
        for ticket in (alice_tickets[0], bob_tickets[0]):
            await lim.settle(ticket, record(Usage(1, 1, 2, cost_usd=0.001)))

    run(fresh_redis, BUDGET_100, body, clock=clock, alert_thresholds=[0.5])


def test_a_sweep_sends_its_batches_at_once(fresh_redis: str) -> None:
    """One batch per hash tag, all in flight together: a sweep takes one round trip."""
    clock = FakeClock(time.time())

    async def body(lims: list[Limiter], store: Store) -> None:
        (lim,) = lims
        backend = leased(lim)
        who = [principal(f"p{i}") for i in range(10)]  # no team: a hash tag each
        tickets = [await lim.admit(p, call(max_tokens=10), plan()) for p in who for _ in range(2)]
        assert backend.local_admissions == 10
        settle = backend.inner.settle
        in_flight, most = 0, 0

        async def counting(*args: Any, **kwargs: Any) -> Any:
            nonlocal in_flight, most
            in_flight += 1
            most = max(most, in_flight)
            try:
                await asyncio.sleep(0.05)
                return await settle(*args, **kwargs)
            finally:
                in_flight -= 1

        backend.inner.settle = counting  # type: ignore[method-assign]
        for ticket in tickets[1::2]:  # the locally admitted ones
            await lim.settle(ticket, record(Usage(1, 1, 2, cost_usd=0.01)))
        assert await until(lambda: not backend._outbox and most)
        assert await until(lambda: in_flight == 0)
        assert most == 10
        for ticket in tickets[::2]:
            await lim.settle(ticket, record(Usage(1, 1, 2, cost_usd=0.01)))

    run(fresh_redis, BUDGET_100, body, clock=clock)


def test_a_settlement_during_shutdown_is_sent_and_one_after_it_is_counted(
    fresh_redis: str, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock(time.time())

    async def body(lims: list[Limiter], store: Store) -> None:
        (lim,) = lims
        backend = leased(lim)
        tickets = await admit_alice(lim, 3)
        assert backend.local_admissions == 2
        settle = backend.inner.settle

        async def slow(*args: Any, **kwargs: Any) -> Any:
            await asyncio.sleep(0.2)
            return await settle(*args, **kwargs)

        await lim.settle(tickets[0], record(Usage(1, 1, 2, cost_usd=0.02)))
        backend.inner.settle = slow  # type: ignore[method-assign]
        closing = asyncio.create_task(backend.aclose())
        await asyncio.sleep(0.05)  # aclose is sending the returns
        await lim.settle(tickets[1], record(Usage(1, 1, 2, cost_usd=0.01)))  # a request ending now
        await closing
        assert int(redis_hash(fresh_redis, budget_of_day(clock))["spent"]) == 30_000_000
        await lim.settle(tickets[2], record(Usage(1, 1, 2, cost_usd=0.04)))  # too late: counted, logged
        assert backend.resend_failures == 1
        assert "after the limits store closed" in caplog.text

    run(fresh_redis, BUDGET_100, body, clock=clock)


def test_a_batch_too_old_for_its_marker_is_not_sent_again(fresh_redis: str) -> None:
    clock = FakeClock(time.time())

    async def body(lims: list[Limiter], store: Store) -> None:
        (lim,) = lims
        backend = leased(lim)
        tickets = await admit_alice(lim, 2)
        sent = await settle_in_a_failed_batch(lim, tickets[1], 0.01, ran=True)
        (item,) = backend._resend
        backend._resend = [item._replace(first=item.first - backend._once_ms / 1000)]  # first sent long ago
        await asyncio.sleep(0.5)  # past its retry time
        assert sent == [item.once] and not backend._resend  # given up, never sent twice
        await lim.settle(tickets[0], record(Usage(1, 1, 2, cost_usd=0.02)))
        await backend.aclose()
        assert int(redis_hash(fresh_redis, budget_of_day(clock))["spent"]) == 30_000_000

    run(fresh_redis, BUDGET_100, body, clock=clock, store_retry_s=0.2)
