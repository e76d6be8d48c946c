"""The Redis store: many proxy replicas share one Redis (or Redis Cluster) and act as one.

Usage totals live in one hash per UTC day, ``orp:{usage}:<day>``, with fields
``<key>\\x1f<model>\\x1f<metric>``; each request adds its counters with one pipelined
round trip (``HINCRBY`` only: costs are integer nano-USD, so sums are exact). The
``{usage}`` hash tag keeps a day's keys on one Cluster slot. Every redis-py error is
translated to ``StoreUnavailable`` here.
"""

from __future__ import annotations

from collections import defaultdict

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from proxy.store.base import METRICS, StoreUnavailable, UsageTotals, counters_of, day_of, totals_of
from proxy.types import UsageRecord

__all__ = ["RedisStore"]

_SEP = "\x1f"
_DAY_TTL_S = 400 * 86400


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

    @property
    def client(self) -> aioredis.Redis:
        """The shared redis-py client (one connection pool per worker) for other stores."""
        return self._redis

    @staticmethod
    def _day_key(day: str) -> str:
        return f"orp:{{usage}}:{day}"

    async def add_usage(self, record: UsageRecord) -> None:
        key = self._day_key(day_of(record.ts))
        prefix = f"{record.key_name or '-'}{_SEP}{record.routed_model or record.requested_model or '-'}{_SEP}"
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for name, value in counters_of(record).items():
                    if value:
                        pipe.hincrby(key, prefix + name, value)
                pipe.expire(key, _DAY_TTL_S)
                await pipe.execute()
        except RedisError as exc:
            raise StoreUnavailable(str(exc)) from exc

    async def usage_totals(self, day: str) -> list[UsageTotals]:
        try:
            raw = await self._redis.hgetall(self._day_key(day))
        except RedisError as exc:
            raise StoreUnavailable(str(exc)) from exc
        groups: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: dict.fromkeys(METRICS, 0))
        for field, value in raw.items():
            key, model, metric = str(field).split(_SEP)
            if metric in METRICS:
                groups[(key, model)][metric] = int(value)
        return totals_of(day, groups)

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except RedisError:
            return False

    async def aclose(self) -> None:
        await self._redis.aclose()
        await self._redis.connection_pool.disconnect()
