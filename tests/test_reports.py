"""Reports: the CLI (store, exporter files, usage log), ``/admin/usage`` and ``/v1/usage`` agree."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest

from proxy.accounting import counters_of_line
from proxy.cli import main as cli_main
from proxy.report import build, render

from .conftest import ALICE_KEY, BOB_KEY, ProxyUnderTest
from .usage_fixtures import (
    ADMIN_KEY,
    admin_usage,
    exported,
    fire,
    ledger_config,
    wait_for,
)

N = 16


def cli_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    assert cli_main(["usage", *args, "--format", "json"]) == 0
    body: dict[str, Any] = orjson.loads(capsys.readouterr().out)
    return body


@pytest.fixture
def loaded(fresh_redis: str, proxy_server: Callable[..., ProxyUnderTest]) -> ProxyUnderTest:
    """A proxy on Redis, with N requests of every kind done, recorded, exported and reconciled."""
    proxy = proxy_server(extra=ledger_config(redis_url=fresh_redis))
    asyncio.run(fire(proxy, N))
    export_dir = proxy.settings.ledger.export_dir
    assert export_dir is not None

    def settled() -> bool:
        lines = exported(export_dir)
        requests = [line for line in lines if line["type"] == "request"]
        estimated = sum(1 for line in requests if line["estimated"])
        return len(requests) == N and estimated == sum(1 for line in lines if line["type"] == "adjustment")

    wait_for(settled, what="the ledger to settle")
    return proxy


def test_the_report_totals_equal_the_ledger_from_every_source(
    loaded: ProxyUnderTest, capsys: pytest.CaptureFixture[str]
) -> None:
    export_dir = loaded.settings.ledger.export_dir
    assert export_dir is not None
    lines = exported(export_dir)
    ledger: dict[str, int] = {}
    for line in lines:
        for name, value in counters_of_line(line).items():
            ledger[name] = ledger.get(name, 0) + value
    expected_cost = f"{Decimal(ledger['cost_nusd']) / Decimal(10**9):.9f}"

    config = str(loaded.settings.policies_dir.parent / "config.yaml")
    from_store = cli_json(capsys, "--config", config, "--by", "key,model", "--since", "1d")
    from_files = cli_json(capsys, "--dir", str(export_dir), "--by", "key,model")
    from_api = admin_usage(loaded, "key,model")
    for report in (from_store, from_files, from_api):
        total = report["total"]
        assert int(total["requests"]) == N == ledger["requests"]
        assert int(total["errors"]) == ledger["errors"]
        assert int(total["total_tokens"]) == ledger["total_tokens"]
        assert total["cost_usd"] == expected_cost
    assert from_store["rows"] == from_files["rows"] == from_api["rows"]
    assert {r["key"] for r in from_api["rows"]} == {"alice", "bob"}

    # The usage log (the older source) still works and counts the same requests.
    from_log = cli_json(capsys, "--log", str(loaded.usage_log), "--by", "key")
    assert int(from_log["total"]["requests"]) == N

    assert cli_main(["usage", "--config", config, "--by", "team,day"]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[-2].startswith("TOTAL") and expected_cost in table
    assert cli_main(["usage", "--config", config, "--by", "provider"]) == 2  # not kept in the rollups


def test_a_key_reads_only_its_own_spend_and_admin_usage_needs_the_admin_key(loaded: ProxyUnderTest) -> None:
    everyone = admin_usage(loaded, "key")
    spend = {row["key"]: row for row in everyone["rows"]}
    for key, name in ((ALICE_KEY, "alice"), (BOB_KEY, "bob")):
        response = httpx.get(
            f"{loaded.url}/v1/usage", params={"by": "model"}, headers={"authorization": f"Bearer {key}"}
        )
        assert response.status_code == 200
        own = response.json()
        assert own["key"] == name
        assert own["total"]["cost_usd"] == spend[name]["cost_usd"]
        assert own["total"]["requests"] == spend[name]["requests"]
    denied = httpx.get(f"{loaded.url}/v1/usage")
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
    for headers in ({}, {"authorization": f"Bearer {ALICE_KEY}"}):
        assert httpx.get(f"{loaded.url}/admin/usage", headers=headers).status_code == 401
    bad = httpx.get(f"{loaded.url}/admin/usage?by=nope", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "by"


def test_render_formats_share_one_shape() -> None:
    facts = [
        ({"key": "a", "day": "2026-11-01"}, {"requests": 2, "cost_nusd": 100_000_000, "latency_ms": 3000}),
        ({"key": "b", "day": "2026-11-01"}, {"requests": 1, "errors": 1, "cost_nusd": 200_000_000}),
    ]
    report = build(facts, ("key",))
    assert str(report.total.cost_usd) == "0.3"  # exact, not 0.30000000000000004
    assert render(report, "csv").splitlines()[-1].startswith("TOTAL,3,1,")
    body = orjson.loads(render(report, "json"))
    assert body["rows"][0] == {**body["rows"][0], "key": "a", "requests": "2", "avg_latency_s": "1.500"}
    assert render(report).splitlines()[-1].startswith("TOTAL")
