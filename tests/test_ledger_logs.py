"""The request log: one JSON line per request, and nothing secret or private in any log."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import openai
import orjson
import pytest

from .conftest import ALICE_KEY, BOB_KEY, UPSTREAM_KEY, ProxyUnderTest
from .usage_fixtures import exported, ledger_config, wait_for

SECRET_WORDS = "Zanzibar-marmalade-7731 quietly"


def test_one_line_per_request_and_no_key_or_content_anywhere(
    proxy_server: Callable[..., ProxyUnderTest], caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    proxy = proxy_server(extra=ledger_config())
    messages: Any = [{"role": "user", "content": SECRET_WORDS}]

    async def load() -> None:
        for key in (ALICE_KEY, BOB_KEY):
            client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key=key, max_retries=0, timeout=10)
            await client.chat.completions.create(model="gpt-4o-mini", messages=messages)
            stream = await client.chat.completions.create(model="gpt-4o-mini", messages=messages, stream=True)
            reply = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            assert "Zanzibar" in reply  # the emulator echoes the words: they are in the answer
            await client.close()
        bad = openai.AsyncOpenAI(base_url=proxy.base_url, api_key=ALICE_KEY + "x", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            await bad.chat.completions.create(model="gpt-4o-mini", messages=messages)
        await bad.close()

    asyncio.run(load())
    request_log = proxy.settings.policies_dir.parent / "requests.jsonl"
    export_dir = proxy.settings.ledger.export_dir
    assert export_dir is not None
    wait_for(lambda: len(exported(export_dir)) == 5, what="5 exported records")
    proxy.server.stop()  # flushes the request log

    lines = [orjson.loads(line) for line in request_log.read_bytes().splitlines()]
    assert len(lines) == 5
    assert {line["request_id"] for line in lines} == {line["request_id"] for line in exported(export_dir)}
    ok = [line for line in lines if line["status"] == 200]
    assert len(ok) == 4 and all(line["cost_usd"] > 0 and line["prompt_tokens"] > 0 for line in ok)
    assert {"request_id", "route", "model", "status", "latency_s", "cost_usd"} <= set(lines[0])

    everything = b"".join(
        [
            request_log.read_bytes(),
            proxy.usage_log.read_bytes(),
            *(path.read_bytes() for path in export_dir.glob("*.jsonl")),
            caplog.text.encode(),
            *(part.encode() for part in capfd.readouterr()),
        ]
    )
    for secret in (ALICE_KEY, BOB_KEY, UPSTREAM_KEY, ALICE_KEY[9:], "Zanzibar", "marmalade", "You said"):
        assert secret.encode() not in everything, secret


def test_traces_are_optional_and_one_span_per_request() -> None:
    import importlib.util

    from proxy.accounting import account
    from proxy.tracing import SpanSink, tracing_sink
    from proxy.types import Usage

    from .usage_fixtures import record

    if importlib.util.find_spec("opentelemetry") is None:
        assert tracing_sink() is None  # not installed: nothing to do, nothing breaks

    spans: list[dict[str, Any]] = []

    class Span:
        def __init__(self, name: str, **kwargs: Any) -> None:
            self.data = {"name": name, **kwargs}

        def set_status(self, status: Any) -> None:
            self.data["status"] = status

        def end(self, end_time: int) -> None:
            spans.append({**self.data, "end_time": end_time})

    class Tracer:
        def start_span(self, name: str, **kwargs: Any) -> Span:
            return Span(name, **kwargs)

    class Trace:  # the few names of opentelemetry.trace that SpanSink uses
        SpanKind = type("SpanKind", (), {"SERVER": "server"})
        StatusCode = type("StatusCode", (), {"ERROR": "error"})

        @staticmethod
        def Status(code: str) -> str:  # opentelemetry's name
            return code

        @staticmethod
        def get_tracer(name: str) -> Tracer:
            return Tracer()

    rec = record(usage=Usage(prompt_tokens=6, completion_tokens=10, cost_usd=0.01), ts=1000.0)
    SpanSink(Trace).emit_entry(account(rec, lambda model: None))
    (span,) = spans
    assert (span["start_time"], span["end_time"]) == (1000 * 10**9, 1000 * 10**9 + 250_000_000)
    assert span["attributes"]["gen_ai.usage.output_tokens"] == 10 and "status" not in span


def test_include_content_puts_messages_and_answer_in_the_request_log_only(
    proxy_server: Callable[..., ProxyUnderTest],
) -> None:
    proxy = proxy_server(extra=ledger_config() + "  include_content: true\n")
    messages: Any = [{"role": "user", "content": SECRET_WORDS}]

    async def load() -> list[str]:
        client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key=ALICE_KEY, max_retries=0, timeout=10)
        whole = await client.chat.completions.create(model="gpt-4o-mini", messages=messages)
        stream = await client.chat.completions.create(model="gpt-4o-mini", messages=messages, stream=True)
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        await client.close()
        return [whole.choices[0].message.content or "", streamed]

    answers = asyncio.run(load())
    request_log = proxy.settings.policies_dir.parent / "requests.jsonl"
    proxy.records(2)
    proxy.server.stop()  # flushes the request log
    lines = [orjson.loads(line) for line in request_log.read_bytes().splitlines()]
    assert [line["content"]["messages"] for line in lines] == [messages, messages]
    assert sorted(line["content"]["answer"] for line in lines) == sorted(answers)
    assert b"Zanzibar" not in proxy.usage_log.read_bytes()
