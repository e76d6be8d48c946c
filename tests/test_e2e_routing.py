"""Routing policies end to end: the OpenAI SDK, a real proxy, the emulator as OpenRouter."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from proxy.cli import main as cli_main

from .conftest import ALICE_KEY, BOB_KEY, ProxyUnderTest
from .factories import UpstreamLog

MESSAGES: Any = [{"role": "user", "content": "What is the capital of France?"}]
Make = Callable[..., ProxyUnderTest]


SDK = Callable[..., openai.OpenAI]


@pytest.fixture
def sdk() -> Iterator[SDK]:
    """``sdk(proxy, key)``: an OpenAI client for the proxy, closed after the test."""
    made: list[openai.OpenAI] = []

    def make(proxy: ProxyUnderTest, key: str = ALICE_KEY) -> openai.OpenAI:
        made.append(openai.OpenAI(base_url=proxy.base_url, api_key=key, max_retries=0, timeout=10))
        return made[-1]

    yield make
    for client in made:
        client.close()


def test_an_alias_and_a_rule_are_visible_in_headers_and_usage(sdk: SDK, proxy_server: Make) -> None:
    proxy = proxy_server(
        routing="aliases:\n  chat: openai/gpt-4o-mini\nrules:\n  - name: research-chat\n"
        "    match: {team: research, model: chat}\n"
    )
    raw = sdk(proxy).chat.completions.with_raw_response.create(model="chat", messages=MESSAGES)
    assert raw.parse().choices[0].message.content
    assert raw.headers["x-proxy-model"] == "openai/gpt-4o-mini"
    assert raw.headers["x-proxy-route"] == "research-chat"
    assert raw.headers["x-proxy-policy"] == proxy.app.router.policy_hash
    raw = sdk(proxy, BOB_KEY).chat.completions.with_raw_response.create(model="chat", messages=MESSAGES)
    assert raw.headers["x-proxy-route"] == "alias:chat"
    first, second = proxy.records(2)
    assert (first["requested_model"], first["routed_model"], first["rule"]) == (
        "chat",
        "openai/gpt-4o-mini",
        "research-chat",
    )
    assert second["rule"] == "alias:chat"


def test_a_split_is_sticky_per_user_and_reported_by_rule(
    sdk: SDK, proxy_server: Make, emulator_app: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    proxy = proxy_server(
        routing="rules:\n  - name: ab\n    match: {model: gpt}\n    split:\n"
        "      - {model: openai/gpt-4o-mini, weight: 1}\n      - {model: anthropic/claude-haiku-4.5, weight: 1}\n"
    )
    client = sdk(proxy)
    arms: dict[str, set[str]] = {}
    for user in [f"user-{n}" for n in range(12)] * 2:
        upstream = UpstreamLog(emulator_app)
        raw = client.chat.completions.with_raw_response.create(model="gpt", messages=MESSAGES, user=user)
        arms.setdefault(user, set()).add(raw.headers["x-proxy-model"])
        (sent,) = upstream.wait(1)
        assert sent.model == raw.headers["x-proxy-model"]  # what OpenRouter was asked
    assert all(len(seen) == 1 for seen in arms.values())
    assert set().union(*arms.values()) == {"openai/gpt-4o-mini", "anthropic/claude-haiku-4.5"}
    records = proxy.records(24)
    assert {r["rule"] for r in records} == {"ab"}
    assert cli_main(["usage", "--log", str(proxy.usage_log), "--by", "rule,model"]) == 0
    table = capsys.readouterr().out
    assert any(line.startswith("ab") and "anthropic/claude-haiku-4.5" in line for line in table.splitlines())
    assert any(line.startswith("ab") and "openai/gpt-4o-mini" in line for line in table.splitlines())


def test_a_cap_applies_to_the_matched_keys_only(sdk: SDK, proxy_server: Make) -> None:
    proxy = proxy_server(routing="rules:\n  - name: web-short\n    match: {team: web}\n    caps: {max_tokens: 3}\n")
    capped = sdk(proxy, BOB_KEY).chat.completions.create(model="openai/gpt-4o-mini", messages=MESSAGES)
    assert capped.usage is not None and capped.usage.completion_tokens == 3
    assert capped.choices[0].finish_reason == "length"
    free = sdk(proxy, ALICE_KEY).chat.completions.create(model="openai/gpt-4o-mini", messages=MESSAGES, max_tokens=50)
    assert free.usage is not None and free.usage.completion_tokens == 10
    assert free.choices[0].finish_reason == "stop"
    stream = sdk(proxy, BOB_KEY).chat.completions.create(
        model="openai/gpt-4o-mini", messages=MESSAGES, stream=True, max_tokens=500
    )
    assert [c.usage.completion_tokens for c in stream if c.usage] == [3]


def test_a_deny_rule_is_a_clear_403(sdk: SDK, proxy_server: Make, emulator_app: Any) -> None:
    proxy = proxy_server(
        routing="rules:\n  - name: web-no-gpt-4o\n    match: {team: web, model: openai/gpt-4o}\n"
        "    deny: The web team may not use gpt-4o.\n"
    )
    upstream = UpstreamLog(emulator_app)
    with pytest.raises(openai.PermissionDeniedError) as info:
        sdk(proxy, BOB_KEY).chat.completions.create(model="openai/gpt-4o", messages=MESSAGES)
    assert info.value.status_code == 403
    assert info.value.message.endswith("The web team may not use gpt-4o. (routing rule 'web-no-gpt-4o')")
    assert info.value.code == "permission_denied"
    assert upstream.sent() == []  # never sent upstream
    assert sdk(proxy, ALICE_KEY).chat.completions.create(model="openai/gpt-4o", messages=MESSAGES).choices
    record = proxy.records(2)[0]
    assert record["status"] == 403 and record["key"] == "bob"


def test_variants_and_a_native_fallback_chain_reach_openrouter(sdk: SDK, proxy_server: Make, emulator_app: Any) -> None:
    proxy = proxy_server(
        routing="rules:\n"
        "  - name: nitro\n    match: {model: openai/gpt-4o-mini}\n    variant: nitro\n"
        "  - name: chain\n    match: {model: flaky}\n    model: emulator/error-502\n"
        "    fallbacks: [openai/gpt-4o]\n    native_fallbacks: true\n"
    )
    upstream = UpstreamLog(emulator_app)
    raw = sdk(proxy).chat.completions.with_raw_response.create(model="openai/gpt-4o-mini", messages=MESSAGES)
    assert raw.headers["x-proxy-model"] == "openai/gpt-4o-mini:nitro"
    assert [r.model for r in upstream.wait(1)] == ["openai/gpt-4o-mini:nitro"]
    upstream = UpstreamLog(emulator_app)
    completion = sdk(proxy).chat.completions.create(model="flaky", messages=MESSAGES)
    assert completion.model == "openai/gpt-4o"  # OpenRouter itself moved down the models list
    (sent,) = upstream.wait(1)  # one request: the fallback happened inside OpenRouter
    assert sent.model == "openai/gpt-4o"


def test_the_proxy_falls_back_to_the_next_model_after_an_upstream_error(sdk: SDK, proxy_server: Make) -> None:
    proxy = proxy_server(
        routing="rules:\n  - name: chain\n    match: {model: flaky}\n    model: emulator/error-502\n"
        "    fallbacks: [openai/gpt-4o-mini]\n"
    )
    completion = sdk(proxy).chat.completions.create(model="flaky", messages=MESSAGES)
    assert completion.choices[0].message.content
    (record,) = proxy.records(1)
    assert record["status"] == 200 and record["routed_model"] == "openai/gpt-4o-mini"
    assert record["rule"] == "chain"


def test_a_header_condition_routes(sdk: SDK, proxy_server: Make) -> None:
    proxy = proxy_server(
        routing="rules:\n  - name: batch\n    match: {header: {x-workload: batch}}\n    variant: floor\n"
    )
    raw = sdk(proxy).chat.completions.with_raw_response.create(
        model="openai/gpt-4o-mini", messages=MESSAGES, extra_headers={"x-workload": "batch"}
    )
    assert raw.headers["x-proxy-model"] == "openai/gpt-4o-mini:floor"


def test_a_cached_answer_is_replayed_and_costs_nothing(sdk: SDK, proxy_server: Make, emulator_app: Any) -> None:
    proxy = proxy_server(routing="rules:\n  - name: faq\n    match: {model: faq}\n    model: openai/gpt-4o-mini\n"
                         "    cache: {ttl_s: 60}\n")  # fmt: skip
    client = sdk(proxy)
    for stream in (False, True):
        first = client.chat.completions.with_raw_response.create(model="faq", messages=MESSAGES, stream=stream)
        upstream = UpstreamLog(emulator_app)
        again = client.chat.completions.with_raw_response.create(model="faq", messages=MESSAGES, stream=stream)
        assert again.headers["x-proxy-cache"] == "hit"
        assert upstream.sent() == []
        if stream:
            assert first.http_response.read() == again.http_response.read()
        else:
            assert first.parse().choices[0].message.content == again.parse().choices[0].message.content
    records = proxy.records(4)
    assert [r["cost_usd"] == 0 for r in records] == [False, True, False, True]


def test_the_context_guard_moves_to_a_model_that_fits_or_refuses(
    sdk: SDK, proxy_server: Make, emulator_app: Any
) -> None:
    proxy = proxy_server(
        routing="rules:\n"
        "  - name: long\n    match: {model: llama}\n    model: meta-llama/llama-3.1-8b-instruct\n"
        "    fallbacks: [openai/gpt-4o-mini, openai/gpt-4.1-nano]\n"  # 131072, 128000, 1047576 tokens
        "  - name: short\n    match: {model: llama-short}\n    model: meta-llama/llama-3.1-8b-instruct\n"
        "    fallbacks: [openai/gpt-4o]\n"
    )
    upstream = UpstreamLog(emulator_app)
    raw = sdk(proxy).chat.completions.with_raw_response.create(model="llama", messages=MESSAGES, max_tokens=200_000)
    assert raw.headers["x-proxy-model"] == "openai/gpt-4.1-nano"
    assert [r.model for r in upstream.wait(1)] == ["openai/gpt-4.1-nano"]
    upstream = UpstreamLog(emulator_app)
    with pytest.raises(openai.BadRequestError) as info:
        sdk(proxy).chat.completions.create(model="llama-short", messages=MESSAGES, max_tokens=500_000)
    assert info.value.code == "context_length_exceeded"
    assert upstream.sent() == []


def test_a_reload_mid_traffic_fails_no_request_and_an_invalid_one_is_rejected(proxy_server: Make) -> None:
    proxy = proxy_server(routing="aliases:\n  m: openai/gpt-4o-mini\n")
    policy = proxy.settings.policies_dir / "routing.yaml"
    results: list[tuple[int, str, str]] = []
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(base_url=proxy.base_url, headers={"authorization": f"Bearer {ALICE_KEY}"}) as client:
            while not stop.is_set():
                r = client.post("/chat/completions", json={"model": "m", "messages": MESSAGES}, timeout=10)
                results.append((r.status_code, r.headers.get("x-proxy-model", ""), r.headers.get("x-proxy-policy", "")))

    def until(condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 5
        while not condition():
            assert time.monotonic() < deadline, "no reload within 5 s"
            time.sleep(0.02)

    threads = [threading.Thread(target=traffic) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        until(lambda: len(results) >= 10)
        before = proxy.app.router.policy_hash
        policy.write_text("aliases:\n  m: anthropic/claude-haiku-4.5\n")
        until(lambda: bool(results) and results[-1][1] == "anthropic/claude-haiku-4.5")
        after = proxy.app.router.policy_hash
        assert after != before
        policy.write_text("aliases:\n  m: [not, a, model]\n")
        until(lambda: getattr(proxy.app.router, "rejected", 0) == 1)
        count = len(results)
        until(lambda: len(results) >= count + 10)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert {status for status, _, _ in results} == {200}
    assert {model for _, model, _ in results} == {"openai/gpt-4o-mini", "anthropic/claude-haiku-4.5"}
    assert {h for _, _, h in results} <= {before, after}
    assert all(model == "anthropic/claude-haiku-4.5" for _, model, _ in results[count:])
    assert proxy.app.router.policy_hash == after
