"""The proxy on a real three-node Redis Cluster (``redis+cluster://``), as the OpenAI SDK sees it.

The teams' hash tags land on different nodes (``{t:research}`` slot 1815 on the first,
``{t:web}`` slot 13665 on the third) and the ledger's ``{usage}`` (slot 9629) on the
second, so one request touches two nodes and the fleet all three. The store-contract,
limiter, ledger and key-store suites also run on a cluster (the ``store_url`` fixture);
this module checks what only a running proxy on a cluster shows, including a slot that
moves to another node while the proxy runs (``MOVED``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
import redis.asyncio as aioredis
import yaml
from redis.asyncio.cluster import ClusterNode
from redis.crc import key_slot

from proxy.limits.cluster import ClusterScripts
from proxy.limits.lane import ScriptLane
from proxy.store import Reachability
from proxy.store.redis import RedisStore, cluster_url

from .conftest import ALICE_KEY, BOB_KEY, ProxyUnderTest
from .factories import free_port
from .redis_server import redis_cluster

MESSAGES: Any = [{"role": "user", "content": "What is the capital of France?"}]
MINI = "openai/gpt-4o-mini"
POLICY = {"default_tier": "t", "tiers": {"t": {"requests_per_minute": 3}}}


@pytest.fixture
def cluster_proxy(tmp_path: Path, proxy_server: Any, fresh_cluster: str) -> ProxyUnderTest:
    (tmp_path / "policies").mkdir(exist_ok=True)
    (tmp_path / "policies" / "limits.yaml").write_text(yaml.safe_dump(POLICY))
    extra = {"store": {"redis_url": fresh_cluster}, "limits": {"store_timeout_ms": 5000}}
    proxy: ProxyUnderTest = proxy_server(extra=yaml.safe_dump(extra))
    return proxy


def nodes(url: str) -> redis.RedisCluster:
    plain = cluster_url(url)
    assert plain is not None
    return redis.RedisCluster.from_url(plain, decode_responses=True)


def ask(proxy: ProxyUnderTest, key: str) -> int:
    client = openai.OpenAI(base_url=proxy.base_url, api_key=key, max_retries=0, timeout=10)
    try:
        client.chat.completions.create(model=MINI, messages=MESSAGES, max_tokens=5)
    except openai.RateLimitError:
        return 429
    return 200


def node_keys(cluster: redis.RedisCluster, tag: str) -> tuple[str, list[str]]:
    """The node owning ``tag``'s slot and the keys with that tag it holds."""
    node = cluster.get_node_from_key("{" + tag + "}")
    found = cluster.keys(f"*{{{tag}}}*", target_nodes=node)
    return node.name, sorted(found)


def eventually(probe: Any, timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := probe()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return result


def test_limits_hold_per_team_on_the_node_that_owns_the_team(cluster_proxy: ProxyUnderTest, fresh_cluster: str) -> None:
    ready = httpx.get(f"{cluster_proxy.url}/readyz")
    assert ready.status_code == 200
    assert ready.json()["store"] == {"backend": "redis", "reachable": True, "nodes": 3, "unreachable_nodes": 0}
    assert [ask(cluster_proxy, ALICE_KEY) for _ in range(4)] == [200, 200, 200, 429]
    assert [ask(cluster_proxy, BOB_KEY) for _ in range(4)] == [200, 200, 200, 429]
    with nodes(fresh_cluster) as cluster:
        research_node, research = node_keys(cluster, "t:research")
        web_node, web = node_keys(cluster, "t:web")
        assert research_node != web_node
        assert any(k.endswith(":requests_per_minute") for k in research), research
        assert any(k.endswith(":requests_per_minute") for k in web), web
        # the ledger (batched, a moment later) on the node owning {usage}: one entry per request
        assert eventually(lambda: cluster.xlen("orp:{usage}:ledger") == 8), cluster.xlen("orp:{usage}:ledger")
    records = cluster_proxy.records(8)
    assert sorted(r["status"] for r in records) == [200] * 6 + [429] * 2


def move_slot(url: str, tag: str, to: str | None = None) -> tuple[str, str]:
    """Migrate ``tag``'s slot, keys and all, to node ``to`` (default: a node owning none of
    the tags these tests use), as ``redis-cli --cluster reshard`` does; ``(old owner, new owner)``."""
    with nodes(url) as cluster:
        slot = cluster.keyslot("{" + tag + "}")
        source = cluster.get_node_from_key("{" + tag + "}")
        primaries = cluster.get_primaries()
        busy = {cluster.get_node_from_key("{" + t + "}").name for t in ("t:research", "t:web")}
        target = next(n for n in primaries if (n.name == to if to else n.name not in busy | {source.name}))
        ids = {n.name: cluster.cluster_myid(n) for n in primaries}
        conn = {n.name: redis.Redis(host=n.host, port=n.port) for n in primaries}
    moved = False
    try:
        conn[target.name].execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source.name])
        conn[source.name].execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target.name])
        keys = conn[source.name].execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000)
        if keys:
            conn[source.name].execute_command("MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", *keys)
        for name in sorted(conn, key=lambda n: n != target.name):  # the new owner first
            conn[name].execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[target.name])
        moved = True
    finally:
        if not moved:  # the session's cluster must not stay half-way
            for client in conn.values():
                client.execute_command("CLUSTER", "SETSLOT", slot, "STABLE")
        for client in conn.values():
            client.close()
    return source.name, target.name


def test_a_slot_moved_to_another_node_is_followed_with_its_counters(
    cluster_proxy: ProxyUnderTest, fresh_cluster: str
) -> None:
    assert [ask(cluster_proxy, ALICE_KEY) for _ in range(2)] == [200, 200]
    old, new = move_slot(fresh_cluster, "t:research")
    try:
        with nodes(fresh_cluster) as cluster:
            owner, moved = node_keys(cluster, "t:research")
        assert (owner, bool(moved)) == (new, True)
        assert old != new
        # the proxy still has the old slot map: MOVED sends it to the new owner, whose counters
        # remember the two requests already made, so the limit of 3 per minute still holds
        assert [ask(cluster_proxy, ALICE_KEY) for _ in range(2)] == [200, 429]
        limits = cluster_proxy.records(4)
        assert [r["status"] for r in limits] == [200, 200, 200, 429]
    finally:
        move_slot(fresh_cluster, "t:research", to=old)  # the session's cluster, as it was


INCR = "return redis.call('INCRBY', KEYS[1], ARGV[1])"


@pytest.mark.asyncio
async def test_scripts_go_to_the_owner_s_lane_and_follow_a_moved_slot(fresh_cluster: str) -> None:
    plain = cluster_url(fresh_cluster)
    assert plain is not None
    client = aioredis.RedisCluster.from_url(plain)
    scripts = ClusterScripts(client)
    incr = client.register_script(INCR)
    generic = 0
    evalsha = client.evalsha

    def counting(*args: Any, **kwargs: Any) -> Any:  # redis-py's own path; the lanes bypass it
        nonlocal generic
        generic += 1
        return evalsha(*args, **kwargs)

    client.evalsha = counting  # type: ignore[method-assign]
    research, web = "orp:{t:research}:n", "orp:{t:web}:n"
    try:
        await client.script_load(INCR)  # on every primary, as RedisBackend.warm does
        replies = await asyncio.gather(*(scripts.evalsha(incr, [k], [1], 2.0) for k in (research, web) * 20))
        assert sorted(replies) == sorted(list(range(1, 21)) * 2)
        assert generic == 0
        with nodes(fresh_cluster) as cluster:
            owners = {k: cluster.get_node_from_key(k).name for k in (research, web)}
        assert owners[research] != owners[web]
        assert scripts.nodes() == set(owners.values())

        old, new = move_slot(fresh_cluster, "t:research")
        try:
            assert old == owners[research]
            assert await scripts.evalsha(incr, [research], [1], 2.0) == 21  # MOVED: map read again
            assert generic == 1
            assert [await scripts.evalsha(incr, [research], [1], 2.0) for _ in range(5)] == [22, 23, 24, 25, 26]
            assert generic == 1  # the new owner's lane from then on
            assert new in scripts.nodes()
            with nodes(fresh_cluster) as cluster:
                assert cluster.get(research) == "26"
        finally:
            move_slot(fresh_cluster, "t:research", to=old)
    finally:
        await scripts.aclose()
        await client.aclose()


@pytest.mark.asyncio
async def test_a_dead_node_is_routed_around_and_a_maybe_sent_call_is_not_resent(
    fresh_cluster: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = cluster_url(fresh_cluster)
    assert plain is not None
    client = aioredis.RedisCluster.from_url(plain)
    scripts = ClusterScripts(client)
    incr, count_keys = client.register_script(INCR), client.register_script("return #KEYS")
    key = "orp:{t:research}:n"
    try:
        await client.script_load(INCR)
        assert await scripts.evalsha(incr, [key], [1], 2.0) == 1
        assert await scripts.evalsha(count_keys, [], [], 2.0) == 0  # no keys: any node will do
        # the map names a node nobody listens on (a primary that died): the lane cannot
        # connect, so nothing was sent; redis-py's path reads the map again and finds the owner
        slot = key_slot(key.encode())
        dead = ClusterNode("127.0.0.1", free_port(), server_type="primary")
        client.nodes_manager.slots_cache[slot] = [dead]
        assert await scripts.evalsha(incr, [key], [1], 2.0) == 2
        assert dead.name in scripts.nodes()
        assert client.nodes_manager.get_node_from_slot(slot).name != dead.name

        async def broken_after_writing(*args: Any, **kwargs: Any) -> Any:
            raise ConnectionError("Redis connection lost")  # as the lane says when it may have run

        monkeypatch.setattr(ScriptLane, "evalsha", broken_after_writing)
        with pytest.raises(ConnectionError):
            await scripts.evalsha(incr, [key], [1], 2.0)
        monkeypatch.undo()
        with nodes(fresh_cluster) as cluster:
            assert cluster.get(key) == "2"  # not sent again through redis-py's path
    finally:
        await scripts.aclose()
        await client.aclose()


@pytest.mark.asyncio
async def test_readiness_pings_every_primary_and_names_a_dead_one() -> None:
    with redis_cluster() as url:  # its own cluster: one of its primaries is shut down
        store = RedisStore(url)
        try:
            assert await store.ping_nodes() == Reachability(3, [])
            assert await store.ping()
            await store.client.ping()  # the shared client has read its map, as live traffic does
            plain = cluster_url(url)
            assert plain is not None
            seed_port = int(url.rsplit(":", 1)[1])
            with redis.RedisCluster.from_url(plain) as cluster:
                seed = next(n for n in cluster.get_primaries() if n.port == seed_port)
                victim = next(n for n in cluster.get_primaries() if n.port != seed_port)
                with contextlib.suppress(redis.ConnectionError):
                    cluster.execute_command("SHUTDOWN", "NOSAVE", target_nodes=victim)
                # the other primaries answer, yet a third of the slots has no counters
                assert await store.ping_nodes() == Reachability(3, [victim.name])
                assert not await store.ping()
                with contextlib.suppress(redis.ConnectionError):
                    cluster.execute_command("SHUTDOWN", "NOSAVE", target_nodes=seed)
            # the URL's node is gone too: the map comes from a node the shared client knows
            found = await store.ping_nodes()
            assert (found.nodes, sorted(found.unreachable)) == (3, sorted([victim.name, seed.name]))
        finally:
            await store.aclose()
