"""Upstream streams broken in the middle of an event, through a real proxy and the OpenAI SDK.

The scripted upstream writes SSE bytes in pieces that split events and can cut the
connection anywhere (an exception after the response started: uvicorn then drops the
connection without the chunked terminator, as a provider's failure would).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import openai
import orjson
import pytest

from .conftest import ALICE_KEY, ProxyUnderTest
from .raw_upstream import RawUpstream

AUTH = {"Authorization": f"Bearer {ALICE_KEY}"}
COMMENT = b": OPENROUTER PROCESSING\n\n"


def event(gen: str, content: str | None = None, *, finish: str | None = None, usage: bool = False) -> bytes:
    chunk: dict[str, Any] = {
        "id": gen,
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "openai/gpt-4o-mini",
        "provider": "OpenAI",
        "choices": [{"index": 0, "delta": {"content": content or ""}, "finish_reason": finish}],
    }
    if usage:
        chunk["choices"] = []
        chunk["usage"] = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12, "cost": 0.00002}
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def whole_stream(gen: str) -> bytes:
    return (
        b"".join(
            [event(gen, "Hel"), event(gen, "lo"), event(gen, "!"), event(gen, finish="stop"), event(gen, usage=True)]
        )
        + b"data: [DONE]\n\n"
    )


class Cut(Exception):
    """Raised by the scripted upstream to drop its connection mid-body."""


Script = Callable[[int], tuple[list[bytes], bool] | tuple[list[bytes], bool, bytes | None]]


class ScriptedUpstream:
    """An ASGI OpenRouter stand-in: ``script(attempt)`` gives the pieces to write (with a
    short pause between them), whether to cut the connection after the last one and,
    optionally, the content type (``None``: no header; default ``text/event-stream``)."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.attempts = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        if not scope["path"].endswith("/chat/completions"):  # the proxy's price refresh, say
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        pieces, cut, *more = self.script(self.attempts)
        headers = [(b"x-generation-id", b"gen-attempt-%d" % self.attempts)]
        self.attempts += 1
        content_type = more[0] if more else b"text/event-stream"
        if content_type is not None:
            headers.append((b"content-type", content_type))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for piece in pieces:
            await send({"type": "http.response.body", "body": piece, "more_body": True})
            await asyncio.sleep(0.02)
        if cut:
            raise Cut("connection dropped mid-event")
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def halves(data: bytes, at: int) -> list[bytes]:
    return [data[:at], data[at:]]


@pytest.fixture
def scripted(serve: Callable[..., Any], proxy_server: Callable[..., ProxyUnderTest]) -> Callable[..., ProxyUnderTest]:
    def make(script: Script) -> ProxyUnderTest:
        upstream = serve(ScriptedUpstream(script), lifespan="off")
        return proxy_server(upstream_url=f"{upstream.url}/api/v1", extra="retries:\n  backoff_base_s: 0.01\n")

    return make


def received(proxy: ProxyUnderTest) -> bytes:
    body = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.stream("POST", f"{proxy.base_url}/chat/completions", headers=AUTH, json=body, timeout=10) as response:
        assert response.status_code == 200
        return b"".join(response.iter_raw())


def sdk_text(proxy: ProxyUnderTest) -> str:
    client = openai.OpenAI(base_url=proxy.base_url, api_key=ALICE_KEY, max_retries=0)
    stream = client.chat.completions.create(
        model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def test_half_a_first_event_is_never_sent_before_a_retry(scripted: Callable[..., ProxyUnderTest]) -> None:
    """Attempt 1 cuts inside its first data event; the retry's stream must not be glued onto
    the half event (the SDK would fail to parse it)."""
    first = event("gen-a", "Hel")

    def script(attempt: int) -> tuple[list[bytes], bool]:
        if attempt % 2 == 0:
            return [COMMENT + first[:25]], True
        return [COMMENT, *halves(whole_stream("gen-b"), 40)], False

    proxy = scripted(script)
    assert received(proxy) == COMMENT + COMMENT + whole_stream("gen-b")
    assert sdk_text(proxy) == "Hello!"


def test_a_cut_inside_an_event_ends_with_one_parsable_error_event(scripted: Callable[..., ProxyUnderTest]) -> None:
    """After the commit point: the events sent stay whole, the broken one is dropped, then
    exactly one error event; the usage record estimates the tokens."""
    events = [event("gen-c", "Hel"), event("gen-c", "lo"), event("gen-c", "!")]

    def script(attempt: int) -> tuple[list[bytes], bool]:
        return [events[0], events[1][:30], events[1][30:] + events[2][:17]], True

    proxy = scripted(script)
    data = received(proxy)
    assert data.startswith(events[0] + events[1])
    rest = data[len(events[0] + events[1]) :]
    assert rest.startswith(b"data: {") and rest.endswith(b"\n\n") and rest.count(b"\n\n") == 1
    error = orjson.loads(rest[len(b"data: ") :])
    assert error["error"]["code"] == 502 and error["choices"][0]["finish_reason"] == "error"
    with pytest.raises(openai.APIError):
        sdk_text(proxy)
    record = proxy.records(2)[0]
    assert record["error_code"] == "upstream_stream_cut"
    assert record["extra"]["estimated"] is True
    assert record["completion_tokens"] == 1 and record["prompt_tokens"] > 0  # two deltas, the first is the role


def test_events_split_across_writes_arrive_whole_and_byte_for_byte(scripted: Callable[..., ProxyUnderTest]) -> None:
    stream = whole_stream("gen-d")
    pieces = [stream[i : i + 37] for i in range(0, len(stream), 37)]  # 20 ms apart
    proxy = scripted(lambda attempt: (pieces, False))
    body = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.stream("POST", f"{proxy.base_url}/chat/completions", headers=AUTH, json=body, timeout=10) as response:
        reads = list(response.iter_raw())
    assert b"".join(reads) == stream
    assert len(reads) > 1 and all(read.endswith(b"\n\n") for read in reads)  # whole events only
    assert sdk_text(proxy) == "Hello!"
    record = proxy.records(2)[0]
    assert record["completion_tokens"] == 3 and record["done"] is True and "extra" not in record


@pytest.mark.parametrize("content_type", [b"Text/Event-Stream; charset=utf-8", None])
def test_a_stream_is_relayed_as_one_whatever_the_case_of_its_content_type(
    scripted: Callable[..., ProxyUnderTest], content_type: bytes | None
) -> None:
    """Media types compare case-insensitively, and a stream request answered without a
    content type is relayed as a stream (not read whole, and metered from its events)."""
    stream = whole_stream("gen-e")
    proxy = scripted(lambda attempt: ([stream], False, content_type))
    body = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.stream("POST", f"{proxy.base_url}/chat/completions", headers=AUTH, json=body, timeout=10) as response:
        assert "content-length" not in response.headers
        assert b"".join(response.iter_raw()) == stream
    record = proxy.records(1)[0]
    assert record["completion_tokens"] == 3 and record["malformed_events"] == 0


def test_a_retry_that_answers_json_after_a_stream_head_is_retried_again(
    scripted: Callable[..., ProxyUnderTest],
) -> None:
    """The first attempt sent the stream head and a comment, then broke off; a whole JSON
    body cannot follow a stream head, so that answer counts as a failed attempt too."""
    answers: list[tuple[list[bytes], bool, bytes]] = [
        ([COMMENT], True, b"text/event-stream"),
        ([b'{"id":"gen-j","object":"chat.completion","choices":[]}'], False, b"application/json"),
        ([whole_stream("gen-f")], False, b"text/event-stream"),
    ]
    proxy = scripted(lambda attempt: answers[attempt % 3])
    assert received(proxy) == COMMENT + whole_stream("gen-f")
    record = proxy.records(1)[0]
    assert record["error_code"] is None and record["completion_tokens"] == 3
    assert [a.get("error") for a in record["extra"]["attempts"]] == ["upstream_stream_cut"] * 2 + [None]


def test_crlf_stream_ends_right_after_an_upstream_error_event(scripted: Callable[..., ProxyUnderTest]) -> None:
    """CRLF line endings: the bytes after an in-band error event in the same read (the
    trailing ``[DONE]``) are not sent, as with LF endings."""
    error = {"id": "gen-g", "object": "chat.completion.chunk", "error": {"code": 502, "message": "provider died"}}
    error_event = b"data: " + orjson.dumps(error) + b"\r\n\r\n"
    first = event("gen-g", "Hel").replace(b"\n", b"\r\n")
    proxy = scripted(
        lambda attempt: (
            [first, event("gen-g", "lo").replace(b"\n", b"\r\n") + error_event + b"data: [DONE]\r\n\r\n"],
            False,
        )
    )
    data = received(proxy)
    assert data.endswith(error_event) and b"[DONE]" not in data
    assert proxy.records(1)[0]["done"] is False


SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"


@pytest.mark.parametrize("cut_inside_an_event", [True, False])
def test_a_connection_close_body_that_ends_mid_answer_is_a_cut(
    proxy_server: Callable[..., ProxyUnderTest], cut_inside_an_event: bool
) -> None:
    """Without chunked framing or a length, the end of the connection is the end of the body:
    a stream that ends there before its answer finished is still a cut (the half event is
    dropped, one error event follows), not a clean end."""
    events = event("gen-h", "Hel") + event("gen-h", "lo")
    body = events + (event("gen-h", "!")[:20] if cut_inside_an_event else b"")
    with RawUpstream(lambda request_line: SSE_HEAD + body) as upstream:
        proxy = proxy_server(upstream_url=f"{upstream.url}/api/v1")
        data = received(proxy)
        assert data.startswith(events)
        rest = data[len(events) :]
        assert rest.count(b"\n\n") == 1 and rest.endswith(b"\n\n")
        assert orjson.loads(rest[len(b"data: ") :])["error"]["code"] == 502
        record = proxy.records(1)[0]
        assert record["error_code"] == "upstream_stream_cut" and record["extra"]["estimated"] is True
        assert record["malformed_events"] == 0
        finished = whole_stream("gen-h").replace(b"data: [DONE]\n\n", b"")  # ended after its answer
        upstream.respond = lambda request_line: SSE_HEAD + finished
        assert received(proxy) == finished
        record = proxy.records(2)[1]
        assert record["error_code"] is None and record["completion_tokens"] == 3


def test_the_head_a_client_gets_is_the_attempt_s_that_sent_the_first_bytes(
    scripted: Callable[..., ProxyUnderTest],
) -> None:
    """An attempt that fails before relaying a byte (its first event is an error) leaves no
    head behind: the retry's head names its own generation; and when every attempt fails so,
    the client gets an ordinary HTTP error, not a 200 with an in-band one."""
    rate_limited = orjson.dumps({"id": "gen-x", "error": {"code": 429, "message": "slow down", "metadata": {}}})
    failing = b"data: " + rate_limited + b"\n\n"
    proxy = scripted(lambda attempt: ([failing], False) if attempt == 0 else ([whole_stream("gen-k")], False))
    body = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.stream("POST", f"{proxy.base_url}/chat/completions", headers=AUTH, json=body, timeout=10) as response:
        assert response.status_code == 200 and response.headers["x-generation-id"] == "gen-attempt-1"
        assert b"".join(response.iter_raw()) == whole_stream("gen-k")

    proxy = scripted(lambda attempt: ([failing], False))
    reply = httpx.post(f"{proxy.base_url}/chat/completions", headers=AUTH, json=body, timeout=10)
    assert reply.status_code == 429 and reply.json()["error"]["message"] == "slow down"


def test_an_upstream_error_before_the_first_token_keeps_its_metadata_in_band(
    scripted: Callable[..., ProxyUnderTest],
) -> None:
    """Keep-alive comments already went out, then every attempt's first event is an error:
    the in-band error event the client gets carries the upstream's code and metadata."""
    error = {"code": 429, "message": "slow down", "metadata": {"error_type": "rate_limit_exceeded", "x": 1}}
    failing = [COMMENT, b"data: " + orjson.dumps({"id": "gen-x", "error": error}) + b"\n\n"]  # two reads
    proxy = scripted(lambda attempt: (failing, False))
    data = received(proxy)
    event = orjson.loads(data.rsplit(b"\n\n", 2)[-2][len(b"data: ") :])
    assert event["error"] == error


def test_an_attempt_whose_body_broke_off_names_its_generation_in_the_record(
    scripted: Callable[..., ProxyUnderTest],
) -> None:
    """A whole (non-stream) answer cut mid-body is billed by OpenRouter all the same: the
    usage record's attempts name its generation, so it can be found and reconciled."""
    answer = orjson.dumps({"id": "gen-w", "object": "chat.completion", "choices": [], "usage": {"prompt_tokens": 1}})
    answers = [([answer[:20]], True, b"application/json"), ([answer], False, b"application/json")]
    proxy = scripted(lambda attempt: answers[min(attempt, 1)])
    body = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(f"{proxy.base_url}/chat/completions", headers=AUTH, json=body, timeout=10).status_code == 200
    attempts = proxy.records(1)[0]["extra"]["attempts"]
    assert attempts[0]["generation_id"] == "gen-attempt-0" and attempts[0]["error"] == "upstream_stream_cut"
    assert "generation_id" not in attempts[1]
