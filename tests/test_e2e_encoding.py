"""An upstream that encodes its answer although the proxy asked for ``identity``.

The proxy decodes it (aiohttp), so the client gets plain bytes it can read without a
``content-encoding`` header, and metering reads the usage. An encoding nobody can decode
is a failed attempt with a clean OpenAI-shaped error, never a 500.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Callable

import httpx
import openai
import orjson
import pytest

from .conftest import ALICE_KEY, ProxyUnderTest
from .raw_upstream import RawUpstream
from .test_e2e_stream_cuts import whole_stream

AUTH = {"Authorization": f"Bearer {ALICE_KEY}"}
ANSWER = orjson.dumps(
    {
        "id": "gen-z",
        "object": "chat.completion",
        "created": 1,
        "model": "openai/gpt-4o-mini",
        "provider": "OpenAI",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12, "cost": 0.00002},
    }
)
ENCODERS: dict[str, Callable[[bytes], bytes]] = {"gzip": gzip.compress, "deflate": zlib.compress}


def response(content_type: bytes, encoding: bytes, body: bytes, status: bytes = b"200 OK") -> bytes:
    head = (
        b"HTTP/1.1 "
        + status
        + b"\r\ncontent-type: "
        + content_type
        + b"\r\ncontent-encoding: "
        + encoding
        + b"\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\nconnection: close\r\n\r\n"
    )
    return head + body


@pytest.mark.parametrize("encoding", sorted(ENCODERS))
def test_an_encoded_answer_reaches_the_client_decoded_and_is_metered(
    proxy_server: Callable[..., ProxyUnderTest], encoding: str
) -> None:
    encode = ENCODERS[encoding]
    with RawUpstream(lambda line: response(b"application/json", encoding.encode(), encode(ANSWER))) as upstream:
        proxy = proxy_server(upstream_url=f"{upstream.url}/api/v1")
        client = openai.OpenAI(base_url=proxy.base_url, api_key=ALICE_KEY, max_retries=0)
        answer = client.chat.completions.create(
            model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
        assert answer.choices[0].message.content == "Hello!"
        with httpx.Client(headers={**AUTH, "accept-encoding": "identity"}) as raw:
            plain = raw.post(
                f"{proxy.base_url}/chat/completions",
                json={"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
            )
        assert plain.content == ANSWER and "content-encoding" not in plain.headers
        record = proxy.records(2)[1]
        assert record["completion_tokens"] == 3 and record["cost_usd"] == 0.00002

        stream = whole_stream("gen-y")
        upstream.respond = lambda line: response(b"text/event-stream", encoding.encode(), encode(stream))
        chunks = client.chat.completions.create(
            model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello!"
        record = proxy.records(3)[2]
        assert record["completion_tokens"] == 3 and record["done"] is True

        error = orjson.dumps({"error": {"code": 429, "message": "Provider rate limited: slow down"}})
        upstream.respond = lambda line: response(b"application/json", encoding.encode(), encode(error), b"429 Too Many")
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        assert "slow down" in str(caught.value)


def test_an_encoding_that_cannot_be_decoded_is_a_clean_502(proxy_server: Callable[..., ProxyUnderTest]) -> None:
    with RawUpstream(lambda line: response(b"application/json", b"gzip", b"this is not gzip")) as upstream:
        proxy = proxy_server(upstream_url=f"{upstream.url}/api/v1", extra="retries:\n  backoff_base_s: 0.01\n")
        reply = httpx.post(
            f"{proxy.base_url}/chat/completions",
            headers=AUTH,
            json={"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert reply.status_code == 502
        assert set(reply.json()["error"]) == {"message", "type", "param", "code"}
