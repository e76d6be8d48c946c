"""Bad input, auth failures and upstream errors, as a client of the running proxy sees them."""

from __future__ import annotations

import json
import logging
import socket
from typing import Any

import httpx
import orjson
import pytest

from proxy.asgi import read_body

from .conftest import ALICE_KEY, UPSTREAM_KEY, ProxyUnderTest
from .factories import UpstreamLog

AUTH = {"Authorization": f"Bearer {ALICE_KEY}"}
GOOD: dict[str, Any] = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def nested(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


def post(
    proxy: ProxyUnderTest, body: Any = None, *, content: bytes | None = None, headers: Any = None
) -> httpx.Response:
    return httpx.post(
        f"{proxy.base_url}/chat/completions",
        json=body if content is None else None,
        content=content,
        headers=AUTH if headers is None else headers,
        timeout=10,
    )


def error_of(response: httpx.Response) -> dict[str, Any]:
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert {"message", "type", "param", "code"} <= set(error)
    assert "Traceback" not in response.text
    return error


@pytest.mark.parametrize(
    ("body", "content", "param"),
    [
        (None, b"{oops", None),
        ({"messages": GOOD["messages"]}, None, "model"),
        ({"model": "openai/gpt-4o-mini"}, None, "messages"),
        ({**GOOD, "messages": [{"role": 1}]}, None, "messages[0].role"),
        ({**GOOD, "stream": "yes"}, None, "stream"),
        ({**GOOD, "max_tokens": -1}, None, "max_tokens"),
        # deeper than orjson can encode again (routing rewrites the body): 400, not 500
        (None, json.dumps({**GOOD, "tools": [{"type": "function", "x": nested(300)}]}).encode(), "tools"),
    ],
)
def test_bad_input_is_400_with_param(
    proxy: ProxyUnderTest, body: Any, content: bytes | None, param: str | None
) -> None:
    response = post(proxy, body, content=content)
    assert response.status_code == 400
    error = error_of(response)
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert response.headers["x-should-retry"] == "false"


def test_body_over_the_limit_is_413(proxy: ProxyUnderTest) -> None:
    big = {**GOOD, "messages": [{"role": "user", "content": "x" * 70_000}]}
    response = post(proxy, big)
    assert response.status_code == 413
    assert error_of(response)["code"] == "request_too_large"

    def chunks() -> Any:
        for _ in range(80):
            yield b"x" * 1000

    response = httpx.post(f"{proxy.base_url}/chat/completions", content=chunks(), headers=AUTH, timeout=10)
    assert response.status_code == 413


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer sk-proxy-wrong"}, {"Authorization": "Basic abc"}])
def test_missing_or_wrong_key_is_401(proxy: ProxyUnderTest, headers: dict[str, str]) -> None:
    response = post(proxy, GOOD, headers=headers)
    assert response.status_code == 401
    assert error_of(response)["code"] == "invalid_api_key"


def test_wrong_method_and_unknown_path_are_openai_shaped(proxy: ProxyUnderTest) -> None:
    response = httpx.get(f"{proxy.base_url}/chat/completions", headers=AUTH)
    assert response.status_code == 405 and error_of(response)["code"] == "method_not_allowed"
    response = httpx.get(f"{proxy.url}/v1/nothing-here", headers=AUTH)
    assert response.status_code == 404 and error_of(response)["code"] == "not_found"
    assert httpx.get(f"{proxy.url}/healthz").json() == {"status": "ok"}


@pytest.mark.parametrize(
    ("fault", "status", "attempts"),
    [
        ("error-400", 400, 1),
        ("error-403", 403, 1),
        ("error-404", 404, 1),
        ("error-408", 408, 3),
        ("error-429", 429, 3),
        ("error-500", 500, 3),
        ("error-502", 502, 3),
        ("error-503", 503, 1),  # Retry-After: 30 is above retries.max_retry_after_s: not retried here
    ],
)
def test_upstream_errors_are_relayed_with_code_and_metadata(
    proxy: ProxyUnderTest, emulator_app: Any, fault: str, status: int, attempts: int
) -> None:
    """Non-retryable errors are relayed at once; retryable ones after the proxy's 3 attempts,
    and then with ``x-should-retry: false`` so the SDK does not multiply them again."""
    for stream in (False, True):
        upstream = UpstreamLog(emulator_app)
        response = post(proxy, {**GOOD, "stream": stream, "emulator": {"fault": fault}})
        assert response.status_code == status
        assert len(upstream.wait(attempts)) == attempts
        error = error_of(response)
        assert error["code"] == status
        retryable_by_client = status in (408, 429, 500, 502, 503) and attempts == 1
        assert response.headers.get("x-should-retry") == (None if retryable_by_client else "false")
        if fault == "error-403":
            assert error["type"] == "permission_error" and error["metadata"]["reasons"]
        if fault == "error-429":
            assert error["type"] == "rate_limit_exceeded"
        if fault == "error-503":
            assert response.headers["retry-after"] == "30"
            assert error["availability"]["code"] == "temporarily_unavailable"
        if fault == "error-502":
            assert error["metadata"]["provider_name"]
            assert "user_id" not in response.json()
    records = proxy.records(2)
    assert [r["status"] for r in records] == [status, status]


def test_upstream_401_and_402_are_the_operators_problem(proxy_server: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    wrong_key = proxy_server(api_key="sk-or-wrong-key-for-this-test")
    response = post(wrong_key, GOOD)
    assert response.status_code == 502
    error = error_of(response)
    assert error["type"] == "upstream_authentication_error"
    assert response.headers["x-should-retry"] == "false"
    assert any(r.levelno >= logging.ERROR and "401" in r.getMessage() for r in caplog.records)

    response = post(wrong_key, {**GOOD, "emulator": {"fault": "error-402"}})
    assert response.status_code in (502, 503)
    assert "sk-or-wrong-key-for-this-test" not in response.text


def test_upstream_402_becomes_503(proxy: ProxyUnderTest) -> None:
    response = post(proxy, {**GOOD, "emulator": {"fault": "error-402"}})
    assert response.status_code == 503
    assert error_of(response)["type"] == "upstream_insufficient_credits"
    assert response.headers["x-should-retry"] == "false"


def test_unreachable_upstream_is_502_and_a_slow_one_504(proxy_server: Any) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    down = proxy_server(upstream_url=f"http://127.0.0.1:{closed_port}/api/v1")
    response = post(down, GOOD)
    assert response.status_code == 502
    assert error_of(response)["code"] == "upstream_unreachable"
    slow = proxy_server(read_timeout_s=0.3)
    response = post(slow, {**GOOD, "emulator": {"first_byte_delay_ms": 1500}})
    assert response.status_code == 504
    assert error_of(response)["code"] == "upstream_timeout"


def test_the_upstream_key_never_reaches_a_client_or_a_log(
    proxy: ProxyUnderTest, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    seen = []
    for fault in ("error-400", "error-401", "error-402", "error-429", "error-502", "error-503", None):
        body = {**GOOD, "emulator": {"fault": fault}} if fault else GOOD
        for stream in (False, True):
            response = post(proxy, {**body, "stream": stream})
            seen.append(response.text + repr(response.headers))
    seen.append(httpx.get(f"{proxy.base_url}/models", headers=AUTH).text)
    out, err = capfd.readouterr()
    logged = caplog.text + out + err + proxy.usage_log.read_text()
    for text in [*seen, logged]:
        assert UPSTREAM_KEY not in text
        assert ALICE_KEY not in text


def test_an_upstream_echoing_the_key_in_any_spelling_does_not_leak_it(serve: Any, proxy_server: Any) -> None:
    """An upstream error that quotes the proxy's key: JSON-escaped in the body, in
    ``Retry-After``, or in a stream's error event before the first token."""
    escaped = "".join(f"\\u{ord(c):04x}" for c in UPSTREAM_KEY)

    async def upstream(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive, 1 << 20, None)
        model = orjson.loads(body)["model"] if scope["path"].endswith("/chat/completions") else ""
        if model == "leak/escaped":
            status, headers = 400, [(b"content-type", b"application/json")]
            payload = (
                '{"error": {"code": 400, "message": "bad key '
                + escaped
                + '", "metadata": {"raw": ["'
                + escaped
                + '"]}}}'
            ).encode()
        elif model == "leak/retry-after":
            status, headers = 429, [(b"content-type", b"application/json"), (b"retry-after", UPSTREAM_KEY.encode())]
            payload = b'{"error": {"code": 429, "message": "slow down"}}'
        elif model == "leak/stream":
            status, headers = 200, [(b"content-type", b"text/event-stream")]
            error = {"error": {"code": 502, "message": f"provider says key {UPSTREAM_KEY}"}, "choices": []}
            payload = b"data: " + orjson.dumps(error) + b"\n\n"
        else:
            status, headers, payload = 404, [], b""
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    server = serve(upstream, lifespan="off")
    proxy = proxy_server(upstream_url=f"{server.url}/api/v1", extra="retries:\n  max_attempts: 1\n")
    for model in ("leak/escaped", "leak/retry-after"):
        response = post(proxy, {**GOOD, "model": model})
        assert response.status_code in (400, 429)
        error = error_of(response)
        assert UPSTREAM_KEY not in response.text and UPSTREAM_KEY not in repr(response.headers)
        assert "[redacted]" in str(error) or model == "leak/retry-after"
        assert "retry-after" not in response.headers  # neither seconds nor a date: dropped
    streamed = post(proxy, {**GOOD, "model": "leak/stream", "stream": True})  # head out before the error event
    assert UPSTREAM_KEY not in streamed.text and "[redacted]" in streamed.text
