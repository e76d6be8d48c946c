"""Bad and hostile input: a clear 4xx or a timeout, never a 5xx, with bounded memory."""

from __future__ import annotations

import contextlib
import socket
import time
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import ALICE_KEY, ProxyUnderTest

AUTH = {"Authorization": f"Bearer {ALICE_KEY}", "Content-Type": "application/json"}


def post_raw(proxy: ProxyUnderTest, content: bytes) -> httpx.Response:
    return httpx.post(f"{proxy.base_url}/chat/completions", content=content, headers=AUTH, timeout=10)


def test_deep_nesting_invalid_utf8_and_huge_asks_are_400(proxy: ProxyUnderTest) -> None:
    deep = b'{"model": "openai/gpt-4o-mini", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    assert post_raw(proxy, deep).status_code == 400
    assert post_raw(proxy, b'{"model": "\xff\xfe", "messages": []}').status_code == 400
    nine_models = b'"models": [' + b",".join(b'"openai/m%d"' % i for i in range(9)) + b"]"  # over server.max_models
    for extra, param in ((b'"n": 100000', "n"), (b'"max_tokens": 999999999999', "max_tokens"), (nine_models, "models")):
        body = b'{"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], ' + extra + b"}"
        response = post_raw(proxy, body)
        assert response.status_code == 400
        assert response.json()["error"]["param"] == param


def test_slow_drip_body_times_out_with_408(proxy_server: Any) -> None:
    proxy = proxy_server(extra="server:\n  max_body_bytes: 65536\n  body_timeout_s: 0.5\n")
    with socket.create_connection(("127.0.0.1", proxy.server.port), timeout=5) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + ALICE_KEY.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n{"
        )
        began = time.monotonic()
        reply = b""
        try:
            for _ in range(20):
                sock.sendall(b" ")
                time.sleep(0.1)
                sock.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    reply += sock.recv(4096)
                sock.setblocking(True)
                if reply:
                    break
        except OSError:
            pass
    assert reply.startswith(b"HTTP/1.1 408"), reply[:100]
    assert time.monotonic() - began < 2


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
FIELDS = [
    "model",
    "messages",
    "stream",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "tools",
    "models",
    "provider",
    "response_format",
    "max_completion_tokens",
    "seed",
    "user",
    "reasoning",
]
MODELS = st.sampled_from(["openai/gpt-4o-mini", "gpt-4o-mini", "fast", "nope/none", ""]) | st.text(max_size=12)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "robot"]), "content": JSON}
)
BODIES = st.one_of(
    st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=6),
    st.fixed_dictionaries(
        {"model": MODELS, "messages": st.lists(MESSAGE, max_size=3)},
        optional={name: JSON for name in FIELDS[2:]},
    ),
    JSON,
)


def test_fuzzed_bodies_never_yield_a_5xx(proxy: ProxyUnderTest) -> None:
    import orjson

    with httpx.Client(base_url=proxy.base_url, headers=AUTH, timeout=10) as client:

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
        @given(BODIES)
        def check(payload: Any) -> None:
            response = client.post("/chat/completions", content=orjson.dumps(payload))
            assert response.status_code < 500, (payload, response.text)
            if response.status_code >= 400:
                assert "error" in response.json()

        check()
