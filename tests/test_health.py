"""``/readyz`` (store, breakers) and ``/health/upstream`` (OpenRouter's ``/key``, cached)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx

from .conftest import ProxyUnderTest
from .redis_server import redis_server
from .usage_fixtures import ledger_config


def key_checks(emulator_app: Any) -> int:
    return sum(1 for r in emulator_app.requests if r.path == "/api/v1/key")


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
        assert isinstance(body["breakers"], dict)
    down = httpx.get(
        f"{proxy.url}/readyz"
    )  # redis-server is gone now (fail_open: degraded, see test_limits_store_down)
    assert down.json()["store"] == {"backend": "redis", "reachable": False, "nodes": 1, "unreachable_nodes": 1}
    address = url.removeprefix("redis://").split("/")[0]
    assert address.split(":")[1] not in down.text  # no address on an unauthenticated endpoint
    assert httpx.get(f"{proxy.url}/healthz").status_code == 200  # alive all the same


def test_upstream_health_is_checked_through_key_and_cached(
    proxy_server: Callable[..., ProxyUnderTest], emulator_app: Any
) -> None:
    proxy = proxy_server(extra=ledger_config())
    before = key_checks(emulator_app)
    first = httpx.get(f"{proxy.url}/health/upstream")
    second = httpx.get(f"{proxy.url}/health/upstream")
    assert first.status_code == second.status_code == 200
    assert first.json()["status"] == "ok" and first.json()["key_valid"] is True
    assert key_checks(emulator_app) - before == 1  # the second answer came from the cache
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
