"""The Redis store: many proxy replicas share one Redis and act as one.

Keys are laid out for Redis Cluster (hash tags per request and for the ledger), but the
client talks to one endpoint and does not follow ``MOVED`` redirects.

The usage ledger (``store.usage``, a Stream plus per-day rollup hashes) is
``proxy.store.usage_redis``; it shares this store's client. Every redis-py error is
translated to ``StoreUnavailable`` here and there.
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.client import NEVER_DECODE
from redis.exceptions import RedisError

from proxy.store.base import StoreUnavailable
from proxy.store.usage_redis import RedisUsage

__all__ = ["RedisStore"]

_BREAKERS = "orp:{breakers}"


class RedisStore:
    name = "redis"

    def __init__(self, url: str, *, timeout_s: float = 1.0, max_connections: int = 64) -> None:
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout_s,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            health_check_interval=30,
            decode_responses=True,
        )
        self._redis = aioredis.Redis(connection_pool=pool)
        self.usage = RedisUsage(self._redis)

    @property
    def client(self) -> aioredis.Redis:
        """The shared redis-py client (one connection pool per worker) for other stores."""
        return self._redis

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except RedisError:
            return False

    async def breaker_publish(self, target: str, open_until: float) -> None:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hset(_BREAKERS, target, repr(open_until))
                pipe.expire(_BREAKERS, 3600)
                await pipe.execute()
        except RedisError as exc:
            raise StoreUnavailable(str(exc)) from exc

    async def breaker_states(self) -> dict[str, float]:
        try:
            raw = await self._redis.hgetall(_BREAKERS)
        except RedisError as exc:
            raise StoreUnavailable(str(exc)) from exc
        return {str(k): float(v) for k, v in raw.items()}

    async def cache_get(self, key: str) -> bytes | None:
        try:  # raw bytes: this client decodes replies to str, cached bodies stay bytes
            raw = await self._redis.execute_command("GET", key, **{NEVER_DECODE: True})  # type: ignore[no-untyped-call]
        except RedisError as exc:
            raise StoreUnavailable(str(exc)) from exc
        return bytes(raw) if raw is not None else None

    async def cache_set(self, key: str, value: bytes, ttl_s: float) -> None:
        try:
            await self._redis.set(key, value, px=max(1, round(ttl_s * 1000)))
        except RedisError as exc:
            raise StoreUnavailable(str(exc)) from exc

    async def aclose(self) -> None:
        await self._redis.aclose()
        await self._redis.connection_pool.disconnect()
