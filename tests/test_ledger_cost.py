"""Cost accounting, prices, the batching ledger writer and the reconciliation job (in-process)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.accounting import AccountingSink, LedgerEntry, account, counters_of_line, write_of
from proxy.errors import UpstreamStatusError
from proxy.ledger import Ledger
from proxy.metering import usage_from
from proxy.pricing import Price, PriceBook, cost_of, nano, price_of
from proxy.reconcile import Reconciler, adjustment_of
from proxy.store import LedgerWrite, Retention, StoreUnavailable
from proxy.store.base import day_of
from proxy.store.usage_memory import MemoryUsage
from proxy.types import Usage

from .usage_fixtures import record

GPT4O_MINI = {
    "prompt": "0.00000015",
    "completion": "0.0000006",
    "web_search": "0.01",
    "input_cache_read": "0.000000075",
}


def test_prices_come_from_decimal_strings_and_router_models_have_none() -> None:
    price = price_of(GPT4O_MINI)
    assert price == Price(
        prompt=Decimal("0.00000015"),
        completion=Decimal("0.0000006"),
        input_cache_read=Decimal("0.000000075"),
        web_search=Decimal("0.01"),
    )
    assert price_of({"prompt": "-1", "completion": "-1"}) is None  # openrouter/auto
    assert price_of({"prompt": "0.1"}) is None and price_of(None) is None and price_of({"prompt": "x"}) is None


def test_cost_prices_each_token_kind_once() -> None:
    price = Price(
        prompt=Decimal("0.000001"),
        completion=Decimal("0.000004"),
        input_cache_read=Decimal("0.0000001"),
        internal_reasoning=Decimal("0.000002"),
        request=Decimal("0.001"),
        web_search=Decimal("0.01"),
    )
    usage = Usage(
        prompt_tokens=1000, completion_tokens=500, cached_tokens=400, reasoning_tokens=200, web_search_requests=2
    )
    # 600 uncached + 400 cached prompt, 300 plain + 200 reasoning completion, 1 request, 2 searches
    expected = Decimal("0.0006") + Decimal("0.00004") + Decimal("0.0012") + Decimal("0.0004") + Decimal("0.021")
    assert cost_of(price, usage) == expected
    plain = Price(prompt=Decimal("0.000001"), completion=Decimal("0.000004"))
    assert cost_of(plain, usage) == Decimal("0.001") + Decimal("0.002")


def test_the_cost_source_and_the_estimate_flag() -> None:
    def prices(model: str | None) -> Price | None:
        return price_of(GPT4O_MINI) if model == "openai/gpt-4o-mini" else None

    upstream = account(record(usage=Usage(prompt_tokens=6, completion_tokens=10, cost_usd=6.9e-06)), prices)
    assert (upstream.cost_source, upstream.cost_usd, upstream.estimated) == ("upstream", Decimal("0.0000069"), False)
    priced = account(record(usage=Usage(prompt_tokens=6, completion_tokens=10)), prices)
    assert (priced.cost_source, priced.cost_usd, priced.estimated) == ("pricing", Decimal("0.0000069"), True)
    assert priced.reconcilable
    unknown = account(record(model="x/unknown", usage=Usage(prompt_tokens=6)), prices)
    assert (unknown.cost_source, unknown.cost_usd, unknown.estimated) == ("none", Decimal(0), True)
    cut = account(record(usage=None, generation_id="gen-9"), prices)
    assert (cut.cost_source, cut.estimated, cut.reconcilable) == ("none", True, True)
    refused = account(record(usage=None, generation_id=None, status=401, error_code="invalid_api_key"), prices)
    assert (refused.cost_source, refused.estimated) == ("none", False)


def test_counters_of_a_line_survive_json_and_adjustments_correct_them() -> None:
    entry = account(record(usage=Usage(prompt_tokens=6, completion_tokens=10, total_tokens=16, cost_usd=0.1)), _none)
    line = entry.line()
    assert counters_of_line(line) == counters_of_line(orjson.loads(orjson.dumps(line)))
    assert counters_of_line(line) == {
        "requests": 1,
        "prompt_tokens": 6,
        "completion_tokens": 10,
        "total_tokens": 16,
        "cost_nusd": 100_000_000,
        "latency_ms": 250,
    }
    ticket = orjson.loads(account(record(usage=None, generation_id="gen-2"), _none).ticket())
    body = {"data": {"total_cost": 0.0000354, "native_tokens_prompt": 12, "native_tokens_completion": 30}}
    adjustment = adjustment_of("1-0", ticket, body, time.time())
    assert adjustment is not None and adjustment["cost_source"] == "generation"
    assert counters_of_line(adjustment) == {
        "prompt_tokens": 12,
        "completion_tokens": 30,
        "total_tokens": 42,
        "cost_nusd": 35_400,
        "estimated": -1,
    }
    assert adjustment_of("1-0", ticket, {"data": {"total_cost": None}}, time.time()) is None


def _none(model: str | None) -> Price | None:
    return None


class FlakyUsage(MemoryUsage):
    """A ledger store that is down for its first ``failures`` appends (and may apply one anyway)."""

    def __init__(self, failures: int, apply_then_fail: bool = False) -> None:
        super().__init__()
        self.failures = failures
        self.apply_then_fail = apply_then_fail
        self.calls = 0

    async def append(
        self, writes: Sequence[LedgerWrite], retention: Retention, batch_id: str | None = None
    ) -> list[str | None]:
        self.calls += 1
        if self.calls <= self.failures:
            if self.apply_then_fail:  # the script ran, the reply was lost: the batch id protects
                await super().append(writes, retention, batch_id)
            raise StoreUnavailable("Timeout reading from socket")
        return await super().append(writes, retention, batch_id)


@pytest.mark.parametrize("apply_then_fail", [False, True])
def test_the_writer_batches_retries_and_never_applies_a_batch_twice(apply_then_fail: bool) -> None:
    async def main() -> None:
        usage = FlakyUsage(failures=2, apply_then_fail=apply_then_fail)
        ledger = Ledger(usage, Retention(), flush_interval_s=0.01, batch_size=100)
        await ledger.start()
        for _ in range(250):
            ledger.emit_entry(account(record(usage=Usage(prompt_tokens=1, cost_usd=0.001)), _none))
        await ledger.close()
        assert ledger.written == 250 and ledger.backlog == 0
        assert len(await usage.read("0-0", 1000)) == 250
        (row,) = await usage.totals(day_of(time.time()))
        assert (row.requests, row.cost_nusd) == (250, 250 * 1_000_000)
        assert usage.calls == 2 + 3  # two failed tries of the first batch, then 100 + 100 + 50

    asyncio.run(main())


def test_the_writer_buffer_is_bounded() -> None:
    async def main() -> None:
        dropped: list[int] = []
        ledger = Ledger(MemoryUsage(), Retention(), max_buffer=10, on_drop=dropped.append)
        for _ in range(15):
            ledger.emit_entry(account(record(), _none))
        assert (ledger.backlog, ledger.dropped, sum(dropped)) == (10, 5, 5)

    asyncio.run(main())


def test_accounting_hands_one_entry_to_every_output_and_survives_a_broken_one() -> None:
    seen: list[LedgerEntry] = []

    class Broken:
        def emit_entry(self, entry: LedgerEntry) -> None:
            raise RuntimeError("boom")

    class Keep:
        def emit_entry(self, entry: LedgerEntry) -> None:
            seen.append(entry)

    sink = AccountingSink(_none, [Broken(), Keep()])
    sink.emit(record())
    assert len(seen) == 1 and seen[0].cost_source == "none"

    def overflowing(model: str | None) -> Price | None:  # a catalog price like "1e999999"
        raise ArithmeticError("overflow")

    unpriced = record(usage=Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5))
    AccountingSink(overflowing, [Keep()]).emit(unpriced)
    assert len(seen) == 2 and seen[1].record is unpriced and seen[1].cost_source == "none"  # not dropped


def test_price_book_answers_at_once_and_loads_in_the_background() -> None:
    async def main() -> None:
        loads = 0

        async def load() -> list[dict[str, Any]]:
            nonlocal loads
            loads += 1
            return [{"id": "openai/gpt-4o-mini", "pricing": GPT4O_MINI}, {"id": "openrouter/auto", "pricing": {}}]

        book = PriceBook(load)
        assert book.get("openai/gpt-4o-mini") is None  # not loaded yet: no waiting on the hot path
        await book.refresh()
        assert book.get("openai/gpt-4o-mini:nitro") == price_of(GPT4O_MINI)
        assert book.get("openrouter/auto") is None and loads == 1
        await book.aclose()

    asyncio.run(main())


def test_reconciliation_retries_404_then_settles_once_across_replicas() -> None:
    async def main() -> None:
        usage = MemoryUsage()
        entry = account(record(usage=None, generation_id="gen-7"), _none)
        await usage.append([write_of(entry.line(), ticket=entry.ticket())], Retention())
        calls = 0

        async def fetch(generation_id: str) -> Any:
            nonlocal calls
            calls += 1
            if calls <= 2:  # OpenRouter: the generation 404s briefly after completion
                raise UpstreamStatusError(404, {"message": "Generation not found", "code": 404})
            return {"data": {"id": generation_id, "total_cost": 0.00042, "tokens_prompt": 5, "tokens_completion": 7}}

        replicas = [Reconciler(usage, fetch, Retention(), first_delay_s=0.0, max_backoff_s=0.0) for _ in range(3)]
        for _ in range(3):
            await asyncio.gather(*(r.run_once() for r in replicas))
        (row,) = await usage.totals(day_of(time.time()))
        assert (row.requests, row.cost_nusd, row.estimated, row.prompt_tokens, row.completion_tokens) == (
            1,
            420_000,
            0,
            5,
            7,
        )
        lines = [orjson.loads(line) for _, line in await usage.read("0-0", 10)]
        assert [line["type"] for line in lines] == ["request", "adjustment"]

    asyncio.run(main())


def test_a_ticket_that_never_resolves_expires() -> None:
    async def main() -> None:
        usage = MemoryUsage()
        entry = account(record(usage=None, generation_id="gen-8", ts=time.time() - 7200), _none)
        await usage.append([write_of(entry.line(), ticket=entry.ticket())], Retention())
        outcomes: list[str] = []

        async def fetch(generation_id: str) -> Any:
            raise AssertionError("an expired ticket is not fetched")

        await Reconciler(usage, fetch, Retention(), max_age_s=3600, on_outcome=outcomes.append).run_once()
        assert outcomes == ["expired"] and (await usage.tickets(0, 10))[1] == []

    asyncio.run(main())


@given(
    status=st.sampled_from([200, 200, 400, 429, 499, 502]),
    error_code=st.sampled_from([None, None, "upstream_stream_cut", "502"]),
    usage=st.none()
    | st.builds(
        Usage,
        prompt_tokens=st.integers(0, 10**6),
        completion_tokens=st.integers(0, 10**6),
        total_tokens=st.integers(0, 2 * 10**6),
        cached_tokens=st.integers(0, 10**6),
        reasoning_tokens=st.integers(0, 10**6),
        cost_usd=st.none() | st.floats(0, 100, allow_nan=False),
    ),
    latency_s=st.floats(0, 900, allow_nan=False),
    generation_id=st.none() | st.just("gen-x"),
)
def test_the_fast_counters_always_equal_the_counters_of_the_json_line(
    status: int, error_code: str | None, usage: Usage | None, latency_s: float, generation_id: str | None
) -> None:
    rec = dataclasses.replace(
        record(status=status, error_code=error_code, usage=usage, generation_id=generation_id), latency_s=latency_s
    )
    entry = account(rec, lambda model: price_of(GPT4O_MINI))
    assert dict(entry.counters()) == counters_of_line(orjson.loads(orjson.dumps(entry.line())))


def test_absurd_upstream_usage_counts_as_missing_not_as_a_huge_or_negative_number() -> None:
    usage = usage_from(
        {
            "prompt_tokens": 2**64 - 1,
            "completion_tokens": -5,
            "total_tokens": 12,
            "cost": 2e10,
            "prompt_tokens_details": {"cached_tokens": 3},
        }
    )
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens, usage.cached_tokens) == (0, 0, 12, 3)
    assert usage.cost_usd is None  # priced from the tokens instead
    for cost in (-0.25, float("nan"), float("inf"), True):
        found = usage_from({"prompt_tokens": 1, "cost": cost})
        assert found is not None and found.cost_usd is None
    found = usage_from({"prompt_tokens": 1, "cost": 0.0004225})
    assert found is not None and found.cost_usd == 0.0004225


def test_budgets_and_the_ledger_round_a_cost_to_the_same_nano_usd() -> None:
    from proxy.limits.pricing import actual_cost_nusd

    for cost in (7.5e-09, 2.5e-09, 0.0004225, 1.23456789e-05, 3e-10):
        usage = Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2, cost_usd=cost)
        assert actual_cost_nusd(usage, None, 0) == nano(cost), cost
