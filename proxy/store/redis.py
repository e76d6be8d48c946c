"""The Redis store: many proxy replicas share one Redis (or Redis Cluster) and act as one.

``redis://`` / ``rediss://`` (TLS) URLs name one Redis endpoint; ``redis+cluster://`` /
``rediss+cluster://`` name any node of a Redis Cluster, and the client (redis-py's
``RedisCluster``) discovers the others, routes each command to the node owning its hash
slot and follows ``MOVED``/``ASK`` redirects when slots move. Every multi-key command and
script touches keys of one hash tag (``{t:<team>}``/``{k:<key>}`` per request,
``{usage}``, ``{keys}``, ``{breakers}``), so each runs on one slot.

The usage ledger (``store.usage``, a Stream plus per-day rollup hashes) is
``proxy.store.usage_redis``; it shares this store's client. Every redis-py error is
translated to ``StoreUnavailable`` here and there.
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.client import NEVER_DECODE

from proxy.store.base import Reachability, StoreUnavailable
from proxy.store.redis_errors import REDIS_ERRORS
from proxy.store.redis_probe import PROBE_TIMEOUT_S, NodeProbe
from proxy.store.usage_redis import RedisUsage

__all__ = ["CLUSTER_SCHEMES", "RedisClient", "RedisStore", "cluster_url"]

_BREAKERS = "orp:{breakers}"
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
RedisClient = aioredis.Redis | aioredis.RedisCluster


def cluster_url(url: str) -> str | None:
    """The plain ``redis://``/``rediss://`` URL of a ``redis+cluster://``/``rediss+cluster://``
    one (``None``: not a cluster URL)."""
    scheme, sep, rest = url.partition("://")
    plain = CLUSTER_SCHEMES.get(scheme.lower()) if sep else None
    return f"{plain}://{rest}" if plain else None


class RedisStore:
    """The shared ``Store``; ``timeout_s`` bounds connecting and each reply (seconds)."""

    name = "redis"

    def __init__(self, url: str, *, timeout_s: float = 1.0, max_connections: int = 64) -> None:
        options = {
            "socket_timeout": timeout_s,
            "socket_connect_timeout": timeout_s,
            "health_check_interval": 30,
            "decode_responses": True,
        }
        plain = cluster_url(url)
        self._probe = NodeProbe(plain or url, cluster=plain is not None, timeout_s=min(timeout_s, PROBE_TIMEOUT_S))
        self._redis: RedisClient
        if plain is not None:
            # per node; past it redis-py fails a command instead of waiting, so leave room
            # beyond the limiter's fallback path (at most 128 calls, proxy.limits.cluster)
            self._redis = aioredis.RedisCluster.from_url(plain, max_connections=4 * max_connections, **options)
        else:
            pool = aioredis.BlockingConnectionPool.from_url(
                url, max_connections=max_connections, timeout=timeout_s, **options
            )
            self._redis = aioredis.Redis(connection_pool=pool)
        self.usage = RedisUsage(self._redis)

    @property
    def client(self) -> RedisClient:
        """The shared redis-py client (one connection pool per worker, or per node and
        worker in a cluster) for other stores."""
        return self._redis

    async def ping(self) -> bool:
        return not (await self.ping_nodes()).unreachable

    async def ping_nodes(self) -> Reachability:
        """One ``PING`` to the endpoint, or to every primary of a cluster, on the probe's
        own connections (``proxy.store.redis_probe``), never the shared client's."""
        known = [] if isinstance(self._redis, aioredis.Redis) else [n.name for n in self._redis.get_nodes()]
        return await self._probe.ping_nodes(known)

    async def breaker_publish(self, target: str, open_until: float) -> None:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hset(_BREAKERS, target, repr(open_until))
                pipe.expire(_BREAKERS, 3600)
                await pipe.execute()
        except REDIS_ERRORS as exc:
            raise StoreUnavailable(str(exc)) from exc

    async def breaker_states(self) -> dict[str, float]:
        try:
            raw = await self._redis.hgetall(_BREAKERS)
        except REDIS_ERRORS as exc:
            raise StoreUnavailable(str(exc)) from exc
        return {str(k): float(v) for k, v in raw.items()}

    async def cache_get(self, key: str) -> bytes | None:
        try:  # raw bytes: this client decodes replies to str, cached bodies stay bytes
            raw = await self._redis.execute_command("GET", key, **{NEVER_DECODE: True})
        except REDIS_ERRORS as exc:
            raise StoreUnavailable(str(exc)) from exc
        return bytes(raw) if raw is not None else None

    async def cache_set(self, key: str, value: bytes, ttl_s: float) -> None:
        try:
            await self._redis.set(key, value, px=max(1, round(ttl_s * 1000)))
        except REDIS_ERRORS as exc:
            raise StoreUnavailable(str(exc)) from exc

    async def aclose(self) -> None:
        await self._probe.aclose()
        await self._redis.aclose()
        if isinstance(self._redis, aioredis.Redis):
            await self._redis.connection_pool.disconnect()
        else:  # RedisCluster.aclose does nothing while it waits to read its map again
            await self._redis.nodes_manager.aclose()
            await self._redis.nodes_manager.aclose("startup_nodes")
