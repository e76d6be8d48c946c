"""The store seam: shared state behind one protocol, in memory or in Redis.

``open_store(redis_url)`` returns a ``RedisStore`` when a URL is given (many replicas
share it and act as one) and the embedded ``MemoryStore`` otherwise, with the same
semantics for one process. Redis errors are translated here (``StoreUnavailable``) and
nowhere else.
"""

from __future__ import annotations

from proxy.store.base import Reachability, Store, StoreUnavailable, day_of, nano_usd
from proxy.store.memory import MemoryStore
from proxy.store.usage import LedgerWrite, Retention, UsageLedger, UsageTotals

__all__ = [
    "LedgerWrite",
    "MemoryStore",
    "Reachability",
    "Retention",
    "Store",
    "StoreUnavailable",
    "UsageLedger",
    "UsageTotals",
    "day_of",
    "nano_usd",
    "open_store",
]


def open_store(redis_url: str | None) -> Store:
    if not redis_url:
        return MemoryStore()
    from proxy.store.redis import RedisStore

    return RedisStore(redis_url)
