"""Ledger exactness through the running proxy: N concurrent requests -> N records, exact rollups.

Real parts only: uvicorn serving the proxy, the emulator upstream, the official ``openai``
SDK as the client, the in-memory store or a real redis-server, the in-process exporter
(its files are how the test reads the stream) and the reconciliation job.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from proxy.accounting import counters_of_line, group_of_line
from proxy.pricing import nano
from proxy.store.usage import parse_id

from .conftest import ALICE_KEY, ProxyUnderTest
from .limits_support import open_test_store
from .usage_fixtures import (
    KINDS,
    admin_usage,
    exported,
    fire,
    ledger_config,
    wait_for,
)

N = 40


def settled_lines(export_dir: Path, count: int) -> Callable[[], list[dict[str, Any]] | None]:
    """A probe: the exported lines once ``count`` requests and all their corrections are there."""

    def probe() -> list[dict[str, Any]] | None:
        lines = exported(export_dir)
        requests = [line for line in lines if line["type"] == "request"]
        corrections = [line for line in lines if line["type"] == "adjustment"]
        pending = sum(1 for line in requests if line["estimated"]) - len(corrections)
        return lines if len(requests) >= count and pending == 0 else None

    return probe


def sum_by_group(lines: list[dict[str, Any]]) -> dict[tuple[str, ...], dict[str, int]]:
    sums: dict[tuple[str, ...], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for line in lines:
        for name, value in counters_of_line(line).items():
            sums[(line["day"], *group_of_line(line))][name] += value
    return sums


def test_n_concurrent_requests_make_n_records_and_rollups_equal_to_their_sum(
    store_url: str | None,
    proxy_server: Callable[..., ProxyUnderTest],
    emulator_app: Any,
) -> None:
    proxy = proxy_server(extra=ledger_config(redis_url=store_url))
    asyncio.run(fire(proxy, N))
    export_dir = proxy.settings.ledger.export_dir
    assert export_dir is not None
    lines = wait_for(settled_lines(export_dir, N), what="N records and their reconciliations")

    # Exactly N records, one per request, in stream order, each id once.
    requests = {line["request_id"]: line for line in lines if line["type"] == "request"}
    assert sorted(requests) == sorted(f"ledger-{i}" for i in range(N))
    assert len([line for line in lines if line["type"] == "request"]) == N
    ids = [parse_id(line["id"]) for line in lines]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)

    # What each kind of request left behind.
    for i in range(N):
        rec, kind = requests[f"ledger-{i}"], KINDS[i % 4]
        assert rec["key"] == ("alice" if i % 2 == 0 else "bob")
        if kind in ("stream", "whole"):
            assert (rec["status"], rec["cost_source"], rec["estimated"]) == (200, "upstream", False)
        elif kind == "cut":
            assert rec["error_code"] == "upstream_stream_cut" and rec["estimated"] and rec["generation_id"]
        else:
            assert rec["status"] == 502 and rec["generation_id"] is None and rec["cost_usd"] == 0

    # Costs equal the emulator's, after reconciliation filled in the cut streams' costs.
    corrections: dict[str, int] = defaultdict(int)
    for line in lines:
        if line["type"] == "adjustment":
            assert line["cost_source"] == "generation"
            corrections[line["request_id"]] += line["delta"]["cost_nusd"]
    for request_id, rec in requests.items():
        final = nano(rec["cost_usd"]) + corrections.get(request_id, 0)
        generation = emulator_app.generations.get(rec["generation_id"]) if rec["generation_id"] else None
        assert final == (nano(generation.usage.cost) if generation else 0), request_id
    assert set(corrections) == {r for r, rec in requests.items() if rec["estimated"]}

    # The rollups (read back through /admin/usage) equal the sum of the lines, to the nano-dollar.
    report = admin_usage(proxy, "day,key,team,model,rule")
    rows = {(r["day"], r["key"], r["team"], r["model"], r["rule"]): r for r in report["rows"]}
    sums = sum_by_group(lines)
    assert set(rows) == set(sums)
    for group, counters in sums.items():
        row = rows[group]
        for name in ("requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens", "estimated"):
            assert int(row[name]) == counters.get(name, 0), (group, name)
        assert Decimal(row["cost_usd"]) == Decimal(counters.get("cost_nusd", 0)) / Decimal(10**9)
    assert int(report["total"]["requests"]) == N
    assert int(report["total"]["errors"]) == N // 2  # cut and failed
    assert int(report["total"]["estimated"]) == 0  # every estimate was reconciled


def test_the_redis_ledger_and_the_export_survive_a_restart(
    fresh_redis: str,
    proxy_server: Callable[..., ProxyUnderTest],
) -> None:
    extra = ledger_config(redis_url=fresh_redis)
    first = proxy_server(extra=extra)
    asyncio.run(fire(first, 8, prefix="before"))
    first.server.stop()  # lifespan shutdown: the ledger flushes, the exporter runs a last pass
    export_dir = first.settings.ledger.export_dir
    assert export_dir is not None
    assert len([line for line in exported(export_dir) if line["type"] == "request"]) == 8

    second = proxy_server(extra=extra)
    asyncio.run(fire(second, 8, prefix="after"))
    lines = wait_for(settled_lines(export_dir, 16), what="16 records")
    request_ids = [line["request_id"] for line in lines if line["type"] == "request"]
    assert sorted(request_ids) == sorted([f"before-{i}" for i in range(8)] + [f"after-{i}" for i in range(8)])
    assert int(admin_usage(second, "key")["total"]["requests"]) == 16  # rollups kept in Redis


@pytest.mark.parametrize(
    ("fault", "admission", "fallback"), [("cut", "exact", False), ("stall", "leased", False), ("cut", "exact", True)]
)
def test_a_reconciled_cost_reaches_the_budget_as_it_reaches_the_ledger(
    tmp_path: Path, proxy_server: Callable[..., Any], store_url: str | None, fault: str, admission: str, fallback: bool
) -> None:
    """A stream cut short is settled with an estimate; OpenRouter's /generation cost then
    corrects the ledger, and the key's budget to the same figure (once, whichever replica).
    With a fallback, the budget's estimate (priced at the plan's dearest model) and the
    ledger's (at the model that answered) differ: both still end at OpenRouter's cost."""
    open_test_store(store_url)
    (tmp_path / "policies").mkdir(exist_ok=True)
    policy = {"default_tier": "t", "tiers": {"t": {"budget_usd_per_day": 100}}}
    (tmp_path / "policies" / "limits.yaml").write_text(yaml.safe_dump(policy))
    extra = ledger_config(redis_url=store_url, export_dir=None) + "upstream:\n  read_timeout_s: 0.5\n"
    extra += f"limits:\n  admission: {admission}\n"
    proxy = proxy_server(extra=extra)
    body: dict[str, Any] = {
        "model": "openai/gpt-4o-mini",
        "messages": [{"role": "user", "content": "hello there"}],
        "stream": True,
        "emulator": {"fault": fault, "completion_tokens": 40},
    }
    if fallback:
        faults = {"openai/gpt-4o": {"fault": "error-404"}, "openai/gpt-4o-mini": {"fault": fault}}
        body.update(model="openai/gpt-4o", models=["openai/gpt-4o-mini"], emulator={"faults": faults})
    with httpx.stream(
        "POST",
        f"{proxy.base_url}/chat/completions",
        headers={"Authorization": f"Bearer {ALICE_KEY}"},
        json=body,
        timeout=10,
    ) as response:
        b"".join(response.iter_raw())

    def settled() -> tuple[str, float] | None:
        total = admin_usage(proxy, "key")["total"]
        limits = httpx.get(f"{proxy.base_url}/limits", headers={"Authorization": f"Bearer {ALICE_KEY}"}).json()
        spent = limits["budgets"][0]["spent_usd"]
        # the request is in the ledger (an empty one also has nothing estimated) and reconciled
        done = int(total.get("requests", 0)) == 1 and total.get("estimated") in ("0", 0)
        return (total["cost_usd"], spent) if done else None

    ledger_cost, budget_spent = wait_for(settled, what="the reconciled cost")
    assert float(ledger_cost) > 0
    assert budget_spent == pytest.approx(float(ledger_cost), abs=1e-9)
    assert b'"budget"' not in proxy.usage_log.read_bytes()  # the budget keys stay internal
