"""SSE passthrough through a real proxy: byte for byte, unbuffered, cut streams."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import orjson
import pytest

from .conftest import ALICE_KEY, SHARED_FIXTURES, ProxyUnderTest
from .factories import UpstreamLog

AUTH = {"Authorization": f"Bearer {ALICE_KEY}"}
FIXTURE_STREAMS = sorted(p.name for p in SHARED_FIXTURES.glob("*.sse"))


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}], **extra}


def streamed(proxy: ProxyUnderTest, **emulator: Any) -> tuple[httpx.Response, bytes]:
    """A streamed answer (emulator controls ``emulator``): the response and every byte of it."""
    with httpx.stream(
        "POST",
        f"{proxy.base_url}/chat/completions",
        headers=AUTH,
        json=chat_body(stream=True, emulator=emulator),
        timeout=10,
    ) as response:
        return response, b"".join(response.iter_raw())


def streamed_body(proxy: ProxyUnderTest, fault: str) -> bytes:
    """Every byte of a streamed answer with emulator fault ``fault``."""
    return streamed(proxy, fault=fault)[1]


@pytest.mark.parametrize("name", FIXTURE_STREAMS)
def test_fixture_streams_arrive_byte_for_byte(proxy: ProxyUnderTest, name: str) -> None:
    expected = (SHARED_FIXTURES / name).read_bytes()
    if name == "stream_midstream_error.sse":
        # The stream-integrity contract: an in-band error ends the stream; OpenRouter's
        # trailing [DONE] is dropped so that no client mistakes it for a success.
        expected = expected.removesuffix(b"data: [DONE]\n\n")
    response, received = streamed(proxy, fixture=name)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert received == expected
    (rec,) = proxy.records(1)
    assert rec["malformed_events"] == 0
    if name == "stream_midstream_error.sse":
        assert rec["error_code"] == "502" and rec["done"] is False
    else:
        assert rec["done"] is True
        assert rec["completion_tokens"] > 0 and rec["cost_usd"] > 0


def test_non_stream_fixture_is_forwarded_as_received(proxy: ProxyUnderTest) -> None:
    expected = (SHARED_FIXTURES / "completion_tool_call.json").read_bytes()
    response = httpx.post(
        f"{proxy.base_url}/chat/completions",
        headers=AUTH,
        json=chat_body(emulator={"fixture": "completion_tool_call.json"}),
        timeout=10,
    )
    assert response.content == expected
    (rec,) = proxy.records(1)
    assert (rec["prompt_tokens"], rec["completion_tokens"], rec["cost_usd"]) == (96, 52, 0.0000456)
    assert rec["finish_reason"] == "tool_calls"


def test_chunks_are_not_buffered(proxy: ProxyUnderTest) -> None:
    arrivals: list[float] = []
    with httpx.stream(
        "POST",
        f"{proxy.base_url}/chat/completions",
        headers=AUTH,
        json=chat_body(stream=True, emulator={"chunk_delay_ms": 50, "completion_tokens": 12}),
        timeout=10,
    ) as response:
        start = time.monotonic()
        for chunk in response.iter_raw():
            if b"data: {" in chunk:
                arrivals.append(time.monotonic() - start)
    assert len(arrivals) >= 10
    # 12+ events 50 ms apart: the first is seen long before the last, and they trickle in.
    assert arrivals[-1] - arrivals[0] >= 0.4
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert sum(1 for g in gaps if g >= 0.03) >= 8


def test_stream_cut_after_first_byte_ends_with_an_in_band_error(proxy: ProxyUnderTest) -> None:
    client = openai.OpenAI(base_url=proxy.base_url, api_key=ALICE_KEY, max_retries=0, timeout=10)
    stream = client.chat.completions.create(
        model="openai/gpt-4o-mini",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        extra_body={"emulator": {"fault": "cut"}},
    )
    received = []
    with pytest.raises(openai.APIError):
        for chunk in stream:
            received.append(chunk)
    assert received, "content before the cut is delivered"
    (rec,) = proxy.records(1)
    assert rec["error_code"] == "upstream_stream_cut" and rec["done"] is False


def test_raw_cut_stream_has_no_done_and_one_error_event(proxy: ProxyUnderTest) -> None:
    body = streamed_body(proxy, "cut")
    events = [e for e in body.split(b"\n\n") if e.startswith(b"data: ")]
    assert b"[DONE]" not in body
    last = orjson.loads(events[-1][6:])
    assert last["error"]["code"] == 502 and last["choices"][0]["finish_reason"] == "error"
    assert sum(1 for e in events if b'"error"' in e) == 1


def test_stream_without_done_is_recorded_with_usage(proxy: ProxyUnderTest) -> None:
    body = streamed_body(proxy, "no-done")
    assert b"[DONE]" not in body and b'"usage"' in body
    (rec,) = proxy.records(1)
    assert rec["done"] is False and rec["completion_tokens"] > 0 and rec["status"] == 200


def test_malformed_event_is_forwarded_and_noted(proxy: ProxyUnderTest) -> None:
    body = streamed_body(proxy, "malformed")
    assert body.endswith(b"data: [DONE]\n\n")
    (rec,) = proxy.records(1)
    assert rec["done"] is True


@pytest.mark.parametrize("http", ["serve", "httptools"])
def test_client_hang_up_cancels_the_upstream_stream(
    proxy_server: Callable[..., ProxyUnderTest], emulator_app: Any, http: str
) -> None:
    """Served as ``openrouter-proxy serve`` does, the protocol's hook tells of the hang-up;
    under uvicorn's own protocol, a task waiting on ``receive`` does."""
    proxy = proxy_server(http=None if http == "serve" else http)
    upstream = UpstreamLog(emulator_app)
    with httpx.stream(
        "POST",
        f"{proxy.base_url}/chat/completions",
        headers=AUTH,
        json=chat_body(stream=True, emulator={"fault": "stall"}),
        timeout=10,
    ) as response:
        for chunk in response.iter_raw():
            if b"data: {" in chunk:
                break
    (rec,) = proxy.records(1, timeout=5)
    assert rec["cancelled"] is True and rec["status"] == 200
    (sent,) = upstream.wait(1)  # recorded when the emulator's handler ends: after the hang-up
    assert sent.cancelled is True


def test_the_usage_log_carries_the_cost_as_accounted_for_a_cut_stream(proxy: ProxyUnderTest) -> None:
    """A cut stream has no upstream cost: its usage-log line has the priced estimate (as the
    ledger), so a report read from the usage log counts it too."""
    from proxy.report_sources import facts_from_lines

    streamed_body(proxy, "cut")
    (rec,) = proxy.records(1)
    assert rec["estimated"] is True and rec["cost_source"] == "pricing" and rec["cost_usd"] > 0
    facts, skipped = facts_from_lines(proxy.usage_log.read_bytes().splitlines())
    assert skipped == 0 and facts[0][1]["estimated"] == 1 and facts[0][1]["cost_nusd"] > 0
