"""Prometheus metrics: counters match the ledger after a load run, across uvicorn workers too."""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.accounting import account
from proxy.config import load_settings
from proxy.metrics import Metrics
from proxy.pricing import nano
from proxy.sinks import Activity
from proxy.types import Usage

from .conftest import ProxyUnderTest
from .factories import served_cli
from .usage_fixtures import KINDS, exported, fire, ledger_config, record, wait_for

N = 24
P = "openrouter_proxy_"


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """``/metrics`` as ``{sample name: [(labels, value), ...]}``."""
    response = httpx.get(f"{url}/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[sample.name].append((sample.labels, sample.value))
    return samples


def total(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **match: str) -> float:
    return sum(v for labels, v in samples.get(name, []) if all(labels.get(k) == m for k, m in match.items()))


def test_counters_match_the_ledger_after_a_load_run(proxy_server: Callable[..., ProxyUnderTest]) -> None:
    proxy = proxy_server(extra=ledger_config())
    asyncio.run(fire(proxy, N))
    export_dir = proxy.settings.ledger.export_dir
    assert export_dir is not None
    lines = wait_for(
        lambda: (x := exported(export_dir)) and len([r for r in x if r["type"] == "request"]) == N and x,
        what="the ledger",
    )
    requests = [line for line in lines if line["type"] == "request"]
    samples = scrape(proxy.url)

    assert total(samples, P + "requests_total") == N
    for status in {r["status"] for r in requests}:
        expected = sum(1 for r in requests if r["status"] == status)
        assert total(samples, P + "requests_total", status=str(status)) == expected
    for key in ("alice", "bob"):
        assert total(samples, P + "requests_total", key=key) == sum(1 for r in requests if r["key"] == key)
    for kind, field in (("prompt", "prompt_tokens"), ("completion", "completion_tokens")):
        assert total(samples, P + "tokens_total", kind=kind) == sum(r[field] for r in requests)
    upstream_cost = sum(nano(r["cost_usd"]) for r in requests if r["cost_source"] == "upstream")
    assert round(total(samples, P + "cost_usd_total", source="upstream") * 1e9) == upstream_cost
    assert total(samples, P + "request_duration_seconds_count") == N
    assert total(samples, P + "time_to_first_token_seconds_count") == sum(1 for r in requests if r["ttft_s"])
    cuts = sum(1 for r in requests if r["error_code"] == "upstream_stream_cut")
    assert cuts == N // len(KINDS)
    assert total(samples, P + "upstream_errors_total", code="upstream_stream_cut") == cuts
    assert total(samples, P + "upstream_errors_total", code="502") == N // len(KINDS)
    assert total(samples, P + "in_flight_requests") == 0 and total(samples, P + "in_flight_streams") == 0
    assert total(samples, P + "reconciliations_total", outcome="settled") >= 1


def test_rejections_pipeline_events_and_bounded_labels() -> None:
    metrics = Metrics(max_label_values=4)
    metrics.retry("openai/gpt-4o-mini", "upstream_timeout")
    metrics.fallback("openai/gpt-4o-mini", "anthropic/claude-haiku-4.5")
    metrics.breaker_state("openai/gpt-4o-mini", "open")
    metrics.activity(3, 2)
    for code in ("rate_limit_exceeded", "rate_limit_exceeded", "insufficient_quota"):
        metrics.emit_entry(account(record(status=429, error_code=code, usage=None, generation_id=None), _none))
    metrics.emit_entry(account(record(status=429, error_code="429", usage=None, generation_id=None), _none))
    for i in range(5):  # models from outside: two more fit under the cap of 4, the rest are "other"
        metrics.emit_entry(account(record(model=f"junk/{i}", usage=Usage(prompt_tokens=1)), _none))
    text = metrics.render()[0].decode()
    assert f'{P}rejections_total{{key="alice",reason="rate_limit_exceeded"}} 2.0' in text
    assert f'{P}rejections_total{{key="alice",reason="insufficient_quota"}} 1.0' in text
    assert f'{P}upstream_errors_total{{code="429",model="openai/gpt-4o-mini"}} 1.0' in text  # OpenRouter's 429
    assert f'{P}retries_total{{model="openai/gpt-4o-mini",reason="upstream_timeout"}} 1.0' in text
    assert f'{P}fallbacks_total{{from_model="openai/gpt-4o-mini",to_model="anthropic/claude-haiku-4.5"}} 1.0' in text
    assert f'{P}breaker_state{{target="openai/gpt-4o-mini"}} 2.0' in text
    assert f"{P}in_flight_requests 3.0" in text and f"{P}in_flight_streams 2.0" in text
    models = set(re.findall(r'requests_total\{[^}]*model="([^"]+)"', text))
    assert models == {"openai/gpt-4o-mini", "junk/0", "junk/1", "other"}
    long = Metrics(max_label_values=4)  # a label value is cut: a scrape stays small whatever clients send
    long.emit_entry(account(record(model="x/" + "y" * 60_000, usage=Usage(prompt_tokens=1)), _none))
    assert len(long.render()[0]) < 20_000


def _none(model: str | None) -> None:
    return None


def test_in_flight_gauges_read_the_activity_when_scraped() -> None:
    """One process: the gauges read the live counts at scrape time, nothing runs per request."""
    metrics, activity = Metrics(), Activity()
    metrics.watch(activity)
    assert activity.listeners == []
    activity.enter()
    activity.enter()
    activity.stream_open()
    text = metrics.render()[0].decode()
    assert f"{P}in_flight_requests 2.0" in text and f"{P}in_flight_streams 1.0" in text
    activity.stream_close()
    activity.leave()
    text = metrics.render()[0].decode()
    assert f"{P}in_flight_requests 1.0" in text and f"{P}in_flight_streams 0.0" in text


@pytest.mark.slow
def test_several_workers_report_through_one_endpoint(tmp_path: Path) -> None:
    """``serve --workers 2``: prometheus-client's multiprocess mode, set up by ``serve``."""
    with served_cli(tmp_path, "--workers", "2", startups=2) as served:
        url, key = served.url, served.key
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=10)
        for _ in range(10):  # each on a new connection, so both workers take some
            client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
            client.close()
            client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=10)
        samples = scrape(url)
        assert total(samples, P + "requests_total", status="200") == 10
        assert total(samples, P + "in_flight_requests") == 0


@pytest.fixture(autouse=True)
def _no_multiproc_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)


def test_a_metrics_token_guards_the_scrape(proxy_server: Callable[..., ProxyUnderTest], tmp_path: Path) -> None:
    token = "scrape-token-0123456789"
    proxy = proxy_server(extra=f"metrics:\n  token_sha256: {hashlib.sha256(token.encode()).hexdigest()}\n")
    for headers in ({}, {"Authorization": "Bearer not-the-token"}, {"Authorization": f"Basic {token}"}):
        refused = httpx.get(f"{proxy.url}/metrics", headers=headers)
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "invalid_api_key"
        assert P not in refused.text
    allowed = httpx.get(f"{proxy.url}/metrics", headers={"Authorization": f"Bearer {token}"})
    assert allowed.status_code == 200 and P + "requests_total" in allowed.text
    assert httpx.get(f"{proxy.url}/healthz").status_code == 200  # only /metrics asks for it

    # from the environment: kept as its SHA-256 only
    path = tmp_path / "env.yaml"
    path.write_text("upstream:\n  base_url: http://127.0.0.1:9/api/v1\n")
    settings = load_settings(path, {"OPENROUTER_API_KEY": "sk-or-x", "PROXY_METRICS_TOKEN": token})
    assert settings.metrics.token_sha256 == hashlib.sha256(token.encode()).hexdigest()
    assert token not in settings.model_dump_json()
