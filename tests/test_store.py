"""The same store tests against the in-memory store and a real redis-server."""

from __future__ import annotations

import asyncio
import time

import pytest

from proxy.accounting import account, write_of
from proxy.store import MemoryStore, Retention, Store, StoreUnavailable, open_store
from proxy.store.base import day_of
from proxy.types import Usage, UsageRecord

from .factories import usage_record


def record(key: str, model: str, *, cost: float | None, status: int = 200, ts: float | None = None) -> UsageRecord:
    usage = Usage(prompt_tokens=10, completion_tokens=5, total_tokens=15, cost_usd=cost)
    return usage_record(key=key, team="t", model=model, status=status, usage=usage, ts=ts)


async def add(store: Store, rec: UsageRecord) -> None:
    """One request into the store's ledger (stream + rollups), as the ledger writer does."""
    await store.usage.append([write_of(account(rec, lambda model: None).line())], Retention())


async def _exercise(store: Store) -> None:
    today = day_of(time.time())
    before = {(t.key, t.model): t for t in await store.usage.totals(today)}
    base = before.get(("alice", "m/one"))
    base_requests = base.requests if base else 0
    await asyncio.gather(*(add(store, record("alice", "m/one", cost=0.0000075)) for _ in range(100)))
    await add(store, record("alice", "m/one", cost=None, status=502))
    await add(store, record("bob", "m/two", cost=0.1))
    totals = {(t.key, t.model): t for t in await store.usage.totals(today)}
    alice = totals[("alice", "m/one")]
    assert alice.requests - base_requests == 101
    assert alice.errors >= 1
    assert alice.prompt_tokens >= 1010
    # 100 x 0.0000075 USD, summed exactly (integer nano-USD), not 0.0007499999...
    assert round(alice.cost_usd - (base.cost_usd if base else 0), 12) == 0.00075
    assert totals[("bob", "m/two")].cost_usd >= 0.1
    assert await store.ping() is True


def test_usage_totals_are_exact(store_url: str | None) -> None:
    async def main() -> None:
        store = open_store(store_url)
        try:
            await _exercise(store)
        finally:
            await store.aclose()

    asyncio.run(main())


def test_days_are_kept_apart() -> None:
    async def main() -> None:
        store = MemoryStore()
        yesterday = time.time() - 86400  # rollups older than their TTL (400 days) are gone
        await add(store, record("a", "m", cost=1.0, ts=yesterday))
        await add(store, record("a", "m", cost=2.0, ts=yesterday + 86400))
        assert [t.cost_usd for t in await store.usage.totals(day_of(yesterday))] == [1.0]

    asyncio.run(main())


def test_unreachable_redis_raises_store_unavailable() -> None:
    async def main() -> None:
        store = open_store("redis://127.0.0.1:1/0")
        try:
            assert await store.ping() is False
            with pytest.raises(StoreUnavailable):
                await add(store, record("a", "m", cost=1.0))
        finally:
            await store.aclose()

    asyncio.run(main())
