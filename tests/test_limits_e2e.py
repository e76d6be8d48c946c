"""Limits and budgets through a running proxy (emulator upstream), as the OpenAI SDK sees them.

Every test runs against the in-memory store and a real redis-server.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import yaml

from .conftest import ALICE_KEY, BOB_KEY, ProxyUnderTest
from .limits_support import open_test_store, scraped

MESSAGES: Any = [{"role": "user", "content": "What is the capital of France?"}]
MINI = "openai/gpt-4o-mini"
MakeProxy = Callable[..., ProxyUnderTest]


@pytest.fixture
def limited(tmp_path: Path, proxy_server: MakeProxy, store_url: str | None) -> MakeProxy:
    """``limited(policy, **limits_settings)``: a proxy with ``policy`` as its limits.yaml."""

    def make(policy: dict[str, Any], **settings: Any) -> ProxyUnderTest:
        (tmp_path / "policies").mkdir(exist_ok=True)
        (tmp_path / "policies" / "limits.yaml").write_text(yaml.safe_dump(policy))
        settings.setdefault("store_timeout_ms", 5000)  # exactness here; timeouts: test_limits_store_down
        extra = {"limits": settings}
        if store_url is not None:
            extra["store"] = {"redis_url": store_url}
        open_test_store(store_url)  # flush Redis
        return proxy_server(extra=yaml.safe_dump(extra))

    return make


def eventually(probe: Callable[[], Any], timeout: float = 5.0) -> Any:
    """Poll ``probe`` until it returns something truthy (settlement runs after the response)."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.02)


def limits_by_name(proxy: ProxyUnderTest, key: str = ALICE_KEY) -> dict[str, dict[str, Any]]:
    return {limit["limit"]: limit for limit in own_limits(proxy, key)["limits"]}


def sdk(proxy: ProxyUnderTest, key: str = ALICE_KEY, retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.base_url, api_key=key, max_retries=retries, timeout=10)


def own_limits(proxy: ProxyUnderTest, key: str = ALICE_KEY) -> dict[str, Any]:
    response = httpx.get(f"{proxy.base_url}/limits", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


def test_admitted_responses_carry_openai_rate_limit_headers(limited: MakeProxy) -> None:
    proxy = limited({"default_tier": "t", "tiers": {"t": {"requests_per_day": 3, "tokens_per_minute": 10000}}})
    raw = sdk(proxy).chat.completions.with_raw_response.create(model=MINI, messages=MESSAGES, max_tokens=50)
    completion = raw.parse()
    assert completion.usage is not None
    headers = raw.headers
    assert (headers["x-ratelimit-limit-requests"], headers["x-ratelimit-remaining-requests"]) == ("3", "2")
    assert re.fullmatch(r"24h\d+m\d+s", headers["x-ratelimit-reset-requests"])
    assert headers["x-ratelimit-limit-tokens"] == "10000"
    reserved = 10000 - int(headers["x-ratelimit-remaining-tokens"])
    assert reserved > 50  # prompt estimate + max_tokens, before the answer
    assert re.fullmatch(r"1m\d+s|\d+(\.\d+)?s", headers["x-ratelimit-reset-tokens"])
    assert "x-proxy-degraded" not in headers
    # After the answer the reservation is corrected to the actual tokens.
    total = completion.usage.total_tokens
    limits = eventually(lambda: (s := limits_by_name(proxy))["tokens_per_minute"]["used"] == total and s)
    assert limits["tokens_per_minute"]["remaining"] == 10000 - total
    assert (limits["requests_per_day"]["used"], limits["requests_per_day"]["remaining"]) == (1, 2)


def test_a_fallback_model_s_own_limits_apply_when_the_request_moves_to_it(limited: MakeProxy) -> None:
    """gpt-4o allows 2 requests a minute; reaching it as the fallback of a failing model
    counts too (README: limits cover every model tried), and the third is a 429."""
    proxy = limited({"default_tier": "t", "tiers": {"t": {"models": {"openai/gpt-4o": {"requests_per_minute": 2}}}}})
    failing = {"emulator": {"faults": {MINI: {"fault": "error-404"}}}, "models": ["openai/gpt-4o"]}
    client = sdk(proxy)
    for _ in range(2):
        assert (
            client.chat.completions.create(model=MINI, messages=MESSAGES, extra_body=failing).model == "openai/gpt-4o"
        )
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model=MINI, messages=MESSAGES, extra_body=failing)
    assert "on model openai/gpt-4o" in info.value.message
    records = proxy.records(3)
    assert records[-1]["extra"]["attempts"][-1] == {
        "model": "openai/gpt-4o",
        "status": 429,
        "error": "rate_limit_exceeded",
    }
    per_model = eventually(lambda: [x for x in own_limits(proxy)["limits"] if x.get("model") == "openai/gpt-4o"])
    assert per_model and per_model[0]["used"] == 2
    assert client.chat.completions.create(model=MINI, messages=MESSAGES).model == MINI  # MINI itself is not limited


def test_the_429_an_sdk_sees(limited: MakeProxy) -> None:
    proxy = limited({"default_tier": "t", "tiers": {"t": {"requests_per_day": 2}}})
    client = sdk(proxy)
    for _ in range(2):
        client.chat.completions.create(model=MINI, messages=MESSAGES)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model=MINI, messages=MESSAGES)
    error = info.value
    assert error.status_code == 429 and error.code == "rate_limit_exceeded"
    assert error.type == "rate_limit_exceeded"
    assert "requests_per_day" in error.message and "key 'alice'" in error.message
    headers = error.response.headers
    assert 86_300 < int(headers["retry-after"]) <= 87_300
    assert abs(int(headers["retry-after-ms"]) / 1000 - int(headers["retry-after"])) < 1
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert "x-should-retry" not in headers
    body = orjson.loads(error.response.content)
    assert set(body["error"]) == {"message", "type", "param", "code"}
    # Bob has his own key limits.
    assert sdk(proxy, BOB_KEY).chat.completions.create(model=MINI, messages=MESSAGES).choices


def test_the_sdk_retry_waits_for_retry_after_ms(limited: MakeProxy, caplog: pytest.LogCaptureFixture) -> None:
    proxy = limited({"default_tier": "t", "tiers": {"t": {"requests_per_second": 2}}})
    client = sdk(proxy, retries=2)
    caplog.set_level("INFO", "openai._base_client")
    began = time.monotonic()
    for _ in range(3):
        assert client.chat.completions.create(model=MINI, messages=MESSAGES).choices
    elapsed = time.monotonic() - began
    waits = [float(m) for r in caplog.records for m in re.findall(r"Retrying request in ([\d.]+) seconds", r.message)]
    # The third call was refused until the first two left the 1 s window (10 buckets of
    # 100 ms): the SDK slept what retry-after-ms said, not its own 0.5 s back-off.
    assert len(waits) == 1 and 0.8 < waits[0] <= 1.1
    assert elapsed >= waits[0]
    statuses = [r["status"] for r in proxy.records(4)]
    assert statuses == [200, 200, 429, 200]


def test_a_spent_budget_is_final_and_the_sdk_does_not_retry(limited: MakeProxy) -> None:
    budget = 0.0002  # a call with max_tokens=100 reserves ~62 micro-USD and costs ~8
    proxy = limited({"default_tier": "t", "tiers": {"t": {"budget_usd_per_day": budget}}})
    client = sdk(proxy)
    spent, calls = 0.0, 0
    for _ in range(50):
        calls += 1
        try:
            completion = client.chat.completions.create(model=MINI, messages=MESSAGES, max_tokens=100)
        except openai.RateLimitError as exc:
            error = exc
            break
        assert completion.usage is not None
        spent += (completion.usage.model_extra or {})["cost"]
    else:
        pytest.fail("the budget never stopped the key")
    assert spent <= budget and spent > budget - 70e-6
    assert error.code == "insufficient_quota" and error.type == "insufficient_quota"
    assert error.response.headers["x-should-retry"] == "false"
    assert "budget_usd_per_day" in error.message
    budget_state = eventually(lambda: (b := own_limits(proxy)["budgets"][0])["reserved_usd"] == 0 and b)
    assert budget_state["spent_usd"] == pytest.approx(spent, abs=1e-7)
    assert budget_state["spent_usd"] <= budget
    # With retries on, the SDK still makes exactly one attempt.
    before = len(proxy.records(calls))
    began = time.monotonic()
    with pytest.raises(openai.RateLimitError):
        sdk(proxy, retries=3).chat.completions.create(model=MINI, messages=MESSAGES, max_tokens=100)
    assert time.monotonic() - began < 1.0
    assert len(proxy.records(before + 1)) == before + 1
    time.sleep(0.2)
    assert len(proxy.records()) == before + 1


def test_200_concurrent_requests_admit_exactly_the_limit(limited: MakeProxy) -> None:
    proxy = limited({"default_tier": "t", "tiers": {"t": {"requests_per_hour": 50}}})

    async def main() -> list[int]:
        client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key=ALICE_KEY, max_retries=0, timeout=30)

        async def one() -> int:
            try:
                await client.chat.completions.create(model=MINI, messages=MESSAGES)
            except openai.RateLimitError:
                return 429
            return 200

        try:
            return await asyncio.gather(*(one() for _ in range(200)))
        finally:
            await client.close()

    statuses = asyncio.run(main())
    assert (statuses.count(200), statuses.count(429)) == (50, 150)
    assert limits_by_name(proxy)["requests_per_hour"]["used"] == 50


def test_a_client_that_hangs_up_mid_stream_releases_its_slot_and_tokens(limited: MakeProxy) -> None:
    proxy = limited({"default_tier": "t", "tiers": {"t": {"concurrent_requests": 1, "tokens_per_minute": 5000}}})
    body = {"model": MINI, "messages": MESSAGES, "stream": True, "max_tokens": 200, "emulator": {"fault": "stall"}}
    headers = {"Authorization": f"Bearer {ALICE_KEY}"}
    with (
        httpx.Client(timeout=10) as http,
        http.stream("POST", f"{proxy.base_url}/chat/completions", json=body, headers=headers) as stream,
    ):
        assert stream.status_code == 200
        chunks = stream.iter_bytes()
        next(chunks)  # the stream is open and stalls upstream (keep the iterator: dropping it hangs up)
        reserved = limits_by_name(proxy)["tokens_per_minute"]["used"]
        assert reserved > 200  # prompt estimate + max_tokens
        assert limits_by_name(proxy)["concurrent_requests"]["used"] == 1
        with pytest.raises(openai.RateLimitError, match="concurrent"):
            sdk(proxy).chat.completions.create(model=MINI, messages=MESSAGES)
        chunks.close()
    # The client hung up: the pipeline settles at once; tokens drop to what was metered
    # for the partial answer (the pipeline's estimate), far below the reservation.
    limits = eventually(lambda: (s := limits_by_name(proxy))["concurrent_requests"]["used"] == 0 and s)
    assert limits, "the concurrency slot was not released"
    (record,) = proxy.records(2)[-1:]
    assert record["cancelled"] is True
    assert limits["tokens_per_minute"]["used"] == (record["total_tokens"] or 0) < reserved
    assert sdk(proxy).chat.completions.create(model=MINI, messages=MESSAGES).choices


def test_two_proxies_sharing_one_redis_are_exact_together(
    tmp_path: Path, proxy_server: MakeProxy, redis_url: str
) -> None:
    budget = 0.0002  # a call reserves ~62 micro-USD (max_tokens=100) and costs ~8
    policy = {
        "teams": {"research": "requests", "web": "money"},  # alice is in research, bob in web
        "tiers": {"requests": {"requests_per_hour": 60}, "money": {"budget_usd_per_day": budget}},
    }
    (tmp_path / "policies").mkdir(exist_ok=True)
    (tmp_path / "policies" / "limits.yaml").write_text(yaml.safe_dump(policy))
    open_test_store(redis_url)
    extra = yaml.safe_dump({"store": {"redis_url": redis_url}, "limits": {"store_timeout_ms": 5000}})
    replicas = [proxy_server(extra=extra), proxy_server(extra=extra)]
    assert replicas[0].app is not replicas[1].app

    async def wave(key: str, per_replica: int) -> list[tuple[int, str, float]]:
        """``per_replica`` concurrent calls at each replica: ``(replica, outcome, cost)``."""
        clients = [openai.AsyncOpenAI(base_url=p.base_url, api_key=key, max_retries=0) for p in replicas]

        async def one(i: int) -> tuple[int, str, float]:
            try:
                done = await clients[i].chat.completions.create(model=MINI, messages=MESSAGES, max_tokens=100)
            except openai.RateLimitError as exc:
                return i, str(exc.code), 0.0
            assert done.usage is not None
            return i, "ok", (done.usage.model_extra or {})["cost"]

        try:
            return await asyncio.gather(*(one(i % 2) for i in range(2 * per_replica)))
        finally:
            for client in clients:
                await client.close()

    requests = asyncio.run(wave(ALICE_KEY, 100))
    admitted = [r for r in requests if r[1] == "ok"]
    # exact across both replicas; which replica wins the race for the 60 slots is not fixed
    assert len(admitted) == 60 and {i for i, _, _ in requests} == {0, 1}
    assert {outcome for _, outcome, _ in requests} == {"ok", "rate_limit_exceeded"}

    spent = 0.0
    for _ in range(20):  # waves until the team budget stops every call
        batch = asyncio.run(wave(BOB_KEY, 8))
        spent += sum(cost for _, _, cost in batch)
        assert spent <= budget
        if all(outcome == "insufficient_quota" for _, outcome, _ in batch):
            break
    assert budget - 70e-6 < spent <= budget


def test_two_proxies_with_leased_admission_never_pass_a_limit(
    tmp_path: Path, proxy_server: MakeProxy, redis_url: str
) -> None:
    limit = 600
    policy = {"teams": {"research": "team"}, "tiers": {"team": {"requests_per_hour": limit}}}
    (tmp_path / "policies").mkdir(exist_ok=True)
    (tmp_path / "policies" / "limits.yaml").write_text(yaml.safe_dump(policy))
    open_test_store(redis_url)
    settings = {"store_timeout_ms": 5000, "admission": "leased", "replicas": 2}
    extra = yaml.safe_dump({"store": {"redis_url": redis_url}, "limits": settings})
    replicas = [proxy_server(extra=extra), proxy_server(extra=extra)]

    async def wave() -> list[int | None]:
        """20 concurrent calls at each replica: the remaining count each saw, or None (429)."""
        clients = [openai.AsyncOpenAI(base_url=p.base_url, api_key=ALICE_KEY, max_retries=0) for p in replicas]

        async def one(i: int) -> int | None:
            try:
                raw = await clients[i].chat.completions.with_raw_response.create(model=MINI, messages=MESSAGES)
            except openai.RateLimitError as exc:
                assert exc.code == "rate_limit_exceeded"
                return None
            assert raw.parse().choices
            return int(raw.headers["x-ratelimit-remaining-requests"])

        try:
            return await asyncio.gather(*(one(i % 2) for i in range(40)))
        finally:
            for client in clients:
                await client.close()

    seen = [r for _ in range(20) for r in asyncio.run(wave())]
    admitted = [r for r in seen if r is not None]
    assert len(admitted) <= limit
    # other proxies' allotments may refuse a call, at most 1/(4 x replicas + 1) of the limit each
    assert len(admitted) >= limit - 2 * limit / 9
    assert all(0 <= r < limit for r in admitted)
    # once the allotments are returned (within about a second) the count is exact
    used = eventually(lambda: (u := limits_by_name(replicas[0])["requests_per_hour"]["used"]) == len(admitted) and u)
    assert used == len(admitted)
    local = [scraped(p, "openrouter_proxy_limits_local_admissions_total") for p in replicas]
    # an allotment (at least 50, at most a ninth of what is free) is granted only while
    # 9 x 50 calls stay free: local admissions stop near 150 + 61 used; the rest are exact
    assert all(n > 0 for n in local) and sum(local) < 220, local


def test_a_hang_up_while_a_fallback_s_limits_are_reserved_does_not_keep_its_slot(limited: MakeProxy) -> None:
    """The client hangs up while the store reserves the fallback's concurrency slot: the
    reservation still lands, and is settled with the request instead of being held until its
    lease runs out (the next request moving on to that model is admitted)."""
    proxy = limited({"default_tier": "t", "tiers": {"t": {"models": {"openai/gpt-4o": {"concurrent_requests": 1}}}}})
    assert proxy.app.runtime is not None
    admission = proxy.app.runtime.chat.admission
    real = admission.admit_fallback

    async def slow_store(*args: Any, **kwargs: Any) -> Any:
        ticket = await real(*args, **kwargs)
        await asyncio.sleep(1.0)  # the store's answer is on its way when the client hangs up
        return ticket

    failing = {"emulator": {"faults": {MINI: {"fault": "error-404"}}}, "models": ["openai/gpt-4o"]}
    body = {"model": MINI, "messages": MESSAGES, **failing}
    admission.admit_fallback = slow_store
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{proxy.base_url}/chat/completions",
            headers={"Authorization": f"Bearer {ALICE_KEY}"},
            json=body,
            timeout=0.3,
        )
    assert proxy.records(1)[0]["error_code"] == "client_disconnected"
    admission.admit_fallback = real
    concurrent = eventually(
        lambda: [x for x in own_limits(proxy)["limits"] if x["limit"] == "concurrent_requests" and x["used"] == 0]
    )
    assert concurrent, own_limits(proxy)
    assert (
        sdk(proxy).chat.completions.create(model=MINI, messages=MESSAGES, extra_body=failing).model == "openai/gpt-4o"
    )


def test_a_primary_model_s_token_window_is_not_charged_for_its_fallback_s_answer(limited: MakeProxy) -> None:
    """MINI fails over to gpt-4o: MINI's own tokens_per_minute keeps nothing of the request
    (its reservation is corrected to 0); the key's window and gpt-4o's own get the tokens."""
    proxy = limited(
        {
            "default_tier": "t",
            "tiers": {
                "t": {
                    "tokens_per_minute": 100000,
                    "models": {MINI: {"tokens_per_minute": 50000}, "openai/gpt-4o": {"tokens_per_minute": 50000}},
                }
            },
        }
    )
    failing = {"emulator": {"faults": {MINI: {"fault": "error-404"}}}, "models": ["openai/gpt-4o"]}
    completion = sdk(proxy).chat.completions.create(model=MINI, messages=MESSAGES, extra_body=failing)
    assert completion.model == "openai/gpt-4o" and completion.usage is not None
    total = completion.usage.total_tokens

    def used() -> dict[str | None, int]:
        limits = own_limits(proxy)["limits"]
        return {x.get("model"): x["used"] for x in limits if x["limit"] == "tokens_per_minute"}

    settled = eventually(lambda: (u := used()).get(None) == total and u)
    assert settled == {None: total, MINI: 0, "openai/gpt-4o": total}
