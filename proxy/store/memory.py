"""The embedded in-memory store: the single-process default, same semantics as Redis."""

from __future__ import annotations

from proxy.store.base import Reachability
from proxy.store.cache_memory import MemoryCache
from proxy.store.usage_memory import MemoryUsage

__all__ = ["MemoryStore"]


class MemoryStore:
    name = "memory"

    def __init__(self) -> None:
        self.usage = MemoryUsage()
        self._breakers: dict[str, float] = {}
        self._cache = MemoryCache()

    async def ping(self) -> bool:
        return True

    async def ping_nodes(self) -> Reachability:
        return Reachability(1, [])

    async def breaker_publish(self, target: str, open_until: float) -> None:
        self._breakers[target] = open_until

    async def breaker_states(self) -> dict[str, float]:
        return dict(self._breakers)

    async def cache_get(self, key: str) -> bytes | None:
        return self._cache.get(key)

    async def cache_set(self, key: str, value: bytes, ttl_s: float) -> None:
        self._cache.set(key, value, ttl_s)

    async def aclose(self) -> None:
        return None
