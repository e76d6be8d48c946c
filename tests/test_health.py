"""``/readyz`` (store, breakers) and ``/health/upstream`` (OpenRouter's ``/key``, cached)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any
from unittest.mock import ANY

import httpx
import redis

from proxy.health import PROBE_STALE_S, PROBE_TTL_S, PROBE_WAIT_S, Health
from proxy.store import Reachability
from proxy.store.redis import RedisStore

from .conftest import ProxyUnderTest
from .factories import UpstreamLog
from .redis_server import redis_server
from .usage_fixtures import ledger_config


def test_ready_when_the_store_answers_with_breaker_states_and_no_address_when_it_does_not(
    proxy_server: Callable[..., ProxyUnderTest],
) -> None:
    with redis_server() as url:
        proxy = proxy_server(extra=ledger_config(redis_url=url))
        httpx.post(f"{proxy.base_url}/chat/completions", json={}, headers={"authorization": "Bearer nope"})
        ready = httpx.get(f"{proxy.url}/readyz")
        assert ready.status_code == 200
        body = ready.json()
        assert body["status"] == "ready"
        assert body["store"] == {"backend": "redis", "reachable": True, "nodes": 1, "unreachable_nodes": 0}
        assert body["limits"] == {
            "failure_policy": "fail_open",
            "degraded": False,
            "down_for_s": None,
            "degraded_total": 0,
        }
        assert body["breakers"] == {"open": 0, "half_open": 0}
    time.sleep(PROBE_TTL_S)  # past the cached probe: redis-server is gone now
    down = httpx.get(f"{proxy.url}/readyz")
    assert down.status_code == 200 and down.json()["status"] == "degraded"  # fail_open: still serving
    assert down.json()["store"] == {"backend": "redis", "reachable": False, "nodes": 1, "unreachable_nodes": 1}
    address = url.removeprefix("redis://").split("/")[0]
    assert address.split(":")[1] not in down.text  # no address on an unauthenticated endpoint
    assert httpx.get(f"{proxy.url}/healthz").status_code == 200  # alive all the same


class FakeStore:
    """A store whose probe answers from ``answers`` (the last one repeats), after ``delay_s``."""

    name = "redis"

    def __init__(self, *answers: Reachability, delay_s: float = 0.0) -> None:
        self.answers = list(answers)
        self.delay_s = delay_s
        self.probes = 0
        self.finished = 0

    async def ping_nodes(self) -> Reachability:
        self.probes += 1
        await asyncio.sleep(self.delay_s)
        self.finished += 1
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


def limits_state(policy: str) -> Callable[[], dict[str, Any]]:
    return lambda: {"failure_policy": policy, "degraded": False, "down_for_s": None, "degraded_total": 0}


async def no_key() -> Any:
    raise AssertionError("not called")


UP, DOWN = Reachability(1, []), Reachability(1, ["redis:6379"])
REFUSED_PASSWORD = Reachability(1, ["redis:6379"], misconfigured=True)


def test_readiness_by_policy_partial_outage_and_misconfiguration() -> None:
    async def statuses(store: FakeStore, policy: str) -> list[tuple[int, str]]:
        health = Health(store, no_key, limits=limits_state(policy))  # type: ignore[arg-type]
        seen = []
        for _ in range(len(store.answers)):
            code, body = await health.ready()
            seen.append((code, body["status"]))
            health._probed = None  # the next call probes again instead of using the cached result
        return seen

    async def main() -> None:
        # a refused password before any answer: a deployment to stop, whatever the policy
        wrong = FakeStore(REFUSED_PASSWORD, UP, REFUSED_PASSWORD)
        assert await statuses(wrong, "fail_open") == [(503, "not_ready"), (200, "ready"), (200, "degraded")]
        # an outage when the worker starts (say a SIGHUP restarted it meanwhile): fail_open serves
        assert await statuses(FakeStore(DOWN, UP), "fail_open") == [(200, "degraded"), (200, "ready")]
        assert await statuses(FakeStore(DOWN, UP), "fail_closed") == [(503, "not_ready"), (200, "ready")]
        # one primary of three down: degraded under either policy; all down: the policy decides
        for policy in ("fail_open", "fail_closed"):
            partial = FakeStore(Reachability(3, []), Reachability(3, ["b:1"]), Reachability(3, ["a:1", "b:1", "c:1"]))
            last = (200, "degraded") if policy == "fail_open" else (503, "not_ready")
            assert await statuses(partial, policy) == [(200, "ready"), (200, "degraded"), last]

    asyncio.run(main())


def test_a_hanging_store_answers_in_half_a_second_and_the_probe_runs_once() -> None:
    async def main() -> None:
        store = FakeStore(Reachability(3, ["b:1"]))
        health = Health(store, no_key, limits=limits_state("fail_closed"))  # type: ignore[arg-type]
        assert await health.ready() == (200, ANY)
        store.delay_s, store.answers = 2.0, [Reachability(3, [])]  # the next probe hangs
        # a recent answer serves while the probe runs: one slow node must not flip the status
        health._probed = (time.monotonic() - PROBE_TTL_S, health._probed[1])  # type: ignore[index]
        began = time.monotonic()
        results = await asyncio.gather(*(health.ready() for _ in range(5)))
        assert time.monotonic() - began < PROBE_WAIT_S + 0.3
        assert {(code, body["status"]) for code, body in results} == {(200, "degraded")}
        assert store.probes == 2  # one probe for the five calls
        # no recent answer: every node counts as not answering
        health._probed = (time.monotonic() - PROBE_STALE_S - 1, health._probed[1])  # type: ignore[index]
        code, body = await health.ready()
        assert (code, body["store"]["unreachable_nodes"]) == (503, 3)
        await asyncio.sleep(2.0)
        assert store.finished == 2  # never cancelled: it ran to its end
        assert (await health.ready())[1]["status"] == "ready"  # and its answer serves now

    asyncio.run(main())


def test_the_probe_tells_a_refused_password_from_an_outage() -> None:
    async def main(url: str) -> None:
        with redis.Redis.from_url(url) as admin:
            admin.config_set("requirepass", "sekret")
        for given, expected in (
            (url.replace("redis://", "redis://:sekret@"), Reachability(1, [], False)),
            (url, Reachability(1, [ANY], True)),  # no password: a deployment to stop
            (url.replace("redis://", "redis://:wrong@"), Reachability(1, [ANY], True)),
            ("redis://127.0.0.1:1/0", Reachability(1, ["127.0.0.1:1"], False)),  # nothing listens: an outage
            ("redis://no-such-host.invalid:6379/0", Reachability(1, [ANY], True)),
        ):
            store = RedisStore(given)
            try:
                assert await store.ping_nodes() == expected, given
            finally:
                await store.aclose()

    with redis_server() as url:
        asyncio.run(main(url))


def test_upstream_health_is_checked_through_key_and_cached(
    proxy_server: Callable[..., ProxyUnderTest], emulator_app: Any
) -> None:
    proxy = proxy_server(extra=ledger_config())
    key_checks = UpstreamLog(emulator_app, "/api/v1/key")
    first = httpx.get(f"{proxy.url}/health/upstream")
    second = httpx.get(f"{proxy.url}/health/upstream")
    assert first.status_code == second.status_code == 200
    assert first.json()["status"] == "ok" and first.json()["key_valid"] is True
    assert len(key_checks.wait(1)) == 1  # the second answer came from the cache
    assert second.json()["checked_at"] == first.json()["checked_at"]
    assert "limit" not in first.text and "label" not in first.text  # nothing about the account leaks


def test_upstream_health_tells_a_rejected_key_from_an_unreachable_upstream(
    proxy_server: Callable[..., ProxyUnderTest],
) -> None:
    rejected = proxy_server(extra=ledger_config(), api_key="sk-or-wrong-key")
    response = httpx.get(f"{rejected.url}/health/upstream")
    assert response.status_code == 503
    assert response.json() | {"checked_at": None, "age_s": None} == {
        "status": "key_rejected",
        "reachable": True,
        "key_valid": False,
        "exhausted": False,
        "checked_at": None,
        "age_s": None,
    }
    rejected.server.stop()
    unreachable = proxy_server(extra=ledger_config(), upstream_url="http://127.0.0.1:1/api/v1")
    response = httpx.get(f"{unreachable.url}/health/upstream")
    assert response.status_code == 503
    assert response.json()["status"] == "unavailable" and response.json()["reachable"] is False


def test_the_probe_keeps_credentials_and_tls_options_but_not_timeouts_from_the_url() -> None:
    from proxy.store.redis_probe import _probe_url

    url = "rediss://user:p%40ss@seed:7000/0?ssl_cert_reqs=none&socket_timeout=30&max_connections=9"
    assert _probe_url(url, "10.0.0.2:7001") == "rediss://user:p%40ss@10.0.0.2:7001/0?ssl_cert_reqs=none"
    assert _probe_url(url, "::1:7001") == "rediss://user:p%40ss@[::1]:7001/0?ssl_cert_reqs=none"
    assert _probe_url("unix:///run/redis.sock?db=1&socket_connect_timeout=5", None) == "unix:///run/redis.sock?db=1"
    assert _probe_url("redis://h:6379/2", None) == "redis://h:6379/2"
