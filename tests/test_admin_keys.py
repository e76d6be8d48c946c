"""Runtime virtual keys: the admin API, the ``keys`` CLI, and revocation across replicas."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import redis.asyncio as aioredis
import yaml

from proxy.auth import hash_key
from proxy.cli import main
from proxy.limits.policy import KeyBudgets

from .conftest import ALICE_KEY, ProxyUnderTest
from .limits_support import open_test_store

ADMIN_KEY = "sk-admin-test-2222222222222222222222222222"
MESSAGES: Any = [{"role": "user", "content": "Hi"}]
MINI = "openai/gpt-4o-mini"
POLICY = {
    "default_tier": "std",
    "tiers": {"tiny": {"requests_per_day": 1}, "std": {"requests_per_day": 100, "budget_usd_per_day": 1}},
}
MakeProxy = Callable[..., ProxyUnderTest]


@pytest.fixture
def admin_proxy(tmp_path: Path, proxy_server: MakeProxy) -> Callable[..., ProxyUnderTest]:
    def make(store_url: str | None, *, admin: bool = True) -> ProxyUnderTest:
        (tmp_path / "policies").mkdir(exist_ok=True)
        (tmp_path / "policies" / "limits.yaml").write_text(yaml.safe_dump(POLICY))
        extra: dict[str, Any] = {"limits": {"store_timeout_ms": 5000}}
        if admin:
            extra["admin"] = {"key_sha256": hash_key(ADMIN_KEY)}
        if store_url is not None:
            extra["store"] = {"redis_url": store_url}
        return proxy_server(extra=yaml.safe_dump(extra))

    return make


def admin(proxy: ProxyUnderTest, method: str, path: str, body: Any = None, key: str = ADMIN_KEY) -> httpx.Response:
    return httpx.request(method, f"{proxy.url}{path}", json=body, headers={"Authorization": f"Bearer {key}"})


def chat(proxy: ProxyUnderTest, key: str) -> int:
    client = openai.OpenAI(base_url=proxy.base_url, api_key=key, max_retries=0, timeout=10)
    try:
        client.chat.completions.create(model=MINI, messages=MESSAGES)
        return 200
    except openai.APIStatusError as exc:
        return exc.status_code
    finally:
        client.close()


def eventually(probe: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.02)


def test_the_admin_api_needs_the_admin_key(admin_proxy: Callable[..., ProxyUnderTest]) -> None:
    closed = admin_proxy(None, admin=False)
    response = admin(closed, "GET", "/admin/keys")
    assert response.status_code == 403 and "PROXY_ADMIN_KEY" in response.json()["error"]["message"]
    proxy = admin_proxy(None)
    assert admin(proxy, "GET", "/admin/keys", key=ALICE_KEY).status_code == 401
    assert httpx.get(f"{proxy.url}/admin/keys").status_code == 401
    assert admin(proxy, "GET", "/admin/keys").status_code == 200


def test_create_use_update_and_revoke_a_key(admin_proxy: Callable[..., ProxyUnderTest], store_url: str | None) -> None:
    open_test_store(store_url)
    proxy = admin_proxy(store_url)
    response = admin(proxy, "POST", "/admin/keys", {"name": "carol", "team": "ops", "tier": "tiny"})
    assert response.status_code == 201, response.text
    created = response.json()
    secret = created["key"]
    assert secret.startswith("sk-proxy-") and created["key_id"] == hash_key(secret)[:12]
    assert (created["team"], created["effective_tier"], created["source"]) == ("ops", "tiny", "runtime")

    assert chat(proxy, secret) == 200  # honoured at once on this replica
    assert chat(proxy, secret) == 429  # the tiny tier: 1 request a day

    listing = admin(proxy, "GET", "/admin/keys")
    names = {k["name"]: k["source"] for k in listing.json()["data"]}
    assert names == {"alice": "config", "bob": "config", "carol": "runtime"}
    assert secret not in listing.text and hash_key(secret) not in listing.text  # only the short key_id

    updated = admin(proxy, "PATCH", "/admin/keys/carol", {"tier": "std", "budget_usd_per_day": 0.5})
    assert updated.status_code == 200 and updated.json()["budget_usd_per_day"] == 0.5
    assert chat(proxy, secret) == 200

    def spent() -> dict[str, Any] | None:
        shown = admin(proxy, "GET", "/admin/keys/carol").json()
        (budget,) = shown["limits"]["budgets"]
        return shown if budget["spent_usd"] > 0 and budget["reserved_usd"] == 0 else None

    shown = eventually(spent)
    assert shown, "the spend never showed"
    (budget,) = shown["limits"]["budgets"]
    assert budget["limit_usd"] == 0.5 and budget["remaining_usd"] == pytest.approx(0.5 - budget["spent_usd"])
    (requests,) = shown["limits"]["limits"]
    # Counters belong to the key, not the tier: the call made on "tiny" still counts today.
    assert (requests["limit"], requests["value"], requests["used"]) == ("requests_per_day", 100, 2)
    own = httpx.get(f"{proxy.base_url}/limits", headers={"Authorization": f"Bearer {secret}"}).json()
    assert own["key"] == "carol" and own["budgets"] == shown["limits"]["budgets"]

    for body, param in (
        ({"tier": "gold"}, "tier"),
        ({"colour": "red"}, "colour"),
        ({"budget_usd_total": -1}, None),
        ({"budget_usd_per_month": 2_000_000}, None),  # above MAX_BUDGET_USD
    ):
        refused = admin(proxy, "PATCH", "/admin/keys/carol", body)
        assert refused.status_code == 400 and refused.json()["error"]["type"] == "invalid_request_error"
        if param:
            assert refused.json()["error"]["param"] == param
    assert admin(proxy, "POST", "/admin/keys", {"name": "carol"}).status_code == 400
    assert admin(proxy, "POST", "/admin/keys", {"name": "alice"}).status_code == 400
    assert admin(proxy, "PATCH", "/admin/keys/alice", {"tier": "tiny"}).status_code == 400
    assert admin(proxy, "POST", "/admin/keys", {"name": "bad name!"}).status_code == 400

    assert admin(proxy, "DELETE", "/admin/keys/carol").json() == {"name": "carol", "revoked": True}
    assert chat(proxy, secret) == 401  # at once on this replica
    assert admin(proxy, "DELETE", "/admin/keys/carol").status_code == 404
    assert admin(proxy, "GET", "/admin/keys/carol").status_code == 404


def test_keys_reach_and_leave_every_replica_within_about_a_second(
    admin_proxy: Callable[..., ProxyUnderTest], redis_url: str
) -> None:
    open_test_store(redis_url)
    first, second = admin_proxy(redis_url), admin_proxy(redis_url)
    secret = admin(first, "POST", "/admin/keys", {"name": "erin"}).json()["key"]
    began = time.monotonic()
    assert eventually(lambda: chat(second, secret) == 200, timeout=3)
    assert time.monotonic() - began < 2.0
    admin(first, "DELETE", "/admin/keys/erin")
    assert chat(first, secret) == 401
    began = time.monotonic()
    assert eventually(lambda: chat(second, secret) == 401, timeout=3)
    assert time.monotonic() - began < 2.0
    names = [k["name"] for k in admin(second, "GET", "/admin/keys").json()["data"]]
    assert "erin" not in names


def test_the_keys_cli_drives_a_running_proxy(
    admin_proxy: Callable[..., ProxyUnderTest], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    proxy = admin_proxy(None)
    monkeypatch.delenv("PROXY_ADMIN_KEY", raising=False)
    assert main(["keys", "list", "--url", proxy.url]) == 2
    assert "PROXY_ADMIN_KEY" in capsys.readouterr().err
    monkeypatch.setenv("PROXY_ADMIN_KEY", ADMIN_KEY)

    assert main(["keys", "create", "--name", "dave", "--tier", "tiny", "--url", proxy.url]) == 0
    found = re.search(r"sk-proxy-[A-Za-z0-9_-]+", capsys.readouterr().out)
    assert found is not None
    secret = found.group(0)
    assert chat(proxy, secret) == 200

    assert main(["keys", "list", "--url", proxy.url]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["name", "key_id", "team", "tier", "source"]
    assert ["dave", hash_key(secret)[:12], "-", "tiny", "runtime"] in [row.split() for row in table]

    assert main(["keys", "update", "dave", "--tier", "std", "--budget-day", "2", "--url", proxy.url]) == 0
    assert orjson.loads(capsys.readouterr().out)["budget_usd_per_day"] == 2.0
    assert main(["keys", "show", "dave", "--url", proxy.url]) == 0
    shown = orjson.loads(capsys.readouterr().out)
    assert shown["effective_tier"] == "std" and shown["limits"]["budgets"][0]["limit_usd"] == 2.0
    assert main(["keys", "update", "dave", "--budget-day", "none", "--url", proxy.url]) == 0
    assert orjson.loads(capsys.readouterr().out)["budget_usd_per_day"] is None

    assert main(["keys", "revoke", "dave", "--url", proxy.url]) == 0
    assert "revoked 'dave'" in capsys.readouterr().out
    assert chat(proxy, secret) == 401
    assert main(["keys", "revoke", "dave", "--url", proxy.url]) == 1
    assert "404" in capsys.readouterr().err
    assert main(["keys", "list", "--url", "http://127.0.0.1:1"]) == 2


@pytest.mark.parametrize(
    "damage",
    [
        b"not json",
        b"[1, 2]",
        b'{"name": "mallory", "sha256": "short"}',
        b'{"name": "mallory", "sha256": "' + b"a" * 64 + b'", "budgets": {"usd_per_day": 5000000}}',
        b'{"name": "mallory", "sha256": "' + b"a" * 64 + b'", "budgets": {"usd_per_day": "lots"}}',
        b'{"name": "mallory", "sha256": "' + b"a" * 64 + b'", "colour": "red"}',
    ],
)
def test_a_damaged_record_in_the_store_is_skipped_and_the_others_still_apply(
    redis_url: str, damage: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    from proxy.keystore import KeyRecord, RedisKeyStore

    async def main() -> None:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        store = RedisKeyStore(client)
        try:
            await client.delete("orp:{keys}:records", "orp:{keys}:version")
            good = KeyRecord("carol", "b" * 64, "research", None, KeyBudgets(usd_per_day=5.0))
            await store.change("create", good)
            await client.hset("orp:{keys}:records", "mallory", damage)
            with caplog.at_level(logging.ERROR, logger="proxy.keystore"):
                assert await store.records() == [good]
            assert "'mallory' in the store is invalid" in caplog.text
            assert await store.change("delete", KeyRecord("mallory", "")) is None  # revoking mends it
            assert await store.records() == [good]
        finally:
            await client.aclose()

    asyncio.run(main())


def test_a_config_key_without_a_tier_is_listed_as_configured_and_its_effective_tier(
    admin_proxy: Callable[..., ProxyUnderTest],
) -> None:
    proxy = admin_proxy(None)
    listing = {k["name"]: k for k in admin(proxy, "GET", "/admin/keys").json()["data"]}
    assert (listing["alice"]["tier"], listing["alice"]["effective_tier"]) == (None, "std")


def test_concurrent_updates_of_one_key_keep_each_other_s_changes(
    admin_proxy: Callable[..., ProxyUnderTest], store_url: str | None
) -> None:
    """Two PATCHes of different fields at once: both land (each is applied to what is stored,
    not to a copy another update has overwritten meanwhile)."""
    open_test_store(store_url)
    proxy = admin_proxy(store_url)
    names = [f"cas-{i}" for i in range(12)]
    for name in names:
        assert admin(proxy, "POST", "/admin/keys", {"name": name}).status_code == 201

    async def both(client: httpx.AsyncClient, name: str) -> None:
        url = f"{proxy.url}/admin/keys/{name}"
        replies = await asyncio.gather(
            client.patch(url, json={"team": "newteam"}), client.patch(url, json={"budget_usd_total": 7})
        )
        assert [r.status_code for r in replies] == [200, 200]

    async def run() -> None:
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as client:
            await asyncio.gather(*(both(client, name) for name in names))

    asyncio.run(run())
    for name in names:
        shown = admin(proxy, "GET", f"/admin/keys/{name}").json()
        assert (shown["team"], shown["budget_usd_total"]) == ("newteam", 7.0), name


def test_key_fields_are_taken_as_they_are_typed_or_refused(admin_proxy: Callable[..., ProxyUnderTest]) -> None:
    proxy = admin_proxy(None)
    for bad in (
        {"budget_usd_per_day": True},
        {"budget_usd_per_day": "5"},
        {"budget_usd_per_day": 1e-300},
        {"team": "  "},
    ):
        response = admin(proxy, "POST", "/admin/keys", {"name": "strict", **bad})
        assert response.status_code == 400, bad
    assert admin(proxy, "GET", "/admin/usage?by=key,key").status_code == 400


def test_a_record_stored_in_another_json_form_can_still_be_updated(
    admin_proxy: Callable[..., ProxyUnderTest], redis_url: str
) -> None:
    """A record written by hand (same fields, other order) does not match the proxy's own
    form byte for byte: the update retries against the stored form and lands."""
    import orjson
    import redis.asyncio as aioredis

    from proxy.keystore import _RECORDS, _VERSION

    open_test_store(redis_url)
    proxy = admin_proxy(redis_url)
    assert admin(proxy, "POST", "/admin/keys", {"name": "handmade", "team": "a"}).status_code == 201

    async def rewrite() -> None:
        client = aioredis.Redis.from_url(redis_url)
        stored = orjson.loads(await client.hget(_RECORDS, "handmade"))
        await client.hset(_RECORDS, "handmade", orjson.dumps(dict(reversed(list(stored.items())))))
        await client.incr(_VERSION)
        await client.aclose()

    asyncio.run(rewrite())
    patched = admin(proxy, "PATCH", "/admin/keys/handmade", {"team": "b"})
    assert patched.status_code == 200 and patched.json()["team"] == "b"
