"""Redis killed, frozen and restarted under traffic: fail_open and fail_closed, and recovery."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis.asyncio as aioredis
import yaml

from proxy.errors import LimitsUnavailable
from proxy.limits import DEGRADED_HEADER, Limiter
from proxy.metrics import Metrics
from proxy.store import open_store

from .conftest import ALICE_KEY, ProxyUnderTest
from .limits_support import RestartableRedis, call, limiter, plan, principal, record, scraped

MESSAGES: Any = [{"role": "user", "content": "Hello"}]
MINI = "openai/gpt-4o-mini"
POLICY = {"default_tier": "t", "tiers": {"t": {"requests_per_hour": 10, "concurrent_requests": 4}}}


@pytest.fixture
def redis_proc() -> Iterator[RestartableRedis]:
    server = RestartableRedis().start()
    yield server
    server.close()


@pytest.fixture
def make(redis_proc: RestartableRedis, tmp_path: Path, proxy_server: Callable[..., ProxyUnderTest]) -> Any:
    # redis_proc first: set up before the proxy, torn down after it.
    def _make(**settings: Any) -> ProxyUnderTest:
        (tmp_path / "policies").mkdir(exist_ok=True)
        (tmp_path / "policies" / "limits.yaml").write_text(yaml.safe_dump(POLICY))
        settings = {"replicas": 2, "store_retry_s": 0.2, "store_timeout_ms": 300, **settings}
        return proxy_server(extra=yaml.safe_dump({"store": {"redis_url": redis_proc.url}, "limits": settings}))

    return _make


def attempt(proxy: ProxyUnderTest) -> tuple[int, dict[str, str], float]:
    """One SDK call: ``(status, headers, seconds)``; never retried."""
    client = openai.OpenAI(base_url=proxy.base_url, api_key=ALICE_KEY, max_retries=0, timeout=10)
    began = time.monotonic()
    try:
        raw = client.chat.completions.with_raw_response.create(model=MINI, messages=MESSAGES)
        status, headers = 200, dict(raw.headers)
    except openai.APIStatusError as exc:
        status, headers = exc.status_code, dict(exc.response.headers)
    finally:
        client.close()
    return status, headers, time.monotonic() - began


def until_shared(proxy: ProxyUnderTest, timeout: float = 10.0) -> dict[str, str]:
    """Call until a response is decided by Redis again (no degraded marker); its headers."""
    deadline = time.monotonic() + timeout
    while True:
        status, headers, _ = attempt(proxy)
        if status == 200 and "x-proxy-degraded" not in headers:
            return headers
        assert time.monotonic() < deadline, f"the proxy did not recover: {status} {headers}"
        time.sleep(0.1)


def readiness(proxy: ProxyUnderTest, expected: tuple[int, str, bool], timeout: float = 5.0) -> None:
    """Poll ``/readyz`` until it says ``(status code, status, limits degraded)``: a probe's
    result serves up to a second (``proxy.health.PROBE_TTL_S``)."""
    deadline = time.monotonic() + timeout
    while True:
        began = time.monotonic()
        response = httpx.get(f"{proxy.url}/readyz")
        assert time.monotonic() - began < 1.0  # under Kubernetes' default probe timeout
        body = response.json()
        seen = (response.status_code, body["status"], body["limits"]["degraded"])
        if seen == expected:
            assert body["store"]["reachable"] is (body["status"] == "ready")
            return
        assert time.monotonic() < deadline, f"/readyz said {seen}, not {expected}: {body}"
        time.sleep(0.1)


def limiter_of(proxy: ProxyUnderTest) -> Limiter:
    assert proxy.app.runtime is not None
    admission = proxy.app.runtime.admission
    assert isinstance(admission, Limiter)
    return admission


def test_fail_open_admits_on_local_shares_then_recovers(
    make: Any, redis_proc: RestartableRedis, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = make(failure_policy="fail_open")
    readiness(proxy, (200, "ready", False))
    for remaining in ("9", "8", "7"):
        status, headers, _ = attempt(proxy)
        assert status == 200 and headers["x-ratelimit-remaining-requests"] == remaining
        assert "x-proxy-degraded" not in headers
    caplog.set_level("ERROR", "proxy.limits")
    redis_proc.kill()
    outcomes = []
    for _ in range(7):
        status, headers, seconds = attempt(proxy)
        assert seconds < 1.0  # never hangs on a dead Redis
        outcomes.append((status, headers.get("x-proxy-degraded")))
    # Each of the 2 replicas may admit 10 / 2 = 5 on its own while Redis is down.
    assert outcomes == [(200, "store-unavailable")] * 5 + [(429, "store-unavailable")] * 2
    assert limiter_of(proxy).degraded_total == 7
    assert len([r for r in caplog.records if "limits store unavailable" in r.getMessage()]) == 1
    # still serving: stays in the load balancer, marked degraded (every replica shares the store)
    readiness(proxy, (200, "degraded", True))
    assert scraped(proxy, "openrouter_proxy_limits_degraded_total") == 7
    redis_proc.start()  # an empty Redis: counting starts again
    headers = until_shared(proxy)
    assert headers["x-ratelimit-remaining-requests"] == "9"
    readiness(proxy, (200, "ready", False))


def test_fail_closed_answers_503_then_recovers(make: Any, redis_proc: RestartableRedis) -> None:
    proxy = make(failure_policy="fail_closed", store_retry_s=1.0)
    lane = limiter_of(proxy).failover.backend._lane  # type: ignore[attr-defined]
    assert lane.connected  # opened at startup: a first admission need not fit a connect into its timeout
    assert attempt(proxy)[0] == 200
    readiness(proxy, (200, "ready", False))
    redis_proc.kill()
    readiness(proxy, (503, "not_ready", False))  # chat completions would be 503s: out of the balancer
    for _ in range(3):
        client = openai.OpenAI(base_url=proxy.base_url, api_key=ALICE_KEY, max_retries=0, timeout=10)
        began = time.monotonic()
        with pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(model=MINI, messages=MESSAGES)
        assert time.monotonic() - began < 1.0
        error = info.value
        assert error.status_code == 503 and error.code == "limits_unavailable"
        assert error.response.headers["x-proxy-degraded"] == "store-unavailable"
        assert "limits store is unreachable" in error.message
        assert error.response.headers["retry-after"] == "1"
        assert "x-should-retry" not in error.response.headers  # retrying later is right
        client.close()
    assert limiter_of(proxy).degraded_total == 3
    readiness(proxy, (503, "not_ready", True))
    assert scraped(proxy, "openrouter_proxy_limits_degraded_total") == 3
    redis_proc.start()
    until_shared(proxy)
    # the probe that found it again ends the wait: no more 503s for store_retry_s
    assert [attempt(proxy)[0] for _ in range(3)] == [200] * 3
    readiness(proxy, (200, "ready", False))


def test_a_frozen_redis_times_out_fast_and_is_picked_up_again(make: Any, redis_proc: RestartableRedis) -> None:
    proxy = make(failure_policy="fail_open", store_timeout_ms=50)
    assert attempt(proxy)[0] == 200
    readiness(proxy, (200, "ready", False))
    time.sleep(1.1)  # past the probe's cached result
    redis_proc.freeze(True)
    try:
        # a Redis that hangs (not one that refuses) must not hang the probe beyond its budget
        readiness(proxy, (200, "degraded", False))
        timings = []
        for _ in range(4):
            status, headers, seconds = attempt(proxy)
            assert (status, headers.get("x-proxy-degraded")) == (200, "store-unavailable")
            timings.append(seconds)
        assert max(timings) < 0.5
    finally:
        redis_proc.freeze(False)
    until_shared(proxy)
    readiness(proxy, (200, "ready", False))  # the probe that hung did not stay in the way


def test_ready_reports_the_store_and_admission_degrades_without_it() -> None:
    async def main() -> None:
        store = open_store("redis://127.0.0.1:1/0")  # nothing listens there
        spec = {"tiers": {"t": {"requests_per_minute": 4, "concurrent_requests": 2}}}
        opened = limiter(store, spec, replicas=2, store_timeout_ms=50)
        closed = limiter(store, spec, failure_policy="fail_closed", store_timeout_ms=50)
        try:
            state = opened.state()
            assert state["store"] == "redis" and state["degraded"] is False  # nothing tried it yet
            tickets = [await opened.admit(principal(), call(), plan()) for _ in range(1)]
            assert DEGRADED_HEADER in tickets[0].headers
            assert dict(tickets[0].headers)[b"x-ratelimit-limit-requests"] == b"2"  # the local share
            state = opened.state()
            assert state["degraded"] is True and state["degraded_total"] == 1 and state["last_error"]
            with pytest.raises(LimitsUnavailable):
                await closed.admit(principal(), call(), plan())
            assert closed.rejected_total["store"] == 1
        finally:
            await store.aclose()

    asyncio.run(main())


def test_a_settlement_the_store_did_not_take_is_counted_and_exported(redis_proc: RestartableRedis) -> None:
    async def main() -> None:
        store = open_store(redis_proc.url)
        held = limiter(store, {"tiers": {"t": {"concurrent_requests": 2}}}, store_timeout_ms=300)
        metrics = Metrics()
        metrics.watch_limits(held.failover)
        try:
            ticket = await held.admit(principal(), call(), plan())
            assert DEGRADED_HEADER not in ticket.headers
            redis_proc.kill()
            await held.settle(ticket, record())
            assert held.settle_failures_total == 1
            assert metrics.registry.get_sample_value("openrouter_proxy_limits_settle_failures_total") == 1
            assert metrics.registry.get_sample_value("openrouter_proxy_limits_degraded_total") == 0
        finally:
            await held.aclose()
            await store.aclose()

    asyncio.run(main())


def test_holds_of_reservations_that_timed_out_in_a_long_freeze_are_released_after_it(
    make: Any, redis_proc: RestartableRedis
) -> None:
    """Redis freezes for longer than the lane's stall limit: a reservation already written
    times out (the request goes on with local counters), the lane drops its connection, and
    the reservation still runs when Redis thaws. Its release is retried until Redis takes
    it, so no slot stays held until its lease (16 min)."""
    proxy = make(failure_policy="fail_open", store_timeout_ms=50, store_retry_s=0.2)
    limiter_of(proxy).failover.backend._lane._stall_s = 0.5  # type: ignore[attr-defined]  # (5 s in service)
    assert attempt(proxy)[0] == 200
    redis_proc.freeze(True)
    try:
        outcomes = []
        for _ in range(6):  # spread over the freeze: the stall is noticed, the connection dropped
            outcomes.append(attempt(proxy)[0])
            time.sleep(0.4)
    finally:
        redis_proc.freeze(False)
    assert 200 in outcomes

    def holds() -> list[str]:
        """The request holds in Redis's concurrency hashes (``r:<request id>`` fields)."""

        async def scan() -> list[str]:
            redis = aioredis.Redis.from_url(redis_proc.url)
            found = [
                field.decode()
                async for key in redis.scan_iter("*concurrent_requests*", _type="HASH")
                for field in await redis.hkeys(key)
                if field.startswith(b"r:")
            ]
            await redis.aclose()
            return found

        return asyncio.run(scan())

    deadline = time.monotonic() + 10
    while holds() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert holds() == []
    headers = until_shared(proxy)
    assert headers["x-ratelimit-remaining-requests"]  # Redis decides again


def test_a_release_still_pending_at_shutdown_gets_one_last_try() -> None:
    """A settlement failed and its retry waits (store_retry_s); the worker shuts down: the
    release is tried once more before the backend closes, instead of waiting for its lease."""
    from proxy.config import LimitsSettings
    from proxy.limits.backend import Release
    from proxy.limits.failover import Failover
    from proxy.store import StoreUnavailable

    calls: list[str] = []

    class Flaky:
        name = "redis"

        async def settle(self, releases: Any, rid: str, now_ms: int, **kw: Any) -> list[int]:
            calls.append(rid)
            if len(calls) == 1:
                raise StoreUnavailable("down for a moment")
            return []

    async def main() -> None:
        failover = Failover(LimitsSettings(store_retry_s=30), Flaky(), time.time)  # type: ignore[arg-type]
        backend: Any = failover.backend
        assert await failover.settle(backend, [Release("k", False)], "rid-1", 0) is None
        await asyncio.sleep(0.05)
        await failover.aclose()

    asyncio.run(main())
    assert calls == ["rid-1", "rid-1"]
