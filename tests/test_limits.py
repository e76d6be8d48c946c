"""Limiter semantics, the same tests against the in-memory store and a real redis-server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from proxy.errors import QuotaExceeded, RateLimited
from proxy.limits import Limiter
from proxy.store import Store
from proxy.types import Ticket, Usage

from .limits_support import MINI, FakeClock, call, limiter, open_test_store, plan, principal, record


def run(store_url: str | None, spec: dict[str, Any], body: Any, **kwargs: Any) -> Any:
    """Run ``body(limiter, store)`` in a fresh event loop with a fresh store."""

    kwargs.setdefault("store_timeout_ms", 5000)  # exactness, not the timeout path (test_limits_store_down)

    async def main() -> Any:
        store = open_test_store(store_url)
        lim = limiter(store, spec, **kwargs)
        await lim.start()
        try:
            return await body(lim, store)
        finally:
            await lim.aclose()
            await store.aclose()

    return asyncio.run(main())


async def admit_many(lim: Limiter, n: int, **kw: Any) -> tuple[list[Ticket], list[RateLimited]]:
    who = kw.pop("who", principal())
    results = await asyncio.gather(
        *(lim.admit(who, call(**kw), plan(kw.get("model", "openai/gpt-4o-mini"))) for _ in range(n)),
        return_exceptions=True,
    )
    tickets = [r for r in results if isinstance(r, Ticket)]
    errors = [r for r in results if isinstance(r, RateLimited)]
    assert len(tickets) + len(errors) == n, [r for r in results if not isinstance(r, Ticket | RateLimited)]
    return tickets, errors


def test_200_concurrent_admissions_admit_exactly_the_limit(store_url: str | None) -> None:
    async def body(lim: Limiter, store: Store) -> None:
        tickets, errors = await admit_many(lim, 200)
        assert len(tickets) == 37
        assert {e.code for e in errors} == {"rate_limit_exceeded"}
        assert "requests_per_hour" in errors[0].message and "key 'alice'" in errors[0].message
        headers = dict(errors[0].headers)
        assert headers[b"x-ratelimit-remaining-requests"] == b"0"
        assert 0 < int(headers[b"retry-after-ms"]) <= 3_660_000
        assert errors[0].retry_hint() is None  # the SDK may retry later

    run(store_url, {"tiers": {"t": {"requests_per_hour": 37}}}, body)


def test_concurrency_slots_are_exact_and_released_by_settle(store_url: str | None) -> None:
    async def body(lim: Limiter, store: Store) -> None:
        tickets, errors = await admit_many(lim, 200)
        assert len(tickets) == 7
        assert "concurrent" in errors[0].message
        assert dict(errors[0].headers)[b"retry-after"] == b"1"
        await asyncio.gather(*(lim.settle(t, record()) for t in tickets[:3]))
        again, _ = await admit_many(lim, 200)
        assert len(again) == 3

    run(store_url, {"tiers": {"t": {"concurrent_requests": 7}}}, body)


def test_team_limits_are_shared_by_the_team_s_keys(store_url: str | None) -> None:
    spec = {"teams": {"red": "team"}, "tiers": {"t": {"requests_per_day": 100}, "team": {"requests_per_day": 10}}}

    async def body(lim: Limiter, store: Store) -> None:
        a, _ = await admit_many(lim, 50, who=principal("ann", team="red"))
        b, errors = await admit_many(lim, 50, who=principal("ben", team="red"))
        assert len(a) + len(b) == 10
        assert "team 'red'" in errors[0].message
        alone, _ = await admit_many(lim, 50, who=principal("cat", team="blue"))
        assert len(alone) == 50  # another team: only its key limit applies

    run(store_url, spec, body)


def test_per_model_limits_apply_to_that_model_only(store_url: str | None) -> None:
    spec = {"tiers": {"t": {"models": {"openai/gpt-4o": {"requests_per_minute": 2}}}}}

    async def body(lim: Limiter, store: Store) -> None:
        pricey, errors = await admit_many(lim, 5, model="openai/gpt-4o")
        assert len(pricey) == 2
        assert "on model openai/gpt-4o" in errors[0].message
        cheap, _ = await admit_many(lim, 5)
        assert len(cheap) == 5

    run(store_url, spec, body)


def test_per_model_limits_cover_the_model_s_variants(store_url: str | None) -> None:
    """``openai/gpt-4o:floor`` is gpt-4o routed differently (a rule or the client may add
    the suffix): it counts against gpt-4o's per-model limits, unless the tier names it."""
    spec = {
        "tiers": {
            "t": {
                "models": {
                    "openai/gpt-4o": {"requests_per_minute": 2},
                    "openai/gpt-4o-mini:free": {"requests_per_minute": 1},
                }
            }
        }
    }

    async def body(lim: Limiter, store: Store) -> None:
        base, _ = await admit_many(lim, 1, model="openai/gpt-4o")
        variants, errors = await admit_many(lim, 3, model="openai/gpt-4o:floor")
        assert len(base) + len(variants) == 2 and "on model openai/gpt-4o" in errors[0].message
        named, _ = await admit_many(lim, 2, model="openai/gpt-4o-mini:free")
        assert len(named) == 1  # its own rule, not the (unlimited) base model's
        cheap, _ = await admit_many(lim, 3, model="openai/gpt-4o-mini:nitro")
        assert len(cheap) == 3

    run(store_url, spec, body)


def test_a_fallback_reserves_only_the_per_model_limits_the_request_does_not_hold(store_url: str | None) -> None:
    """Primary ``openai/gpt-4o``, fallback ``openai/gpt-4o:nitro``: the same per-model limit,
    held once; a fallback with no limits of its own makes no store call (empty ticket)."""
    spec = {"tiers": {"t": {"models": {"openai/gpt-4o": {"concurrent_requests": 1}}}}}

    async def body(lim: Limiter, store: Store) -> None:
        asked = call(model="openai/gpt-4o")
        primary = await lim.admit(principal(), asked, plan("openai/gpt-4o"))
        same = await lim.admit_fallback(principal(), asked, plan("openai/gpt-4o"), "openai/gpt-4o:nitro", [primary])
        assert same.state is None  # not refused by its own request's slot
        assert (await lim.admit_fallback(principal(), asked, plan("openai/gpt-4o"), MINI, [primary])).state is None
        with pytest.raises(RateLimited):  # another request's fallback to gpt-4o: the slot is taken
            await lim.admit_fallback(principal(), call(), plan(), "openai/gpt-4o")

    run(store_url, spec, body)


def test_tokens_are_reserved_for_the_request_as_routing_capped_it(store_url: str | None) -> None:
    """A rule capped ``max_tokens`` to 4096: admission reserves that, not the client's 30000."""
    from proxy.types import RoutePlan

    spec = {"tiers": {"t": {"tokens_per_minute": 20_000}}}

    async def body(lim: Limiter, store: Store) -> None:
        asked = call(max_tokens=30_000)
        capped = RoutePlan(model=plan().model, request={**asked.body, "max_tokens": 4096})
        ticket = await lim.admit(principal(), asked, capped)
        assert ticket.state is not None
        with pytest.raises(RateLimited):  # without the cap the same request cannot fit at all
            await lim.admit(principal(), asked, plan())

    run(store_url, spec, body)


def test_the_window_slides_and_resets(store_url: str | None) -> None:
    clock = FakeClock()

    async def body(lim: Limiter, store: Store) -> None:
        first, _ = await admit_many(lim, 3)
        clock.advance(30)
        second, errors = await admit_many(lim, 5)
        assert (len(first), len(second)) == (3, 2)
        # The first three leave the window 60-61 s after they were admitted, not before.
        assert 30_000 < int(dict(errors[0].headers)[b"retry-after-ms"]) <= 31_000
        clock.advance(29.5)
        assert len((await admit_many(lim, 5))[0]) == 0
        clock.advance(2)
        assert len((await admit_many(lim, 5))[0]) == 3
        clock.advance(61)
        assert len((await admit_many(lim, 9))[0]) == 5

    run(store_url, {"tiers": {"t": {"requests_per_minute": 5}}}, body, clock=clock)


def test_token_reservations_are_corrected_to_actual_usage(store_url: str | None) -> None:
    async def body(lim: Limiter, store: Store) -> None:
        ticket = await lim.admit(principal(), call(max_tokens=500), plan())
        headers = dict(ticket.headers)
        reserved = 1000 - int(headers[b"x-ratelimit-remaining-tokens"])
        assert 500 < reserved < 520  # prompt estimate + max_tokens
        assert headers[b"x-ratelimit-limit-tokens"] == b"1000"
        await lim.settle(ticket, record(Usage(prompt_tokens=8, completion_tokens=42, total_tokens=50)))
        ticket = await lim.admit(principal(), call(), plan())
        assert int(dict(ticket.headers)[b"x-ratelimit-remaining-tokens"]) == 1000 - 50 - (reserved - 500)
        await lim.settle(ticket, record(None, status=502))  # failed: every reserved token back
        ticket = await lim.admit(principal(), call(max_tokens=900), plan())
        assert int(dict(ticket.headers)[b"x-ratelimit-remaining-tokens"]) < 100
        with pytest.raises(RateLimited) as info:
            await lim.admit(principal(), call(max_tokens=900), plan())
        assert "tokens_per_minute" in info.value.message and info.value.retry_hint() is None
        with pytest.raises(RateLimited) as too_big:
            await lim.admit(principal(), call(max_tokens=5000), plan())
        assert "Request too large" in too_big.value.message
        assert too_big.value.retry_hint() is False

    run(store_url, {"tiers": {"t": {"tokens_per_minute": 1000}}}, body)


def test_usage_above_the_reservation_is_counted_too(store_url: str | None) -> None:
    async def body(lim: Limiter, store: Store) -> None:
        ticket = await lim.admit(principal(), call(), plan())
        await lim.settle(ticket, record(Usage(prompt_tokens=900, completion_tokens=200, total_tokens=1100)))
        with pytest.raises(RateLimited):
            await lim.admit(principal(), call(), plan())

    run(store_url, {"tiers": {"t": {"tokens_per_minute": 1000}}}, body)


def test_holds_of_requests_that_never_settle_expire_with_their_lease(store_url: str | None) -> None:
    clock = FakeClock()

    async def body(lim: Limiter, store: Store) -> None:
        assert len((await admit_many(lim, 5))[0]) == 2  # never settled: the worker "died"
        clock.advance(119)
        assert len((await admit_many(lim, 5))[0]) == 0
        clock.advance(2)
        assert len((await admit_many(lim, 5))[0]) == 2

    run(store_url, {"tiers": {"t": {"concurrent_requests": 2}}}, body, clock=clock, lease_s=120)


def test_spend_never_exceeds_the_budget_under_concurrency(store_url: str | None) -> None:
    # Worst case of one call: ceil(6 prompt tokens x 1.2) x 0.15e-6 + 100 x 0.6e-6 = 61.2 micro-USD.
    budget = 0.0015

    async def body(lim: Limiter, store: Store) -> None:
        spent = 0.0
        for _ in range(40):
            tickets, errors = await admit_many(lim, 200, max_tokens=100)
            if not tickets:
                break
            cost = 58e-6  # close to the worst case: the budget binds on actual spend
            await asyncio.gather(*(lim.settle(t, record(Usage(7, 90, 97, cost_usd=cost))) for t in tickets))
            spent += cost * len(tickets)
            assert spent <= budget + 1e-12
            assert all(isinstance(e, QuotaExceeded) for e in errors)
        assert budget - 61.2e-6 < spent <= budget
        with pytest.raises(QuotaExceeded) as info:
            await lim.admit(principal(), call(max_tokens=100), plan())
        assert info.value.retry_hint() is False  # final for the day: x-should-retry: false
        assert "budget_usd_per_day" in info.value.message
        wait = int(dict(info.value.headers)[b"retry-after"])
        assert 0 < wait <= 86_400  # until the day ends

    run(store_url, {"tiers": {"t": {"budget_usd_per_day": budget}}}, body)


def test_budget_held_by_requests_in_flight_is_a_retryable_429(store_url: str | None) -> None:
    async def body(lim: Limiter, store: Store) -> None:
        tickets, errors = await admit_many(lim, 50, max_tokens=1000)  # 600+ micro-USD each
        assert len(tickets) == 1
        assert isinstance(errors[0], QuotaExceeded) and errors[0].retry_hint() is None
        assert "reserved by requests in flight" in errors[0].message
        await lim.settle(tickets[0], record(Usage(7, 10, 17, cost_usd=0.0000075)))
        assert len((await admit_many(lim, 50, max_tokens=1000))[0]) == 1

    run(store_url, {"tiers": {"t": {"budget_usd_total": 0.001}}}, body)


def test_budgets_reset_with_the_utc_day_and_month(store_url: str | None) -> None:
    clock = FakeClock()
    spec = {"tiers": {"t": {"budget_usd_per_day": 0.01, "budget_usd_per_month": 0.015}}}

    async def body(lim: Limiter, store: Store) -> None:
        ticket = await lim.admit(principal(), call(max_tokens=10), plan())
        await lim.settle(ticket, record(Usage(7, 10, 17, cost_usd=0.0099)))
        with pytest.raises(QuotaExceeded, match="budget_usd_per_day"):
            await lim.admit(principal(), call(max_tokens=200), plan())  # 121.2 micro-USD > 100 left
        clock.advance(86_400)
        ticket = await lim.admit(principal(), call(max_tokens=10), plan())
        await lim.settle(ticket, record(Usage(7, 10, 17, cost_usd=0.0051)))
        with pytest.raises(QuotaExceeded, match="budget_usd_per_month"):
            await lim.admit(principal(), call(max_tokens=10), plan())
        clock.advance(31 * 86_400)  # February
        await lim.admit(principal(), call(max_tokens=10), plan())

    run(store_url, spec, body, clock=clock)


def test_missing_cost_is_priced_from_tokens(store_url: str | None) -> None:
    async def body(lim: Limiter, store: Store) -> None:
        ticket = await lim.admit(principal(), call(max_tokens=10), plan())
        # No usage.cost: 1000 x 0.15e-6 + 1000 x 0.6e-6 = 750 micro-USD of the 1000.
        await lim.settle(ticket, record(Usage(1000, 1000, 2000, cost_usd=None)))
        ticket = await lim.admit(principal(), call(max_tokens=10), plan())
        await lim.settle(ticket, record(Usage(100, 300, 400, cost_usd=None)))  # 195 more
        with pytest.raises(QuotaExceeded):
            await lim.admit(principal(), call(max_tokens=100), plan())  # needs 61.2, 55 left

    run(store_url, {"tiers": {"t": {"budget_usd_total": 0.001}}}, body)


def test_unknown_prices_reserve_the_configured_amount(store_url: str | None) -> None:
    async def body(lim: Limiter, store: Store) -> None:
        tickets, _ = await admit_many(lim, 10, model="no-such/model")
        assert len(tickets) == 3  # 0.01 USD each of 0.035
        await lim.settle(tickets[0], record(Usage(10, 10, 20, cost_usd=None)))  # charged 0.01
        assert len((await admit_many(lim, 10, model="no-such/model"))[0]) == 0

    run(store_url, {"tiers": {"t": {"budget_usd_total": 0.035}}}, body, unknown_price_usd=0.01)


def test_soft_thresholds_fire_once_per_period(store_url: str | None, caplog: pytest.LogCaptureFixture) -> None:
    async def body(lim: Limiter, store: Store) -> None:
        for _ in range(10):
            ticket = await lim.admit(principal(), call(max_tokens=10), plan())
            await lim.settle(ticket, record(Usage(7, 10, 17, cost_usd=0.0001)))
        with pytest.raises(QuotaExceeded):
            await lim.admit(principal(), call(max_tokens=10), plan())
        assert lim.alerts.fired_total == 3

    caplog.set_level("WARNING", "proxy.limits.alerts")
    run(store_url, {"tiers": {"t": {"budget_usd_per_day": 0.001}}}, body)
    # 50% after the 5th of 10 equal costs, 80% after the 8th, 100% after the 10th: once each.
    assert [r.getMessage().rsplit(" ", 1)[1] for r in caplog.records] == ["50%", "80%", "100%"]


def test_keys_without_a_tier_get_the_default_tier_or_nothing(store_url: str | None) -> None:
    async def body(lim: Limiter, store: Store) -> None:
        assert len((await admit_many(lim, 5, who=principal(tier=None)))[0]) == 1

    run(store_url, {"default_tier": "t", "tiers": {"t": {"requests_per_day": 1}}}, body)

    async def unlimited(lim: Limiter, store: Store) -> None:
        tickets, _ = await admit_many(lim, 5, who=principal(tier=None))
        assert len(tickets) == 5 and tickets[0].headers == ()

    run(store_url, {"tiers": {"t": {"requests_per_day": 1}}}, unlimited)


@st.composite
def operations(draw: st.DrawFn) -> list[tuple[str, Any]]:
    """Random reserve/settle/advance steps over two windows and two holds."""
    ops: list[tuple[str, Any]] = []
    for _ in range(draw(st.integers(1, 14))):
        kind = draw(st.sampled_from(["reserve", "reserve", "settle", "advance"]))
        if kind == "reserve":
            costs = draw(st.lists(st.integers(0, 6), min_size=4, max_size=4))
            ops.append(("reserve", (costs, draw(st.booleans()))))
        elif kind == "settle":
            ops.append(("settle", (draw(st.integers(0, 9)), draw(st.integers(-5, 5)), draw(st.integers(0, 4)))))
        else:
            ops.append(("advance", draw(st.integers(1, 90_000))))
    return ops


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=operations())
def test_redis_and_memory_counters_agree_step_for_step(redis_url: str, ops: list[tuple[str, Any]]) -> None:
    from proxy.limits.backend import Check, Release
    from proxy.limits.memory import MemoryBackend
    from proxy.limits.policy import MINUTE, SECOND
    from proxy.limits.redis import RedisBackend
    from proxy.store.redis import RedisStore

    # Redis expires keys on its own clock, memory on the fake one; TTLs only collect garbage
    # (budget keys are named by period), so the budget-like hold outlives the test's time.
    TTL = 10**9

    async def main() -> None:
        store = RedisStore(redis_url)
        backends = [MemoryBackend(), RedisBackend(store.client, 5.0)]
        tag = f"orp:{{p{id(ops)}{time.monotonic_ns()}}}"
        keys = [f"{tag}:w1", f"{tag}:w2", f"{tag}:h1", f"{tag}:h2"]
        now = 1_700_000_000_000
        taken: list[tuple[str, list[Check], tuple[int, ...]]] = []
        try:
            for kind, arg in ops:
                if kind == "advance":
                    now += arg
                    continue
                if kind == "reserve":
                    costs, dry = arg
                    checks = [
                        Check(keys[0], 8, costs[0], MINUTE),
                        Check(keys[1], 5, costs[1], SECOND),
                        Check(keys[2], 9, costs[2], ttl_ms=TTL),
                        Check(keys[3], 7, costs[3]),
                    ]
                    rid = f"r{len(taken)}"
                    out = [await b.reserve(checks, rid, now, 30_000, dry=dry) for b in backends]
                    assert out[0] == out[1], (kind, arg, out)
                    if out[0].admitted and not dry:
                        taken.append((rid, checks, tuple(s.bucket for s in out[0].states)))
                    continue
                index, delta, spend = arg
                if not taken:
                    continue
                rid, checks, buckets = taken[index % len(taken)]
                releases = [
                    Release(checks[0].key, True, bucket=buckets[0], delta=delta),
                    Release(checks[2].key, False, spend=spend),
                    Release(checks[3].key, False),
                ]
                spent = [await b.settle(releases, rid, now) for b in backends]
                assert spent[0] == spent[1], (kind, arg, spent)
        finally:
            await backends[1].aclose()  # type: ignore[attr-defined]
            await store.aclose()

    asyncio.run(main())


def test_budget_alerts_are_posted_to_the_webhook(serve: Callable[..., Any]) -> None:
    received: list[dict[str, Any]] = []

    async def hook(request: Request) -> JSONResponse:
        received.append(await request.json())
        return JSONResponse({"ok": True})

    receiver = serve(Starlette(routes=[Route("/hook", hook, methods=["POST"])]))

    async def body(lim: Limiter, store: Store) -> None:
        for _ in range(6):
            ticket = await lim.admit(principal(team="red"), call(max_tokens=10), plan())
            await lim.settle(ticket, record(Usage(7, 10, 17, cost_usd=0.0001)))

    spec = {"teams": {"red": "team"}, "tiers": {"team": {"budget_usd_per_month": 0.001}}}
    run(None, spec, body, alert_webhook_url=f"{receiver.url}/hook", alert_thresholds=[0.5, 0.8])
    assert [(e["threshold"], e["scope"], e["subject"], e["budget"]) for e in received] == [
        (0.5, "team", "red", "budget_usd_per_month")
    ]
    assert received[0]["spent_usd"] == pytest.approx(0.0005) and received[0]["limit_usd"] == 0.001
    assert received[0]["period"] == time.strftime("%Y-%m", time.gmtime())


def run_backend(store_url: str | None, name: str, body: Callable[[Any, str], Awaitable[None]]) -> None:
    """``body(backend, key)`` on the Redis backend of ``store_url`` (else the memory one);
    ``key`` is a fresh hold key of its own."""
    from proxy.limits.memory import MemoryBackend
    from proxy.limits.redis import RedisBackend
    from proxy.store.redis import RedisStore

    async def main() -> None:
        store = RedisStore(store_url) if store_url else None
        backend = RedisBackend(store.client, 5.0) if store else MemoryBackend()
        try:
            await body(backend, f"orp:{{{name}-{time.monotonic_ns()}}}:budget")
        finally:
            if store is not None:
                await backend.aclose()  # type: ignore[attr-defined]
                await store.aclose()

    asyncio.run(main())


def test_a_budget_reserved_at_zero_still_records_what_was_spent(store_url: str | None) -> None:
    """A free model's worst case is 0 nano-USD; if OpenRouter bills it after all, the
    settlement must still add the spend (the hold is taken even at zero)."""
    from proxy.limits.backend import Check, Release

    async def body(backend: Any, key: str) -> None:
        now = 1_700_000_000_000
        budget = Check(key, 1000, 0, ttl_ms=60_000)
        assert (await backend.reserve([budget], "r1", now, 30_000)).admitted
        assert await backend.settle([Release(key, False, spend=700)], "r1", now) == [700]
        assert (await backend.reserve([budget._replace(cost=301)], "r2", now, 30_000)).states[0].retry_ms == -1

    run_backend(store_url, "zero", body)


def test_a_settlement_spends_once_even_when_retried(store_url: str | None) -> None:
    """A retried settle (the first try may have run before its timeout) never spends twice."""
    from proxy.limits.backend import Check, Release

    async def body(backend: Any, key: str) -> None:
        now = 1_700_000_000_000
        decision = await backend.reserve([Check(key, 1000, 300, ttl_ms=60_000)], "r1", now, 30_000)
        assert decision.admitted
        release = Release(key, False, spend=120)
        assert await backend.settle([release], "r1", now) == [120]
        assert await backend.settle([release], "r1", now) == [120]  # the retry: no second spend

    run_backend(store_url, "spend-once", body)


ScriptBody = Callable[[Any, Any, str], Awaitable[None]]


def run_scripts(redis_url: str, name: str, body: ScriptBody) -> None:
    """``body(client, backend, tag)`` on a fresh ``RedisBackend`` and raw client; ``tag`` is a
    hash-tagged key prefix of its own, whose keys are deleted afterwards."""
    import redis.asyncio as aioredis

    from proxy.limits.redis import RedisBackend

    async def main() -> None:
        client = aioredis.Redis.from_url(redis_url)
        backend = RedisBackend(client, 5.0)
        tag = f"orp:{{{name}-{time.monotonic_ns()}}}"
        try:
            await body(client, backend, tag)
        finally:
            await backend.aclose()
            keys = [key async for key in client.scan_iter(match=tag + "*")]
            if keys:
                await client.delete(*keys)
            await client.aclose()

    asyncio.run(main())


def test_holds_written_without_a_lease_marker_are_still_reclaimed(redis_url: str) -> None:
    """A hold left by an older script layout (no ``x`` field) is freed once its lease ends,
    and the hash then carries the earliest remaining lease end."""
    from proxy.limits.backend import Check

    async def body(client: Any, backend: Any, tag: str) -> None:
        key, now = f"{tag}:concurrent_requests", 1_700_000_000_000
        await client.hset(key, mapping={"spent": 0, "held": 1, "r:old": 1})
        await client.zadd(key + ":x", {"old": now - 1})
        check = Check(key, 1, 1, ttl_ms=60_000)
        decision = await backend.reserve([check], "new", now, 30_000)
        assert decision.admitted, "the expired legacy hold still occupied the only slot"
        fields = await client.hgetall(key)
        assert b"r:old" not in fields and fields[b"held"] == b"1"
        assert int(fields[b"x"]) == now + 30_000
        assert not (await backend.reserve([check], "third", now + 1, 30_000)).admitted

    run_scripts(redis_url, "legacy", body)


def test_counters_keep_an_expiry_that_outlives_their_leases(redis_url: str) -> None:
    """Window hashes expire with their newest bucket; hold hashes and lease sets stay at
    least a lease ahead of the newest hold, however often they are written."""
    from proxy.limits.backend import Check
    from proxy.limits.policy import MINUTE

    async def body(client: Any, backend: Any, tag: str) -> None:
        window, hold = f"{tag}:requests_per_minute", f"{tag}:concurrent_requests"
        now, lease = int(time.time() * 1000), 30_000
        checks = [Check(window, 100, 1, MINUTE), Check(hold, 100, 1, ttl_ms=1_000)]
        for i in range(5):
            assert (await backend.reserve(checks, f"r{i}", now + i, lease)).admitted
        assert 0 < await client.pttl(window) <= MINUTE.ms + MINUTE.bucket_ms + 1_000
        for name, extra in ((hold, 0), (hold + ":x", 60_000)):
            ttl = await client.pttl(name)
            assert lease + 60_000 + extra < ttl <= lease + 120_000 + extra, (name, ttl)
        # Later takes (the proxy's clock jumps ahead of Redis's here, so the check reads
        # the recorded expiry ``e``): 50 s on it is not moved yet still gives the newest
        # lease its 60 s grace; 100 s on it is moved.
        first_e = int(await client.hget(hold, "e") or 0)
        for at, moved in ((now + 50_000, False), (now + 100_000, True)):
            assert (await backend.reserve(checks, f"at{at}", at, lease)).admitted
            e = int(await client.hget(hold, "e") or 0)
            assert (e != first_e) is moved
            assert e >= at + lease + 60_000, (moved, e - at)
            # the lease set outlives its hash by a minute (``e`` may come from a replica
            # whose clock runs behind), never the other way round
            assert abs(await client.pttl(hold + ":x") - (e - at + 60_000)) < 1_000
            assert await client.pttl(hold + ":x") >= await client.pttl(hold) - 1_000

    run_scripts(redis_url, "ttl", body)


def test_holds_whose_lease_set_was_lost_are_dropped(redis_url: str) -> None:
    """A hash whose lease set expired first (clock skew between replicas) would keep its
    holds for ever, as nothing can settle them; the next purge drops them."""
    from proxy.limits.backend import Check

    async def body(client: Any, backend: Any, tag: str) -> None:
        key, now = f"{tag}:concurrent_requests", int(time.time() * 1000)
        # two slots, one held by a request whose worker died and whose lease set is gone
        await client.hset(key, mapping={"spent": 0, "held": 1, "r:lost": 1, "x": now - 1, "e": now + 600_000})
        check = Check(key, 2, 1, ttl_ms=60_000)
        assert (await backend.reserve([check], "a", now, 30_000)).admitted
        assert (await backend.reserve([check], "b", now + 1, 30_000)).admitted, "the lost hold kept its slot"
        fields = await client.hgetall(key)
        assert b"r:lost" not in fields and fields[b"held"] == b"2"
        assert not (await backend.reserve([check], "c", now + 2, 30_000)).admitted

    run_scripts(redis_url, "orphan", body)


def test_a_lease_set_emptied_by_settlement_gets_an_expiry_when_recreated(redis_url: str) -> None:
    """Redis deletes a lease set when settlement removes its last member; the next hold
    recreates it, and it must expire with its hash (else a budget period's set leaks)."""
    from proxy.limits.backend import Check, Release

    async def body(client: Any, backend: Any, tag: str) -> None:
        hold, now = f"{tag}:budget:2026-11-21", int(time.time() * 1000)
        check = Check(hold, 10**9, 100, ttl_ms=3_600_000)
        for i in range(3):
            assert (await backend.reserve([check], f"r{i}", now + i, 30_000)).admitted
            assert await backend.settle([Release(hold, False, spend=40)], f"r{i}", now + i) == [40 * (i + 1)]
            assert not await client.exists(hold + ":x")  # emptied, so deleted
        assert (await backend.reserve([check], "open", now + 10, 30_000)).admitted
        assert 3_600_000 < await client.pttl(hold) <= 3_600_000 + 60_000
        assert await client.pttl(hold) < await client.pttl(hold + ":x") <= 3_600_000 + 120_000

    run_scripts(redis_url, "reset", body)


def test_the_memory_backend_forgets_settled_holds() -> None:
    """Settled requests leave nothing behind in the embedded store: its lease heap once kept
    an entry for every request until its lease ran out (16 minutes by default), some 2 MB
    per 20,000 requests on each concurrency or budget key."""
    import tracemalloc

    from proxy.limits.backend import Check, Release
    from proxy.limits.memory import MemoryBackend

    async def main() -> int:
        backend = MemoryBackend()
        now = 1_700_000_000_000
        slots = Check("orp:{k:a}:concurrent_requests", 10, 1)
        budget = Check("orp:{k:a}:budget", 10**12, 5, ttl_ms=86_400_000)
        held = []
        for i in range(100):  # warm up, with some requests left in flight
            assert (await backend.reserve([slots, budget], f"w{i}", now, 960_000)).admitted
            held.append(f"w{i}")
            if len(held) > 3:
                await backend.settle([Release(slots.key, False), Release(budget.key, False, spend=1)], held.pop(0), now)
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        for i in range(20_000):
            rid = f"request-{i:08d}"
            assert (await backend.reserve([slots, budget], rid, now + i, 960_000)).admitted
            await backend.settle([Release(slots.key, False), Release(budget.key, False, spend=1)], rid, now + i)
        grown = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        return grown

    assert asyncio.run(main()) < 100_000


def test_a_cancelled_settlement_still_settles_the_fallbacks_tickets() -> None:
    """Shutdown cancels a request while its primary ticket settles: the fallbacks' tickets
    are settled all the same (else their holds stay until their lease), then the
    cancellation goes on."""
    from types import SimpleNamespace

    from proxy.pipeline import ChatCompletions
    from proxy.relay import Exchange

    settled: list[str] = []

    class Admission:
        def budget_charge(self, ticket: Ticket, usage: Any) -> None:
            return None

        async def settle(self, ticket: Ticket, rec: Any) -> None:
            if ticket.state == "primary":
                raise asyncio.CancelledError
            settled.append(ticket.state)

    ex = Exchange("rid", time.perf_counter())
    ex.ticket = Ticket((), "primary")
    ex.fallback_tickets = [("a/one", Ticket((), "one")), ("a/two", Ticket((), "two"))]
    endpoint: Any = SimpleNamespace(sinks=[], admission=Admission())
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(ChatCompletions._settle(endpoint, ex, time.time()))
    assert settled == ["one", "two"]


def test_a_budget_correction_moves_the_charged_keys_and_alerts_on_the_way(store_url: str | None) -> None:
    """A request settled with an estimate; OpenRouter's cost, found later, corrects exactly
    the budget it charged, and a threshold the correction crosses alerts as a settlement would."""

    async def body(lim: Limiter, store: Store) -> None:
        ticket = await lim.admit(principal(), call(max_tokens=10), plan())
        estimated = Usage(7, 10, 17, cost_usd=None)
        charge = lim.budget_charge(ticket, estimated)
        assert charge is not None and len(charge["keys"]) == 1 and charge["nusd"] > 0
        await lim.settle(ticket, record(estimated))
        assert lim.alerts.fired_total == 0
        billed = 900_000  # nano-USD: 90% of the 0.001 USD budget
        assert await lim.correct_budgets(charge["keys"], billed - charge["nusd"], charge["alerts"])
        assert lim.alerts.fired_total == 2  # 50% and 80%
        status = (await lim.snapshot(principal()))[2]
        assert [s.spent for s in status.states if s.spent] == [billed]
        assert await lim.correct_budgets(charge["keys"], -2 * billed)  # never below zero
        assert [s.spent for s in (await lim.snapshot(principal()))[2].states] == [0]

    run(store_url, {"tiers": {"t": {"budget_usd_per_day": 0.001}}}, body)
