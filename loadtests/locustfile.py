"""Realistic mixed traffic through the proxy, for locust.

Each simulated app picks a key, a model, a prompt size and an answer length per request;
half the calls stream. Some keys are over their limits (their 429s are the limiter doing
its job: counted as successes, as "expected 429"); with the emulator upstream, some calls
ask for upstream faults (a transient 502 the proxy should retry away, a persistent 502, a
stream that breaks off with an in-band error), each checked for the behaviour the README
promises. Streamed answers are read to the end; time to first token is reported as its
own row (``SSE ttft``).

Configuration, all from the environment (a real deployment needs only the first two)::

    LOAD_KEYS          comma-separated virtual keys for normal traffic (required)
    LOAD_LIMITED_KEYS  keys whose tier is meant to be exceeded (optional)
    LOAD_MODELS        models to ask for (default: a mix of aliases and OpenRouter ids)
    LOAD_EMULATOR      1 (default): send emulator controls (answer length, faults);
                       0 against real OpenRouter: no controls, no fault tasks
    LOAD_MAX_TOKENS    max_tokens of each request against a real upstream (default 16)

Run headless, bounded in time, against a deployment::

    LOAD_KEYS=sk-proxy-a,sk-proxy-b LOAD_EMULATOR=0 .venv/bin/locust -f loadtests/locustfile.py \\
        --headless --host https://llm-gateway.internal -u 10 -r 2 --run-time 60s

or against a local stack that ``run_locust.py`` starts (emulator, Redis, proxy).
"""

from __future__ import annotations

import os
import random
import time
import uuid
from collections import Counter
from typing import Any

from locust import HttpUser, between, events, task
from locust.env import Environment

KEYS = [k for k in os.environ.get("LOAD_KEYS", "").split(",") if k]
LIMITED_KEYS = [k for k in os.environ.get("LOAD_LIMITED_KEYS", "").split(",") if k]
MODELS = [
    m
    for m in os.environ.get(
        "LOAD_MODELS", "gpt-4o-mini,openai/gpt-4o-mini,claude-haiku,llama-70b,qwen/qwen3-8b,fast"
    ).split(",")
    if m
]
EMULATOR = os.environ.get("LOAD_EMULATOR", "1") != "0"
MAX_TOKENS = int(os.environ.get("LOAD_MAX_TOKENS", "16"))
PATH = "/v1/chat/completions"

PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about load balancers. " * 4,
    "Summarise these meeting notes in three bullet points: " + "The team discussed the roadmap. " * 120,
    "Review this code for bugs:\n" + "def f(x):\n    return x * 2  # doubles x\n" * 300,
)
ANSWER_TOKENS = (5, 20, 60, 200, 800)

OUTCOMES: Counter[str] = Counter()


def _body(stream: bool, controls: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": random.choice(MODELS),
        "messages": [{"role": "user", "content": random.choice(PROMPTS)}],
        "stream": stream,
    }
    if EMULATOR:
        body["emulator"] = {"completion_tokens": random.choice(ANSWER_TOKENS), **(controls or {})}
    else:
        body["max_tokens"] = MAX_TOKENS
    return body


class App(HttpUser):
    """One application calling the gateway with its own key."""

    wait_time = between(0.05, 0.5)

    def on_start(self) -> None:
        if not KEYS:
            raise RuntimeError("set LOAD_KEYS to comma-separated virtual keys")
        self.key = random.choice(KEYS)

    def _headers(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.key}", "x-request-id": uuid.uuid4().hex}

    @task(10)
    def chat(self) -> None:
        with self.client.post(
            PATH, json=_body(False), headers=self._headers(), name="chat", catch_response=True
        ) as response:
            if response.status_code == 200 and response.json().get("choices"):
                response.success()
            else:
                response.failure(f"status {response.status_code}: {response.text[:200]}")

    @task(10)
    def chat_stream(self) -> None:
        self._stream(_body(True), "chat stream", expect_done=True)

    @task(3)
    def over_limit(self) -> None:
        """A key of a tight tier: 429 is the limiter working, 200 while under the limit."""
        if not LIMITED_KEYS:
            return
        key = random.choice(LIMITED_KEYS)
        with self.client.post(
            PATH, json=_body(False), headers=self._headers(key), name="limited key", catch_response=True
        ) as response:
            if response.status_code == 429:
                OUTCOMES["limited: 429 (expected)"] += 1
                if "retry-after" not in response.headers and "x-ratelimit-reset-requests" not in response.headers:
                    OUTCOMES["limited: 429 without Retry-After"] += 1
                response.success()
            elif response.status_code == 200:
                OUTCOMES["limited: admitted"] += 1
                response.success()
            else:
                response.failure(f"status {response.status_code}: {response.text[:200]}")

    @task(1)
    def transient_fault(self) -> None:
        """The upstream fails once with 502; the proxy retries and the app sees 200."""
        if not EMULATOR:
            return
        controls = {"fault": "error-502", "fail_times": 1, "fault_key": uuid.uuid4().hex}
        with self.client.post(
            PATH, json=_body(False, controls), headers=self._headers(), name="fault: 502 once", catch_response=True
        ) as response:
            if response.status_code == 200:
                OUTCOMES["502 once: retried to 200"] += 1
                response.success()
            else:
                response.failure(f"a single 502 reached the app: {response.status_code}")

    @task(1)
    def persistent_fault(self) -> None:
        """The upstream always fails: 502 to the app (or 200 from a fallback model), fast."""
        if not EMULATOR:
            return
        controls = {"fault": "error-502"}
        with self.client.post(
            PATH, json=_body(False, controls), headers=self._headers(), name="fault: 502 always", catch_response=True
        ) as response:
            if response.status_code in (200, 502, 503):
                OUTCOMES[f"502 always: {response.status_code}"] += 1
                response.success()
            else:
                response.failure(f"status {response.status_code}: {response.text[:200]}")

    @task(1)
    def midstream_error(self) -> None:
        """The stream breaks off: one in-band error event and no [DONE]."""
        if EMULATOR:
            self._stream(_body(True, {"fault": "midstream-error"}), "fault: midstream error", expect_done=False)

    def _stream(self, body: dict[str, Any], name: str, *, expect_done: bool) -> None:
        start = time.perf_counter()
        ttft: float | None = None
        done = error_event = False
        with self.client.post(
            PATH, json=body, headers=self._headers(), name=name, stream=True, catch_response=True
        ) as response:
            if response.status_code != 200:
                response.failure(f"status {response.status_code}: {response.text[:200]}")
                return
            for line in response.iter_lines():
                if line.startswith(b"data: {"):
                    if ttft is None:
                        ttft = time.perf_counter() - start
                    error_event = error_event or b'"error":{' in line or b'"finish_reason":"error"' in line
                elif line == b"data: [DONE]":
                    done = True
            if expect_done and not done:
                response.failure("stream ended without [DONE]")
            elif not expect_done and (done or not error_event):
                response.failure("a broken stream must end with an error event and no [DONE]")
            else:
                response.success()
        if ttft is not None:
            events.request.fire(  # type: ignore[no-untyped-call]
                request_type="SSE",
                name="ttft",
                response_time=ttft * 1000,
                response_length=0,
                exception=None,
                context={},
            )


@events.test_stop.add_listener  # type: ignore[untyped-decorator]
def _summary(environment: Environment, **_: Any) -> None:
    stats = environment.stats.total
    print("\n== load test summary ==")
    print(f"requests {stats.num_requests}, failures {stats.num_failures}, {stats.total_rps:.1f} req/s")
    p50, p99 = stats.get_response_time_percentile(0.5), stats.get_response_time_percentile(0.99)
    print(f"latency p50 {p50:.0f} ms, p99 {p99:.0f} ms")
    ttft = environment.stats.get("ttft", "SSE")
    if ttft.num_requests:
        print(
            f"time to first token p50 {ttft.get_response_time_percentile(0.5):.0f} ms, "
            f"p99 {ttft.get_response_time_percentile(0.99):.0f} ms"
        )
    for outcome, count in sorted(OUTCOMES.items()):
        print(f"  {outcome}: {count}")
    if stats.num_failures:
        environment.process_exit_code = 1
