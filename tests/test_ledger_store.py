"""The usage-ledger contract (``store.usage``), the same against memory and a real redis-server."""

from __future__ import annotations

import asyncio
import time

import orjson

from proxy.accounting import account, counters_of_line, write_of
from proxy.store import LedgerWrite, Retention, Store, open_store
from proxy.store.base import day_of
from proxy.store.usage import parse_id
from proxy.types import Usage

from .usage_fixtures import record


def write(cost: float, *, key: str = "alice", ticket: bytes | None = None, ts: float | None = None) -> LedgerWrite:
    usage = Usage(prompt_tokens=10, completion_tokens=5, total_tokens=15, cost_usd=cost)
    return write_of(account(record(key=key, usage=usage, ts=ts), lambda model: None).line(), ticket=ticket)


def run(store_url: str | None, scenario: object) -> None:
    async def main() -> None:
        store = open_store(store_url)
        try:
            await scenario(store)  # type: ignore[operator]
        finally:
            await store.aclose()

    asyncio.run(main())


def test_append_keeps_order_ids_and_rollups_in_agreement(store_url: str | None) -> None:
    async def scenario(store: Store) -> None:
        writes = [write(0.0000075, key="alice" if i % 3 else "bob") for i in range(300)]
        ids: list[str | None] = []
        for i in range(0, 300, 50):  # six batches, as the ledger writer sends them
            ids += await store.usage.append(writes[i : i + 50], Retention())
        assert len(ids) == 300 and all(ids)
        assert [parse_id(i) for i in ids if i] == sorted(parse_id(i) for i in ids if i)
        entries = await store.usage.read("0-0", 1000)
        assert [e[0] for e in entries] == ids
        assert [e[1] for e in entries] == [w.line for w in writes]
        assert await store.usage.read(entries[149][0], 100) == entries[150:250]
        sums: dict[str, dict[str, int]] = {}
        for _, line in entries:
            obj = orjson.loads(line)
            bucket = sums.setdefault(obj["key"], {})
            for name, value in counters_of_line(obj).items():
                bucket[name] = bucket.get(name, 0) + value
        rows = {t.key: t for t in await store.usage.totals(day_of(time.time()))}
        for key, counters in sums.items():
            assert {n: v for n, v in rows[key].counters().items() if v} == counters
        # 200 x 0.0000075 USD, exact (integer nano-USD), not 0.0014999999...
        assert rows["alice"].cost_nusd == 200 * 7500
        assert [t.key for t in await store.usage.totals(day_of(time.time()), key="bob")] == ["bob"]

    run(store_url, scenario)


def test_a_repeated_batch_id_is_applied_once(store_url: str | None) -> None:
    async def scenario(store: Store) -> None:
        batch = [write(0.5), write(0.25)]
        assert len(await store.usage.append(batch, Retention(), "batch-1")) == 2
        assert await store.usage.append(batch, Retention(), "batch-1") == []
        (row,) = await store.usage.totals(day_of(time.time()))
        assert (row.requests, row.cost_usd) == (2, 0.75)
        assert len(await store.usage.read("0-0", 10)) == 2

    run(store_url, scenario)


def test_a_ticket_is_settled_exactly_once_even_by_concurrent_writers(store_url: str | None) -> None:
    async def scenario(store: Store) -> None:
        (ref,) = await store.usage.append([write(0.0, ticket=b'{"t":1}')], Retention())
        assert ref is not None
        cursor, tickets = await store.usage.tickets(0, 10)
        assert tickets == [(ref, b'{"t":1}')] and cursor == 0
        group = {"key": "alice", "team": "research", "routed_model": "openai/gpt-4o-mini"}
        line = {"type": "adjustment", "day": day_of(time.time()), **group, "delta": {"cost_nusd": 42}}
        results = await asyncio.gather(
            *(store.usage.append([write_of(line, settles=ref)], Retention()) for _ in range(8))
        )
        assert sorted(r[0] is not None for r in results) == [False] * 7 + [True]
        (row,) = await store.usage.totals(day_of(time.time()))
        assert (row.requests, row.cost_nusd, row.estimated) == (1, 42, -1)  # the write itself was not estimated
        assert (await store.usage.tickets(0, 10))[1] == []
        assert await store.usage.drop_ticket(ref) is False

    run(store_url, scenario)


def test_the_stream_is_capped_by_length_and_by_age(store_url: str | None) -> None:
    async def scenario(store: Store) -> None:
        for _ in range(12):
            await store.usage.append([write(0.0) for _ in range(100)], Retention(max_entries=500, max_age_s=None))
        kept = len(await store.usage.read("0-0", 10_000))
        assert 500 <= kept < 1000  # approximate trimming, as Redis' MAXLEN ~
        await asyncio.sleep(0.01)
        await store.usage.append([write(0.0)], Retention(max_entries=None, max_age_s=0.001))
        assert len(await store.usage.read("0-0", 10_000)) < kept
        (row,) = await store.usage.totals(day_of(time.time()))
        assert row.requests == 1201  # trimming the stream never touches the rollups

    run(store_url, scenario)


def test_the_memory_ledger_keeps_each_line_at_its_own_size() -> None:
    """orjson's output bytes keep its whole growth buffer allocated (16 KiB for a ~600-byte
    line); the embedded store, which keeps its last 10,000 lines, must not keep those."""
    import tracemalloc

    async def scenario(store: Store) -> int:
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        writes = [write(0.00001, ticket=b'{"t":1}') for _ in range(2000)]
        ids = await store.usage.append(writes, Retention())
        del writes  # only what the store keeps stays
        grown = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        assert len(ids) == 2000
        return grown

    async def main() -> int:
        store = open_store(None)
        try:
            return await scenario(store)
        finally:
            await store.aclose()

    # a ~660-byte line and its id, ticket and share of the rollups: about 1.1 KiB (33 MB before)
    assert asyncio.run(main()) < 2000 * 2048
