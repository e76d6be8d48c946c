"""Tests of the emulator's resilience faults: schedules, per-model scripts, context length,
no-answer faults (``reset``, ``black-hole``), stall/cut positions, attempt records,
cancellation, and ``tests/faultnet.py``.

In-process tests use ``drive`` / ``httpx.ASGITransport`` from ``test_emulator``; sockets and
timing use real uvicorn servers (``Server``) and, for TCP resets, a ``FaultNet`` in front.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import orjson
import pytest
import pytest_asyncio

from proxy.emulator import EmulatedRequest, Emulator, create_app
from proxy.emulator.controls import ControlError, Controls, parse_controls
from proxy.emulator.schedule import FaultSchedule
from proxy.emulator.sender import EmulatedCut, EmulatedReset
from tests.faultnet import FaultNet
from tests.test_emulator import AUTH, KEY, REFERENCE, Server, chat, data_events, drive, reference_json

CHAT = "/api/v1/chat/completions"
MINI, HAIKU = "openai/gpt-4o-mini", "anthropic/claude-haiku-4.5"
SMALL, LARGE = "meta-llama/llama-3.3-70b-instruct:free", "openai/gpt-4.1-nano"  # 65 536 / 1 047 576 tokens


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def app() -> Emulator:
    return create_app(fixtures_dir=REFERENCE, api_key=KEY)


@pytest_asyncio.fixture
async def client(app: Emulator) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://emulator/api/v1", headers=AUTH) as c:
        yield c


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    running = Server(create_app(api_key=KEY))
    yield running
    running.stop()


@pytest.fixture
def served(server: Server) -> Server:
    server.app.reset()
    return server


def stream_lines(url: str, body: dict[str, Any], *, read: float = 5) -> list[str]:
    with (
        httpx.Client(headers=AUTH, timeout=httpx.Timeout(5, read=read)) as http,
        http.stream("POST", f"{url}/chat/completions", json=body) as response,
    ):
        return [line for line in response.iter_lines() if line]


# ---------------------------------------------------------------- schedules


def test_schedule_counts_times_patterns_and_windows() -> None:
    clock = FakeClock()
    schedule = FaultSchedule(clock)

    def run(controls: Controls, key: str, steps: int, step_ms: float = 0) -> list[bool]:
        seen = []
        for _ in range(steps):
            seen.append(schedule.applies(key, controls))
            clock.now += step_ms / 1000
        return seen

    assert run(Controls(fail_times=2), "t", 4) == [True, True, False, False]
    assert run(Controls(fail_pattern="1100"), "p", 6) == [True, True, False, False, True, True]
    assert run(Controls(fail_for_ms=250), "w", 5, step_ms=100) == [True, True, True, False, False]
    flapping = Controls(fail_for_ms=100, fail_period_ms=250)
    assert run(flapping, "f", 7, step_ms=62.5) == [True, True, False, False, True, True, False]
    assert run(Controls(fail_times=3, fail_pattern="01"), "both", 5) == [False, True, False, False, False]
    assert run(Controls(), "none", 2) == [True, True]  # no schedule: always, nothing counted
    assert schedule.attempts() == {"t": 4, "p": 6, "w": 5, "f": 7, "both": 5}


@pytest.mark.asyncio
async def test_fail_for_ms_is_down_then_healthy(client: httpx.AsyncClient, app: Emulator) -> None:
    controls = {"fault": "error-503", "fail_for_ms": 150, "fault_key": "down"}
    first = await client.post("/chat/completions", json=chat(emulator=controls))
    assert first.status_code == 503
    assert (await client.post("/chat/completions", json=chat(emulator=controls))).status_code == 503
    await asyncio.sleep(0.16)
    assert (await client.post("/chat/completions", json=chat(emulator=controls))).status_code == 200
    assert [r.fault for r in app.requests] == ["error-503", "error-503", None]
    listed = (await client.get("http://emulator/_emulator/attempts")).json()
    assert listed == {"down": 3}


@pytest.mark.asyncio
async def test_fail_pattern_flaps_per_attempt(client: httpx.AsyncClient) -> None:
    controls = {"fault": "error-502", "fail_pattern": "100"}
    statuses = [(await client.post("/chat/completions", json=chat(emulator=controls))).status_code for _ in range(6)]
    assert statuses == [502, 200, 200, 502, 200, 200]


# ---------------------------------------------------------------- per-model scripts


@pytest.mark.asyncio
async def test_faults_entry_scripts_one_model(client: httpx.AsyncClient, app: Emulator) -> None:
    script = {
        MINI: {"fault": "error-502", "fail_times": 1},
        HAIKU: {"fault": "error-429", "retry_after": 3},
    }

    async def ask(model: str, **controls: Any) -> httpx.Response:
        return await client.post("/chat/completions", json=chat(model=model, emulator={"faults": script, **controls}))

    assert [(await ask(MINI)).status_code for _ in range(3)] == [502, 200, 200]
    limited = await ask(HAIKU)
    assert (limited.status_code, limited.headers["retry-after"]) == (429, "3")
    assert (await ask("openai/gpt-4o")).status_code == 200  # no entry, no flat fault
    assert app.schedule.attempts() == {f"{MINI}:error-502": 3}
    # an entry naming a fault replaces the flat fault; other models keep the flat one
    assert (await ask(MINI, fault="error-500")).status_code == 200
    assert (await ask("openai/gpt-4o", fault="error-500")).status_code == 500
    record = app.requests[-1]
    assert (record.model, record.requested_model, record.fault) == ("openai/gpt-4o", "openai/gpt-4o", "error-500")


@pytest.mark.asyncio
async def test_faults_entry_merges_and_falls_back_within_models(client: httpx.AsyncClient, app: Emulator) -> None:
    script = {MINI: {"fault": "error-503"}, HAIKU: {"completion_tokens": 3}}
    body = chat(model=MINI, models=[HAIKU], emulator={"faults": script, "completion_tokens": 7})
    answered = await client.post("/chat/completions", json=body)
    assert answered.status_code == 200
    assert answered.json()["model"] == HAIKU
    assert answered.json()["usage"]["completion_tokens"] == 3  # the entry's value wins over the flat one
    record = app.requests[-1]
    assert (record.requested_model, record.model, record.fault) == (MINI, HAIKU, None)
    headers = {"x-emulator-faults": orjson.dumps({HAIKU: {"fault": "error-402"}}).decode()}
    by_header = await client.post("/chat/completions", json=chat(model=HAIKU), headers=headers)
    assert by_header.status_code == 402


@pytest.mark.asyncio
async def test_faults_entry_keeps_an_emulator_model_schedule(client: httpx.AsyncClient) -> None:
    script = {"emulator/error-502": {"fail_times": 1}}
    body = chat(model="emulator/error-502", emulator={"faults": script})
    assert [(await client.post("/chat/completions", json=body)).status_code for _ in range(2)] == [502, 200]


@pytest.mark.parametrize(
    "controls",
    [
        {"fail_period_ms": 100},
        {"fail_pattern": "12"},
        {"fail_pattern": ""},
        {"faults": []},
        {"faults": {MINI: "error-502"}},
        {"faults": {MINI: {"fixture": "key.json"}}},
        {"faults": {MINI: {"faults": {}}}},
        {"faults": {MINI: {"fault": "explode"}}},
        {"faults": {MINI: {"fail_period_ms": 10}}},
        {"stall_after": -1},
    ],
)
def test_bad_schedule_controls_are_rejected(controls: dict[str, Any]) -> None:
    with pytest.raises(ControlError):
        parse_controls(controls, {})


def test_for_model_defaults_the_counter_key() -> None:
    controls = parse_controls({"fault": "stall", "fail_times": 9, "faults": {MINI: {"fault": "cut"}}}, {})
    scoped = controls.for_model(MINI)
    assert (scoped.fault, scoped.fault_key, scoped.fail_times, scoped.faults) == ("cut", f"{MINI}:cut", None, {})
    assert controls.for_model(HAIKU) is controls
    keyed = parse_controls({"faults": {MINI: {"fault": "cut", "fault_key": "k"}}}, {}).for_model(MINI)
    assert keyed.fault_key == "k"


# ---------------------------------------------------------------- context length and other errors


@pytest.mark.asyncio
async def test_context_length_is_really_enforced(client: httpx.AsyncClient, app: Emulator) -> None:
    too_big = await client.post("/chat/completions", json=chat(model=SMALL, max_tokens=70_000))
    assert too_big.status_code == 400
    error = too_big.json()["error"]
    assert error["metadata"] == {"provider_name": None, "error_type": "context_length_exceeded"}
    assert error["message"].startswith("This endpoint's maximum context length is 65536 tokens. However, you ")
    assert "about 70012 tokens (12 of text input, 70000 in the output)" in error["message"]
    assert app.requests[-1].fault is None
    fits = await client.post("/chat/completions", json=chat(model=LARGE, max_tokens=70_000))
    assert fits.status_code == 200
    fallback = await client.post("/chat/completions", json=chat(model=SMALL, models=[LARGE], max_tokens=70_000))
    assert fallback.json()["model"] == LARGE
    long_prompt = [{"role": "user", "content": "x" * 4 * 66_000}]
    assert (await client.post("/chat/completions", json=chat(model=SMALL, messages=long_prompt))).status_code == 400


@pytest.mark.asyncio
async def test_extra_error_faults(client: httpx.AsyncClient) -> None:
    context = await client.post("/chat/completions", json=chat(emulator={"fault": "error-400-context"}))
    assert context.status_code == 400
    fixture = reference_json("errors/400_context_length.json")["error"]
    assert context.json()["error"]["message"] == fixture["message"]
    assert context.json()["error"]["metadata"]["error_type"] == "context_length_exceeded"
    for status, error_type in ((524, "timeout"), (529, "provider_overloaded")):
        response = await client.post("/chat/completions", json=chat(model=f"emulator/error-{status}"))
        assert response.status_code == status
        assert response.json()["error"]["code"] == status
        assert response.json()["error"]["metadata"]["error_type"] == error_type


# ---------------------------------------------------------------- stall and cut positions


@pytest.mark.asyncio
async def test_stall_after_and_cut_after_count_data_events(app: Emulator) -> None:
    for after in (0, 1, 3):
        body = chat(stream=True, emulator={"fault": "stall", "stall_after": after})
        got = await drive(app, "POST", CHAT, body, hang_up_after=2 + after)  # 2 comments first
        assert len(data_events(got.body)) == after and not got.completed
        record = app.requests[-1]
        assert (record.fault, record.data_events, record.cancelled) == ("stall", after, True)
    with pytest.raises(EmulatedCut):
        await drive(app, "POST", CHAT, chat(stream=True, emulator={"fault": "cut", "cut_after": 4}))
    assert app.requests[-1].data_events == 4
    everything = chat(stream=True, emulator={"fault": "stall", "stall_after": 999, "completion_tokens": 2})
    got = await drive(app, "POST", CHAT, everything, hang_up_after=2 + 5)
    assert b"[DONE]" not in got.body and "usage" in data_events(got.body)[-1]


@pytest.mark.asyncio
async def test_default_stall_follows_content(app: Emulator) -> None:
    got = await drive(app, "POST", CHAT, chat(stream=True, emulator={"fault": "stall"}), hang_up_after=7)
    contents = [e["choices"][0]["delta"]["content"] for e in data_events(got.body)]
    assert any(contents) and app.requests[-1].data_events == len(contents) < 13


def test_cut_after_zero_drops_the_connection_before_any_data(served: Server) -> None:
    lines: list[str] = []
    with pytest.raises(httpx.RemoteProtocolError):
        lines.extend(stream_lines(served.base_url, chat(stream=True, emulator={"fault": "cut", "cut_after": 0})))
    record = served.wait_for(lambda r: r.fault == "cut")
    assert (record.status, record.data_events) == (200, 0)


def test_slow_first_token_keeps_the_line_warm_by_default(served: Server) -> None:
    controls = {"fault": "slow-first-token", "first_token_delay_ms": 1100, "keepalive_comments": 0}
    started = time.monotonic()
    with (
        httpx.Client(headers=AUTH, timeout=5) as http,
        http.stream("POST", f"{served.base_url}/chat/completions", json=chat(stream=True, emulator=controls)) as r,
    ):
        timeline = [(time.monotonic() - started, line) for line in r.iter_lines() if line]
    first_data = next(t for t, line in timeline if line.startswith("data:"))
    comments = [t for t, line in timeline if line.startswith(":")]
    assert first_data >= 1.1
    assert len(comments) == 1 and 0.9 < comments[0] < first_data  # the default 1 s keep-alive


# ---------------------------------------------------------------- reset and black hole


@pytest.mark.asyncio
async def test_reset_raises_inside_the_app(app: Emulator) -> None:
    with pytest.raises(EmulatedReset):
        await drive(app, "POST", CHAT, chat(model="emulator/reset"))
    record = app.requests[-1]
    assert (record.fault, record.status, record.generation_id) == ("reset", 0, None)


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_reset_closes_without_a_byte_under_uvicorn(http: str) -> None:
    server = Server(create_app(api_key=KEY), http=http)
    try:
        with httpx.Client(headers=AUTH, timeout=5) as client:
            script = {"faults": {MINI: {"fault": "reset", "fail_times": 1}}}
            with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
                client.post(f"{server.base_url}/chat/completions", json=chat(stream=True, emulator=script))
            again = client.post(f"{server.base_url}/chat/completions", json=chat(stream=True, emulator=script))
            assert again.status_code == 200
        record = server.wait_for(lambda r: r.fault == "reset")
        assert (record.status, record.cancelled) == (0, False)
    finally:
        server.stop()


def test_black_hole_answers_nothing_and_sees_the_hang_up(served: Server) -> None:
    with (
        httpx.Client(headers=AUTH, timeout=httpx.Timeout(5, read=0.2)) as http,
        pytest.raises(httpx.ReadTimeout),
    ):
        http.post(f"{served.base_url}/chat/completions", json=chat(model="emulator/black-hole"))
    hung_up = time.monotonic()
    record = served.wait_for(lambda r: r.fault == "black-hole")
    assert (record.status, record.cancelled, record.data_events) == (0, True, 0)
    assert record.ended - hung_up < 0.1


# ---------------------------------------------------------------- records and cancellation


@pytest.mark.asyncio
async def test_records_carry_models_times_and_event_counts(client: httpx.AsyncClient, app: Emulator) -> None:
    before = time.monotonic()
    await client.post("/chat/completions", json=chat(stream=True, emulator={"completion_tokens": 4}))
    await client.post("/chat/completions", json=chat())
    streamed, plain = app.requests
    assert before <= streamed.started <= streamed.ended <= plain.started <= plain.ended <= time.monotonic()
    assert streamed.data_events == 1 + 4 + 2 + 1  # empty delta, 4 pieces, finish, usage, [DONE]
    assert (plain.data_events, plain.requested_model, plain.model) == (0, MINI, MINI)
    listed = (await client.get("http://emulator/_emulator/requests")).json()
    assert {"requested_model", "started", "ended", "data_events"} <= set(listed[0])


@pytest.mark.asyncio
async def test_hang_up_during_an_unpaced_stream_is_seen(app: Emulator) -> None:
    got = await drive(app, "POST", CHAT, chat(stream=True, emulator={"completion_tokens": 5000}), hang_up_after=40)
    record = app.requests[-1]
    assert record.cancelled and not got.completed
    assert 40 <= record.data_events < 40 + 2 * 32


def wait_hang_up(served: Server, body: dict[str, Any], lines_before_hang_up: int) -> tuple[EmulatedRequest, float]:
    """Read some lines of a stream, hang up; the record and the time of the hang-up."""
    with httpx.Client(headers=AUTH, timeout=5) as http:
        with http.stream("POST", f"{served.base_url}/chat/completions", json=body) as response:
            gid = response.headers["x-generation-id"]
            for index, _ in enumerate(response.iter_lines()):
                if index >= lines_before_hang_up:
                    break
        hung_up = time.monotonic()
    return served.wait_for(lambda r: r.generation_id == gid and r.cancelled), hung_up


def test_upstream_stops_within_100ms_of_a_hang_up(served: Server) -> None:
    unpaced = chat(stream=True, emulator={"completion_tokens": 100_000})
    record, hung_up = wait_hang_up(served, unpaced, 10)
    assert record.ended - hung_up < 0.1
    assert record.data_events < 100_000
    stalled = chat(stream=True, emulator={"fault": "stall", "stall_after": 2})
    record, hung_up = wait_hang_up(served, stalled, 3)
    assert record.ended - hung_up < 0.1 and record.data_events == 2


# ---------------------------------------------------------------- FaultNet


def test_faultnet_resets_then_forwards(served: Server) -> None:
    with FaultNet("127.0.0.1", served.port, reset_first=2) as net, httpx.Client(headers=AUTH, timeout=5) as http:
        url = f"{net.url}/api/v1/chat/completions"
        for _ in range(2):
            with pytest.raises(httpx.ReadError):
                http.post(url, json=chat())
        assert http.post(url, json=chat()).status_code == 200
        assert http.post(url, json=chat(stream=True)).status_code == 200  # same keep-alive connection
        net.script(reset_first=1)
        with pytest.raises(httpx.ReadError):  # a reused connection is reset too
            http.post(url, json=chat())
        assert net.actions == ["reset", "reset", "forward", "forward", "reset"]
    served.wait_for(lambda r: r.stream)
    assert len(served.app.requests) == 2  # the emulator saw only the forwarded requests


def test_faultnet_black_hole_then_forwards(served: Server) -> None:
    with FaultNet("127.0.0.1", served.port, black_hole_first=1) as net:
        with (
            httpx.Client(headers=AUTH, timeout=httpx.Timeout(5, read=0.2)) as http,
            pytest.raises(httpx.ReadTimeout),
        ):
            http.post(f"{net.url}/api/v1/chat/completions", json=chat())
        with httpx.Client(headers=AUTH, timeout=5) as http:
            assert http.post(f"{net.url}/api/v1/chat/completions", json=chat()).status_code == 200
        assert net.actions == ["black-hole", "forward"]


def test_faultnet_passes_hang_ups_and_cuts_through(served: Server) -> None:
    with FaultNet("127.0.0.1", served.port) as net:
        via = f"{net.url}/api/v1"
        stalled = chat(stream=True, emulator={"fault": "stall", "stall_after": 1})
        with pytest.raises(httpx.ReadTimeout):
            stream_lines(via, stalled, read=0.2)
        hung_up = time.monotonic()
        record = served.wait_for(lambda r: r.fault == "stall" and r.cancelled)
        assert record.ended - hung_up < 0.1
        with pytest.raises(httpx.RemoteProtocolError):
            stream_lines(via, chat(stream=True, emulator={"fault": "cut"}))
        with httpx.Client(headers=AUTH, timeout=5) as http:
            assert http.post(f"{via}/chat/completions", json=chat(stream=True)).status_code == 200
