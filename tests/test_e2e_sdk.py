"""The official OpenAI SDK, sync and async, through a real proxy in front of the emulator."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import openai
import pytest

from proxy.cli import main as cli_main

from .conftest import ALICE_KEY, BOB_KEY, ProxyUnderTest
from .factories import UpstreamLog

MESSAGES: Any = [{"role": "user", "content": "What is the capital of France?"}]
TOOLS: Any = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


def sdk(proxy: ProxyUnderTest, key: str = ALICE_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.base_url, api_key=key, max_retries=0, timeout=10)


def cost_of(usage: Any) -> float:
    extra = usage.model_extra or {}
    cost = extra.get("cost")
    assert isinstance(cost, float), "OpenRouter's usage.cost must reach the client"
    return cost


def test_sync_non_streaming_completion_and_its_usage_record(proxy: ProxyUnderTest) -> None:
    raw = sdk(proxy).chat.completions.with_raw_response.create(model="openai/gpt-4o-mini", messages=MESSAGES)
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.prompt_tokens > 0
    assert raw.headers["x-generation-id"] == completion.id
    assert raw.headers["x-proxy-model"] == "openai/gpt-4o-mini"
    assert raw.headers["x-request-id"]

    (rec,) = proxy.records(1)
    assert rec["key"] == "alice" and rec["team"] == "research"
    assert rec["status"] == 200 and rec["stream"] is False
    assert rec["generation_id"] == completion.id
    assert rec["model"] == completion.model and rec["provider"]
    assert rec["prompt_tokens"] == completion.usage.prompt_tokens
    assert rec["completion_tokens"] == completion.usage.completion_tokens
    assert rec["total_tokens"] == completion.usage.total_tokens
    assert rec["cost_usd"] == cost_of(completion.usage)
    assert rec["request_id"] == raw.headers["x-request-id"]
    assert rec["latency_s"] > 0 and rec["ttfb_s"] > 0


def test_sync_streaming_delivers_content_and_final_usage(proxy: ProxyUnderTest) -> None:
    stream = sdk(proxy).chat.completions.create(model="openai/gpt-4o-mini", messages=MESSAGES, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == 1
    (rec,) = proxy.records(1)
    assert rec["stream"] is True and rec["done"] is True and rec["status"] == 200
    assert rec["completion_tokens"] == usage[0].completion_tokens
    assert rec["cost_usd"] == cost_of(usage[0])
    assert rec["generation_id"] == chunks[0].id
    assert rec["ttft_s"] is not None and rec["ttft_s"] >= rec["ttfb_s"]


def test_async_client_streaming_and_not(proxy: ProxyUnderTest) -> None:
    async def main() -> None:
        client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key=BOB_KEY, max_retries=0, timeout=10)
        completion = await client.chat.completions.create(model="claude", messages=MESSAGES)
        assert completion.choices[0].message.content
        stream = await client.chat.completions.create(model="fast", messages=MESSAGES, stream=True)
        pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        assert "".join(pieces)
        await client.close()

    asyncio.run(main())
    records = proxy.records(2)
    assert {(r["key"], r["requested_model"], r["routed_model"]) for r in records} == {
        ("bob", "claude", "anthropic/claude-haiku-4.5"),
        ("bob", "fast", "openai/gpt-4o-mini"),
    }
    assert all(r["rule"] == f"alias:{r['requested_model']}" for r in records)


def test_tool_calls_streamed_and_not(proxy: ProxyUnderTest) -> None:
    client = sdk(proxy)
    completion = client.chat.completions.create(model="openai/gpt-4o-mini", messages=MESSAGES, tools=TOOLS)
    calls = completion.choices[0].message.tool_calls
    assert completion.choices[0].finish_reason == "tool_calls"
    assert calls and calls[0].function.name == "get_weather"  # type: ignore[union-attr]

    names, arguments = set(), ""
    for chunk in client.chat.completions.create(
        model="openai/gpt-4o-mini", messages=MESSAGES, tools=TOOLS, stream=True
    ):
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                if call.function and call.function.name:
                    names.add(call.function.name)
                if call.function and call.function.arguments:
                    arguments += call.function.arguments
    assert names == {"get_weather"}
    assert arguments.startswith("{") and arguments.endswith("}")
    assert [r["finish_reason"] for r in proxy.records(2)] == ["tool_calls", "tool_calls"]


def test_upstream_sees_attribution_the_upstream_key_and_no_client_key(proxy: ProxyUnderTest, emulator_app: Any) -> None:
    upstream = UpstreamLog(emulator_app)
    sdk(proxy).chat.completions.create(
        model="openai/gpt-4o-mini", messages=MESSAGES, extra_headers={"x-session-id": "s-1", "x-secret-thing": "no"}
    )
    (seen,) = upstream.wait(1)
    assert seen.status == 200  # the emulator accepts only the configured upstream key
    assert seen.headers["http-referer"] == "https://example.test/app"
    assert seen.headers["x-title"] == "proxy-tests"
    assert seen.headers["accept-encoding"] == "identity"
    assert seen.headers["x-session-id"] == "s-1"
    assert "x-secret-thing" not in seen.headers
    assert ALICE_KEY not in repr(seen)


def test_models_list_has_catalog_and_aliases(proxy: ProxyUnderTest) -> None:
    models = {m.id: m for m in sdk(proxy).models.list()}
    assert "openai/gpt-4o-mini" in models and "fast" in models
    assert (models["fast"].model_extra or {})["alias_of"] == "openai/gpt-4o-mini"
    assert models["openai/gpt-4o-mini"].owned_by == "openai"
    assert httpx.get(f"{proxy.base_url}/models").status_code == 401


def test_usage_command_prints_the_calls_with_cost(proxy: ProxyUnderTest, capsys: pytest.CaptureFixture[str]) -> None:
    client = sdk(proxy)
    completion = client.chat.completions.create(model="openai/gpt-4o-mini", messages=MESSAGES)
    assert completion.usage is not None
    proxy.records(1)
    assert cli_main(["usage", "--log", str(proxy.usage_log)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("alice"))
    assert "openai/gpt-4o-mini" in row
    assert f"{cost_of(completion.usage):.8f}" in row
    assert "TOTAL" in out


def test_forwarded_headers_follow_prefix_patterns_and_keep_utf8_values(proxy_server: Any, emulator_app: Any) -> None:
    proxy = proxy_server(upstream_extra="  forward_headers: ['x-openrouter-*', x-session-id]\n")
    upstream = UpstreamLog(emulator_app)
    headers = {
        "Authorization": f"Bearer {ALICE_KEY}",
        "X-OpenRouter-Categories": "cli-agent",
        "X-Session-Id": "café-42".encode(),  # (bytes: UTF-8 on the wire)
        "X-Other": "stays",
    }
    body = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(f"{proxy.base_url}/chat/completions", headers=headers, json=body).status_code == 200
    (sent,) = upstream.wait(1)
    assert sent.headers["x-openrouter-categories"] == "cli-agent"
    assert sent.headers["x-session-id"].encode("latin-1").decode("utf-8") == "café-42"  # the bytes the client sent
    assert "x-other" not in sent.headers


def test_browser_origins_get_cors_when_configured(proxy_server: Any) -> None:
    proxy = proxy_server(extra="server:\n  cors_allow_origins: ['https://app.example.com']\n")
    url = f"{proxy.base_url}/chat/completions"
    preflight = {
        "Origin": "https://app.example.com",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
    }
    answer = httpx.options(url, headers=preflight)
    assert answer.status_code == 200
    assert answer.headers["access-control-allow-origin"] == "https://app.example.com"
    assert "authorization" in answer.headers["access-control-allow-headers"].lower()
    assert httpx.options(url, headers={**preflight, "Origin": "https://evil.example"}).status_code == 400
    body = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    headers = {"Authorization": f"Bearer {ALICE_KEY}", "Origin": "https://app.example.com"}
    with httpx.stream("POST", url, headers=headers, json=body) as response:
        assert response.headers["access-control-allow-origin"] == "https://app.example.com"
        assert "x-ratelimit-remaining-requests" in response.headers["access-control-expose-headers"]
        assert b"[DONE]" in b"".join(response.iter_raw())


def test_without_cors_origins_a_preflight_is_refused(proxy: ProxyUnderTest) -> None:
    answer = httpx.options(
        f"{proxy.base_url}/chat/completions",
        headers={"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST"},
    )
    assert answer.status_code == 405 and "access-control-allow-origin" not in answer.headers
