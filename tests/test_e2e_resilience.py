"""Retries, fallbacks, timeouts, circuit breaking and the stream-integrity contract,
through a real proxy with the emulator scripting the failures."""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import openai
import orjson
import pytest

from proxy.asgi import read_body

from .conftest import ALICE_KEY, FixedRouter, ProxyUnderTest
from .factories import UpstreamLog

AUTH = {"Authorization": f"Bearer {ALICE_KEY}"}
MESSAGES: Any = [{"role": "user", "content": "hello there"}]


def body(model: str = "openai/gpt-4o-mini", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": MESSAGES, **extra}


def post(proxy: ProxyUnderTest, payload: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{proxy.base_url}/chat/completions", json=payload, headers=AUTH, timeout=15)


def stream_bytes(proxy: ProxyUnderTest, payload: dict[str, Any]) -> bytes:
    with httpx.stream(
        "POST", f"{proxy.base_url}/chat/completions", json={**payload, "stream": True}, headers=AUTH, timeout=15
    ) as response:
        assert response.status_code == 200
        return b"".join(response.iter_raw())


@pytest.mark.parametrize("stream", [False, True])
def test_fail_once_then_succeed_is_invisible_to_the_client(
    proxy: ProxyUnderTest, emulator_app: Any, stream: bool
) -> None:
    upstream = UpstreamLog(emulator_app)
    controls = {"fault": "error-502", "fail_times": 1, "fault_key": uuid.uuid4().hex}
    payload = body(emulator=controls)
    if stream:
        data = stream_bytes(proxy, payload)
        assert data.endswith(b"data: [DONE]\n\n") and b'"error"' not in data
    else:
        response = post(proxy, payload)
        assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"]
    assert [r.status for r in upstream.wait(2)] == [502, 200]
    (rec,) = proxy.records(1)
    assert rec["status"] == 200 and rec["completion_tokens"] > 0
    assert [(a["status"], a.get("error")) for a in rec["extra"]["attempts"]] == [(502, "502"), (200, None)]


def test_retry_after_is_honoured(proxy: ProxyUnderTest, emulator_app: Any) -> None:
    controls = {"fault": "error-429", "fail_times": 1, "fault_key": uuid.uuid4().hex, "retry_after": 1}
    began = time.monotonic()
    response = post(proxy, body(emulator=controls))
    assert response.status_code == 200
    assert time.monotonic() - began >= 1.0


def test_fallback_to_the_next_model_names_the_model_that_answered(proxy_server: Any, emulator_app: Any) -> None:
    proxy = proxy_server(router=FixedRouter({"emulator/error-503": ("openai/gpt-4o-mini",)}))
    upstream = UpstreamLog(emulator_app)
    assert post(proxy, body("emulator/error-502")).status_code == 502  # retried, then relayed
    assert [r.model for r in upstream.wait(3)] == ["emulator/error-502"] * 3
    proxy.records(1)
    upstream = UpstreamLog(emulator_app)
    with openai.OpenAI(base_url=proxy.base_url, api_key=ALICE_KEY, max_retries=0) as client:
        raw = client.chat.completions.with_raw_response.create(model="emulator/error-503", messages=MESSAGES)
    completion = raw.parse()
    assert completion.model == "openai/gpt-4o-mini"
    # OpenRouter's 503 says Retry-After: 30, above retries.max_retry_after_s: fall back at once.
    assert [r.model for r in upstream.wait(2)] == ["emulator/error-503", "openai/gpt-4o-mini"]
    rec = proxy.records(2)[-1]
    assert rec["routed_model"] == "openai/gpt-4o-mini" and rec["requested_model"] == "emulator/error-503"
    assert [a["model"] for a in rec["extra"]["attempts"]] == ["emulator/error-503", "openai/gpt-4o-mini"]
    assert rec["cost_usd"] > 0 and rec["status"] == 200


def test_context_length_falls_back_at_once_and_moderation_does_not(proxy_server: Any, emulator_app: Any) -> None:
    proxy = proxy_server(
        router=FixedRouter({"emulator/error-400": ("openai/gpt-4.1-nano",), "emulator/error-403": ("openai/gpt-4o",)})
    )
    upstream = UpstreamLog(emulator_app)
    assert post(proxy, body("emulator/error-400")).status_code == 200
    assert [r.model for r in upstream.wait(2)] == ["emulator/error-400", "openai/gpt-4.1-nano"]
    upstream = UpstreamLog(emulator_app)
    response = post(proxy, body("emulator/error-403"))
    assert response.status_code == 403
    assert response.json()["error"]["metadata"]["reasons"]
    assert len(upstream.wait(1)) == 1


def test_slow_first_token_falls_back_on_the_same_stream(proxy_server: Any, emulator_app: Any) -> None:
    router = FixedRouter({"emulator/slow-first-token": ("openai/gpt-4o-mini",)}, first_token_timeout_s=0.3)
    proxy = proxy_server(router=router)
    began = time.monotonic()
    client = openai.OpenAI(base_url=proxy.base_url, api_key=ALICE_KEY, max_retries=0)
    chunks = list(client.chat.completions.create(model="emulator/slow-first-token", messages=MESSAGES, stream=True))
    assert time.monotonic() - began < 5
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].model == "openai/gpt-4o-mini"
    (rec,) = proxy.records(1)
    assert rec["done"] is True and rec["routed_model"] == "openai/gpt-4o-mini"
    assert rec["extra"]["attempts"][0]["error"] == "upstream_timeout"


def test_a_stall_after_the_commit_point_ends_with_an_in_band_error(proxy_server: Any) -> None:
    proxy = proxy_server(read_timeout_s=0.3)
    began = time.monotonic()
    data = stream_bytes(proxy, body(emulator={"fault": "stall"}))
    assert time.monotonic() - began < 5
    events = [e for e in data.split(b"\n\n") if e.startswith(b"data: ")]
    assert b"[DONE]" not in data
    assert orjson.loads(events[-1][6:])["error"]["code"] == 502
    with (
        openai.OpenAI(base_url=proxy.base_url, api_key=ALICE_KEY, max_retries=0) as client,
        pytest.raises(openai.APIError),
    ):
        list(
            client.chat.completions.create(
                model="openai/gpt-4o-mini", messages=MESSAGES, stream=True, extra_body={"emulator": {"fault": "stall"}}
            )
        )
    assert [r["error_code"] for r in proxy.records(2)] == ["upstream_stream_cut"] * 2


def test_an_upstream_mid_stream_error_ends_the_stream_without_done(proxy: ProxyUnderTest) -> None:
    data = stream_bytes(proxy, body(emulator={"fault": "midstream-error"}))
    assert not data.endswith(b"data: [DONE]\n\n")
    last = [e for e in data.split(b"\n\n") if e.startswith(b"data: ")][-1]
    assert b'"error"' in last
    (rec,) = proxy.records(1)
    assert rec["error_code"] is not None and rec["done"] is False


def test_total_deadline(proxy_server: Any) -> None:
    proxy = proxy_server(upstream_extra="  total_timeout_s: 0.5")
    began = time.monotonic()
    response = post(proxy, body(emulator={"first_byte_delay_ms": 3000}))
    assert response.status_code == 504 and time.monotonic() - began < 3
    data = stream_bytes(proxy, body(emulator={"fault": "stall"}))
    assert b"[DONE]" not in data and b'"error"' in data


BREAKER = """
retries:
  max_attempts: 1
breaker:
  min_requests: 3
  failure_rate: 0.5
  open_s: 30
"""


def test_breaker_opens_and_traffic_goes_straight_to_the_fallback(proxy_server: Any, emulator_app: Any) -> None:
    proxy = proxy_server(extra=BREAKER, router=FixedRouter({"emulator/error-502": ("openai/gpt-4o-mini",)}))
    for _ in range(3):
        assert post(proxy, body("emulator/error-502")).status_code == 200
    upstream = UpstreamLog(emulator_app)
    assert post(proxy, body("emulator/error-502")).status_code == 200
    assert [r.model for r in upstream.wait(1)] == ["openai/gpt-4o-mini"]
    rec = proxy.records(4)[-1]
    assert rec["extra"]["attempts"][0] == {"model": "emulator/error-502", "error": "circuit_open"}
    snapshot = proxy.app.runtime.breakers.snapshot() if proxy.app.runtime else {}
    assert snapshot["emulator/error-502"]["state"] == "open"


def test_open_breaker_without_fallback_fails_fast_with_503(proxy_server: Any, emulator_app: Any) -> None:
    proxy = proxy_server(extra=BREAKER)
    for _ in range(3):
        assert post(proxy, body("emulator/error-500")).status_code == 500
    upstream = UpstreamLog(emulator_app)
    response = post(proxy, body("emulator/error-500"))
    assert response.status_code == 503 and response.json()["error"]["code"] == "circuit_open"
    assert upstream.sent() == []


def test_404s_one_caller_provokes_do_not_open_the_shared_breaker(proxy_server: Any, emulator_app: Any) -> None:
    """OpenRouter answers 404 to what one caller asked (``provider.only`` naming no live
    provider, say): those still go to the next model, but must not shut the model off for
    every other tenant."""
    proxy = proxy_server(extra=BREAKER)
    for _ in range(6):
        assert post(proxy, body(emulator={"fault": "error-404"})).status_code == 404
    assert proxy.app.runtime is not None
    assert proxy.app.runtime.breakers.state("openai/gpt-4o-mini") == "closed"
    assert post(proxy, body()).status_code == 200


def test_connection_reset_before_any_byte_is_retried(proxy_server: Any, emulator: Any) -> None:
    from .faultnet import FaultNet

    with FaultNet("127.0.0.1", emulator.port, reset_first=2) as net:
        proxy = proxy_server(upstream_url=f"{net.url}/api/v1")
        for stream in (False, True):
            net.script(reset_first=2)
            if stream:
                assert stream_bytes(proxy, body()).endswith(b"data: [DONE]\n\n")
            else:
                assert post(proxy, body()).status_code == 200
            assert net.actions[-3:] == ["reset", "reset", "forward"]
        records = proxy.records(2)
        assert [[a["error"] for a in r["extra"]["attempts"][:2]] for r in records] == [["upstream_unreachable"] * 2] * 2


def test_a_silent_provider_is_left_for_the_next_model(proxy_server: Any, emulator_app: Any) -> None:
    router = FixedRouter({"openai/gpt-4o": ("openai/gpt-4o-mini",)})
    proxy = proxy_server(router=router, upstream_extra="  first_byte_timeout_s: 0.3")
    upstream = UpstreamLog(emulator_app)
    began = time.monotonic()
    response = post(proxy, body("openai/gpt-4o", emulator={"faults": {"openai/gpt-4o": {"fault": "black-hole"}}}))
    assert response.status_code == 200 and response.json()["model"] == "openai/gpt-4o-mini"
    assert time.monotonic() - began < 2
    sent = upstream.wait(2)
    silent = next(r for r in sent if r.requested_model == "openai/gpt-4o")
    assert silent.cancelled is True  # the abandoned attempt was hung up on, not left running
    assert proxy.records(1)[0]["extra"]["attempts"][0]["error"] == "upstream_timeout"


def test_a_model_down_for_a_while_trips_the_breaker_and_recovers(proxy_server: Any, emulator_app: Any) -> None:
    extra = BREAKER.replace("open_s: 30", "open_s: 0.5")
    proxy = proxy_server(extra=extra, router=FixedRouter({"openai/gpt-4o": ("openai/gpt-4o-mini",)}))
    key = uuid.uuid4().hex
    script = {"faults": {"openai/gpt-4o": {"fault": "error-502", "fail_for_ms": 800, "fault_key": key}}}
    answered = [post(proxy, body("openai/gpt-4o", emulator=script)).json()["model"] for _ in range(5)]
    assert answered == ["openai/gpt-4o-mini"] * 5  # every client call succeeded
    assert proxy.app.runtime is not None
    assert proxy.app.runtime.breakers.state("openai/gpt-4o") == "open"
    time.sleep(1.0)  # the model is healthy again and the breaker half-opens
    assert post(proxy, body("openai/gpt-4o", emulator=script)).json()["model"] == "openai/gpt-4o"
    assert proxy.app.runtime.breakers.state("openai/gpt-4o") == "closed"


def test_client_hang_up_stops_the_upstream_stream_within_100_ms(proxy: ProxyUnderTest, emulator_app: Any) -> None:
    upstream = UpstreamLog(emulator_app)
    with httpx.stream(
        "POST",
        f"{proxy.base_url}/chat/completions",
        headers=AUTH,
        timeout=10,
        json=body(stream=True, emulator={"fault": "stall", "stall_after": 2}),
    ) as response:
        for chunk in response.iter_raw():
            if b"data: {" in chunk:
                break
        hung_up = time.monotonic()
    (stream,) = upstream.wait(1)
    assert stream.cancelled is True
    assert stream.ended - hung_up < 0.1
    (rec,) = proxy.records(1)
    assert rec["cancelled"] is True and rec["extra"]["estimated"] is True
    assert rec["prompt_tokens"] > 0


def test_upstream_pacing_queues_bursts_and_bounds_the_queue(proxy_server: Any, emulator_app: Any) -> None:
    import asyncio

    pacing = "limits:\n  pacing:\n    requests_per_s: 2\n    burst: 1\n    max_waiters: 2\n    max_wait_s: 0.8\n"
    proxy = proxy_server(extra=pacing)

    async def main() -> list[int]:
        async with httpx.AsyncClient(base_url=proxy.base_url, headers=AUTH, timeout=10) as client:
            responses = await asyncio.gather(*(client.post("/chat/completions", json=body()) for _ in range(6)))
        return sorted(r.status_code for r in responses)

    upstream = UpstreamLog(emulator_app)
    statuses = asyncio.run(main())
    # one slot at once, two queued within 0.8 s at 2/s; the rest are told to come back (503, retryable)
    assert statuses.count(200) in (2, 3) and set(statuses) <= {200, 503}
    assert len(upstream.wait(statuses.count(200))) == statuses.count(200)


async def _scripted_upstream(scope: Any, receive: Any, send: Any) -> None:
    """A tiny OpenRouter stand-in: model ``x/fails-first`` streams an error as its very first
    data event (a provider failing before its first token); any other model answers."""
    if scope["type"] != "http":
        return
    body = await read_body(receive, 1 << 20, None)
    model = orjson.loads(body)["model"]
    head = {"id": "gen-1", "object": "chat.completion.chunk", "created": 1, "model": model, "provider": "P"}
    if model == "x/fails-first":
        error = {"code": 502, "message": "Provider returned error", "metadata": {"error_type": "provider_unavailable"}}
        events = [
            {**head, "error": error, "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}]}
        ]
    else:
        events = [
            {**head, "choices": [{"index": 0, "delta": {"content": "hi", "role": "assistant"}, "finish_reason": None}]},
            {
                **head,
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4, "cost": 0.000001},
            },
        ]
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    payload = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    await send({"type": "http.response.body", "body": payload, "more_body": False})


def test_a_provider_error_before_the_first_token_falls_back(proxy_server: Any, serve: Any) -> None:
    upstream = serve(_scripted_upstream, lifespan="off")
    router = FixedRouter({"x/fails-first": ("x/answers",)})
    proxy = proxy_server(upstream_url=f"{upstream.url}/api/v1", router=router, extra="retries:\n  max_attempts: 1\n")
    data = stream_bytes(proxy, body("x/fails-first"))
    assert b'"error"' not in data  # nothing of the failed attempt reached the client
    assert b'"model":"x/answers"' in data and data.endswith(b"data: [DONE]\n\n")
    (rec,) = proxy.records(1)
    assert [a["model"] for a in rec["extra"]["attempts"]] == ["x/fails-first", "x/answers"]
    assert rec["routed_model"] == "x/answers" and rec["status"] == 200
