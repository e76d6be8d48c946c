"""What a redis-py call can raise when Redis, or a Redis Cluster, is unavailable or refuses.

``RedisError`` covers one endpoint's errors; a cluster client also raises
``RedisClusterException`` (no reachable node, a slot without an owner), which is not a
``RedisError``; ``OSError`` covers what slips through from sockets (and ``TimeoutError``).
Adapters catch ``REDIS_ERRORS`` and raise ``StoreUnavailable``.
"""

from __future__ import annotations

from redis.exceptions import RedisClusterException, RedisError

__all__ = ["REDIS_ERRORS"]

REDIS_ERRORS: tuple[type[Exception], ...] = (RedisError, RedisClusterException, OSError)
