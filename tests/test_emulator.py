"""Tests of ``proxy.emulator``: wire fidelity to the shared fixtures, faults, controls, records.

In-process tests drive the ASGI app directly (``drive``: sees every ASGI message, can hang up
on cue) or through ``httpx.ASGITransport`` (buffers bodies).  Timing, disconnects, cuts and the
official ``openai`` SDK use a real uvicorn (uvloop + httptools) in a thread (``served``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import pytest_asyncio
import uvicorn
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

import proxy.emulator as emulator_pkg
from proxy.emulator import FIXTURES_DIR, EmulatedRequest, Emulator, create_app
from proxy.emulator.fixtures import split_events
from proxy.emulator.wire import js_number

SHARED = Path(__file__).resolve().parents[2] / "shared" / "openrouter" / "fixtures"
REFERENCE = SHARED if SHARED.is_dir() else FIXTURES_DIR
KEY = "sk-or-v1-emulator-test-key"
AUTH = {"authorization": f"Bearer {KEY}"}
USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER_TOOL: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    },
}
ALL_FIXTURES = sorted(
    p.relative_to(REFERENCE).as_posix() for p in REFERENCE.rglob("*") if p.suffix in {".json", ".sse"}
)


# ---------------------------------------------------------------- helpers


@dataclass
class Captured:
    """Everything the app sent for one request."""

    status: int
    headers: dict[str, str]
    messages: list[bytes] = field(default_factory=list)
    """Body of each ``http.response.body`` message, in order."""
    completed: bool = False

    @property
    def body(self) -> bytes:
        return b"".join(self.messages)

    def json(self) -> Any:
        return orjson.loads(self.body)


async def drive(
    app: Emulator,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    *,
    hang_up_after: int | None = None,
) -> Captured:
    """Run one HTTP request through the ASGI app; optionally disconnect after N body messages."""
    path, _, query = path.partition("?")
    raw = orjson.dumps(body) if body is not None and not isinstance(body, bytes) else (body or b"")
    all_headers = {**AUTH, "content-type": "application/json", **(headers or {})}
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(k.encode(), v.encode()) for k, v in all_headers.items()],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 80),
    }
    captured = Captured(0, {})
    gone = asyncio.Event()
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        if message["type"] == "http.response.start":
            captured.status = message["status"]
            captured.headers = {k.decode(): v.decode() for k, v in message["headers"]}
            return
        if gone.is_set():
            return  # like uvicorn: writes after a disconnect are dropped
        captured.messages.append(message.get("body", b""))
        if not message.get("more_body", False):
            captured.completed = True
            gone.set()
        elif hang_up_after is not None and len(captured.messages) >= hang_up_after:
            gone.set()

    await app(scope, receive, send)
    return captured


def chat(**body: Any) -> dict[str, Any]:
    return {"model": "openai/gpt-4o-mini", "messages": USER, **body}


def data_events(raw: bytes) -> list[Any]:
    """Parsed JSON of every ``data:`` event except ``[DONE]``."""
    return [orjson.loads(e[6:]) for e in split_events(raw) if e.startswith(b"data: {")]


def shape(value: Any) -> Any:
    """Key order and value kinds of a JSON value (lists: first element only)."""
    if isinstance(value, dict):
        return [(k, shape(v)) for k, v in value.items()]
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    if value is None or isinstance(value, bool | str):
        return type(value).__name__
    return "number"


def reference_json(name: str) -> Any:
    return orjson.loads((REFERENCE / name).read_bytes())


def reference_events(name: str) -> list[Any]:
    return data_events((REFERENCE / name).read_bytes())


def exact(raw: bytes) -> Any:
    """JSON with numbers as ``Decimal`` (no float rounding)."""
    return json.loads(raw, parse_float=Decimal, parse_int=Decimal)


def prices() -> dict[str, tuple[Decimal, Decimal]]:
    models = orjson.loads((FIXTURES_DIR.parent / "models.json").read_bytes())["data"]
    return {m["id"]: (Decimal(m["pricing"]["prompt"]), Decimal(m["pricing"]["completion"])) for m in models}


class Server:
    """uvicorn (uvloop + httptools, or ``http``) serving an emulator on 127.0.0.1:<free port> in a thread."""

    def __init__(self, app: Emulator, http: str = "httptools") -> None:
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}/api/v1"
        config = uvicorn.Config(app, log_config=None, access_log=False, loop="uvloop", http=http)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()

    def wait_for(self, predicate: Any, timeout: float = 3.0) -> EmulatedRequest:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                snapshot = list(self.app.requests)  # appended to by the server thread
            except RuntimeError:
                continue
            found = [r for r in snapshot if predicate(r)]
            if found:
                return found[-1]
            time.sleep(0.01)
        raise AssertionError(f"no matching request in {list(self.app.requests)}")


# ---------------------------------------------------------------- fixtures


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
    running = Server(create_app(fixtures_dir=REFERENCE, api_key=KEY))
    yield running
    running.stop()


@pytest.fixture
def served(server: Server) -> Server:
    server.app.reset()
    return server


@pytest.fixture
def sdk(served: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=served.base_url, api_key=KEY, max_retries=0, timeout=10) as c:
        yield c


# ---------------------------------------------------------------- package surface and data


def test_public_surface() -> None:
    assert sorted(emulator_pkg.__all__) == ["EmulatedRequest", "Emulator", "FIXTURES_DIR", "create_app"]
    assert isinstance(create_app(), Emulator)


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared fixtures not present")
@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_bundled_fixtures_are_exact_copies(name: str) -> None:
    assert (FIXTURES_DIR / name).read_bytes() == (SHARED / name).read_bytes()


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("0.0000075", "0.0000075"),
        ("0.000001", "0.000001"),
        ("9E-7", "9e-7"),
        ("1.5E-8", "1.5e-8"),
        ("0", "0"),
        ("100", "100"),
        ("25.750", "25.75"),
        ("-0.000669", "-0.000669"),
        ("1E+21", "1e+21"),
        ("123456789012345678901", "123456789012345680000"),
        ("0.1000000000000000055511151231257827", "0.1"),
    ],
)
def test_js_number_matches_javascript(value: str, text: str) -> None:
    assert js_number(Decimal(value)) == text


# ---------------------------------------------------------------- fixture replay


@pytest.mark.asyncio
@pytest.mark.parametrize("name", ALL_FIXTURES)
async def test_fixture_replayed_byte_for_byte(app: Emulator, name: str) -> None:
    expected = (REFERENCE / name).read_bytes()
    got = await drive(app, "POST", "/api/v1/chat/completions", chat(emulator={"fixture": name}))
    assert got.body == expected
    assert got.completed
    if name.endswith(".sse"):
        assert got.status == 200
        assert got.headers["content-type"] == "text/event-stream"
        assert got.headers["cache-control"] == "no-cache"
        assert got.headers["x-generation-id"].startswith("gen-")
        events = [m for m in got.messages if m]
        assert events == split_events(expected)  # one SSE event per ASGI message
        assert all(e.endswith(b"\n\n") for e in events)
    elif name.startswith("errors/"):
        assert got.status == int(name[7:10])
        assert got.headers["content-type"] == "application/json"
    else:
        assert got.status == 200


@pytest.mark.asyncio
async def test_error_fixture_headers_follow_errors_readme(app: Emulator) -> None:
    async def replay(name: str, **controls: Any) -> Captured:
        return await drive(app, "POST", "/api/v1/chat/completions", chat(emulator={"fixture": name, **controls}))

    limited = await replay("errors/429.json")
    assert (limited.headers["x-ratelimit-limit"], limited.headers["x-ratelimit-remaining"]) == ("50", "0")
    assert limited.headers["x-ratelimit-reset"] == "1787356800000"
    assert "retry-after" not in limited.headers
    assert (await replay("errors/429.json", retry_after=7)).headers["retry-after"] == "7"
    assert (await replay("errors/503.json")).headers["retry-after"] == "30"
    assert (await replay("errors/502.json")).headers["x-generation-id"].startswith("gen-")
    for got in (limited, await replay("errors/401.json")):
        assert got.headers["access-control-expose-headers"] == "X-Generation-Id,X-Provider-Name,cf-ray"
        assert got.headers["vary"] == "Accept-Encoding"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "name", ["../models.json", "errors/../models.json", "a/b.sse", "errors/errors/429.json", "nope.sse"]
)
async def test_bad_fixture_names_are_rejected(app: Emulator, name: str) -> None:
    got = await drive(app, "POST", "/api/v1/chat/completions", chat(emulator={"fixture": name}))
    assert got.status == 400
    assert got.json()["error"]["code"] == 400


@pytest.mark.asyncio
async def test_fixture_needs_fixtures_dir() -> None:
    got = await drive(create_app(), "POST", "/api/v1/chat/completions", chat(emulator={"fixture": "key.json"}))
    assert got.status == 400
    assert "fixtures_dir" in got.json()["error"]["message"]


# ---------------------------------------------------------------- generated bodies and streams


@pytest.mark.asyncio
async def test_completion_has_fixture_shape_and_headers(client: httpx.AsyncClient) -> None:
    response = await client.post("/chat/completions", json=chat())
    assert response.status_code == 200
    body = response.json()
    assert shape(body) == shape(reference_json("completion_basic.json"))
    assert body["id"] == response.headers["x-generation-id"]
    assert body["id"].startswith("gen-") and len(body["id"].rsplit("-", 1)[1]) == 20
    assert body["choices"][0]["message"]["content"].startswith("You said: What is the capital")
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-provider-name"] == "OpenAI"
    assert response.headers["vary"] == "Accept-Encoding"
    assert response.headers["access-control-expose-headers"] == "X-Generation-Id,X-Provider-Name,cf-ray"


@pytest.mark.asyncio
async def test_tool_call_completion_has_fixture_shape(client: httpx.AsyncClient) -> None:
    response = await client.post("/chat/completions", json=chat(tools=[WEATHER_TOOL]))
    body = response.json()
    assert shape(body) == shape(reference_json("completion_tool_call.json"))
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    call = choice["message"]["tool_calls"][0]
    assert call["index"] == 0 and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "example", "unit": "celsius"}


@pytest.mark.asyncio
async def test_tool_choice_rules(client: httpx.AsyncClient) -> None:
    other = {"type": "function", "function": {"name": "lookup"}}
    named = {"type": "function", "function": {"name": "lookup"}}
    picked = (await client.post("/chat/completions", json=chat(tools=[WEATHER_TOOL, other], tool_choice=named))).json()
    assert picked["choices"][0]["message"]["tool_calls"][0]["function"] == {"name": "lookup", "arguments": "{}"}
    none = (await client.post("/chat/completions", json=chat(tools=[WEATHER_TOOL], tool_choice="none"))).json()
    assert none["choices"][0]["finish_reason"] == "stop"
    after_tool = [*USER, {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    answered = (await client.post("/chat/completions", json=chat(messages=after_tool, tools=[WEATHER_TOOL]))).json()
    assert answered["choices"][0]["finish_reason"] == "stop"
    unknown = {"type": "function", "function": {"name": "nope"}}
    bad = await client.post("/chat/completions", json=chat(tools=[WEATHER_TOOL], tool_choice=unknown))
    assert bad.status_code == 400


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("usage_shape", "fixture"),
    [("repeat_finish", "stream_basic.sse"), ("empty_choices", "stream_basic_usage_empty_choices.sse")],
)
async def test_stream_matches_fixture_form(app: Emulator, usage_shape: str, fixture: str) -> None:
    got = await drive(app, "POST", "/api/v1/chat/completions", chat(stream=True, emulator={"usage_shape": usage_shape}))
    assert got.status == 200
    assert got.headers["content-type"] == "text/event-stream"
    assert got.headers["cache-control"] == "no-cache"
    events = [m for m in got.messages if m]
    reference = split_events((REFERENCE / fixture).read_bytes())
    assert events[:2] == reference[:2] == [b": OPENROUTER PROCESSING\n\n"] * 2
    assert events[-1] == reference[-1] == b"data: [DONE]\n\n"
    ours, theirs = data_events(got.body), reference_events(fixture)
    for index in (0, 1, -2, -1):  # first (empty) delta, content delta, finish chunk, usage chunk
        assert shape(ours[index]) == shape(theirs[index])
    assert all(e["id"] == got.headers["x-generation-id"] for e in ours)
    deltas = ours[:-2]
    assert all(e["choices"][0]["delta"]["role"] == "assistant" for e in ours[:-1])
    assert all(e["choices"][0]["finish_reason"] is None for e in deltas)
    assert len(deltas) == 1 + 10  # the empty first delta + completion_tokens (default 10)
    assert ours[-1]["usage"]["completion_tokens"] == 10


@pytest.mark.asyncio
async def test_stream_usage_shape_2025(app: Emulator) -> None:
    got = await drive(
        app, "POST", "/api/v1/chat/completions", chat(stream=True, emulator={"usage_shape": "separate_2025"})
    )
    usage_chunk = data_events(got.body)[-1]
    assert usage_chunk["choices"] == [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "finish_reason": None,
            "native_finish_reason": None,
            "logprobs": None,
        }
    ]
    assert usage_chunk["usage"]["total_tokens"] > 0


@pytest.mark.asyncio
async def test_stream_tool_call_matches_fixture_form(app: Emulator) -> None:
    body = chat(
        stream=True, model="anthropic/claude-haiku-4.5", tools=[WEATHER_TOOL], stream_options={"include_usage": False}
    )
    got = await drive(app, "POST", "/api/v1/chat/completions", body)
    ours, theirs = data_events(got.body), reference_events("stream_tool_call.sse")
    assert shape(ours[1]) == shape(theirs[1])  # first fragment: id, type, name, arguments ""
    assert shape(ours[2]) == shape(theirs[2])  # argument fragment
    assert shape(ours[-1]["usage"]) == shape(theirs[-1]["usage"])  # sent despite include_usage false
    assert ours[-1]["choices"] == ours[-2]["choices"]  # 2026 form: the finish choice repeated
    assert ours[1]["choices"][0]["delta"]["content"] is None
    arguments = "".join(e["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"] for e in ours[1:-2])
    assert json.loads(arguments) == {"city": "example", "unit": "celsius"}
    assert ours[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert ours[-2]["choices"][0]["native_finish_reason"] == "tool_use"


@pytest.mark.asyncio
async def test_stream_reasoning_matches_fixture_form(app: Emulator) -> None:
    body = chat(stream=True, model="anthropic/claude-sonnet-4.5", reasoning={"effort": "low"})
    got = await drive(app, "POST", "/api/v1/chat/completions", body)
    ours, theirs = data_events(got.body), reference_events("stream_reasoning.sse")
    assert shape(ours[0]) == shape(theirs[0])  # reasoning delta with reasoning_details text
    assert shape(ours[3]) == shape(theirs[3])  # signature-only details delta
    events = [m for m in got.messages if m]
    first_data = next(i for i, e in enumerate(events) if e.startswith(b"data:"))
    assert b": OPENROUTER PROCESSING\n\n" in events[first_data:]  # comment between data events
    assert ours[-1]["usage"]["completion_tokens_details"]["reasoning_tokens"] > 0


@pytest.mark.asyncio
async def test_reasoning_switches(client: httpx.AsyncClient) -> None:
    async def message(**body: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        answer = (await client.post("/chat/completions", json=chat(**body))).json()
        return answer["choices"][0]["message"], answer["usage"]

    sonnet = "anthropic/claude-sonnet-4.5"
    shown, usage = await message(model=sonnet, include_reasoning=True)
    assert shown["reasoning"] and shown["reasoning_details"][0]["type"] == "reasoning.text"
    assert usage["completion_tokens_details"]["reasoning_tokens"] > 0
    hidden, usage = await message(model=sonnet, reasoning={"exclude": True})
    assert hidden["reasoning"] is None and usage["completion_tokens_details"]["reasoning_tokens"] > 0
    assert (await message(model=sonnet))[0]["reasoning"] is None
    assert (await message(model="openai/gpt-4o-mini", reasoning={}))[0]["reasoning"] is None  # not capable
    assert (await message(model="openai/gpt-4o-mini:thinking"))[0]["reasoning"]
    assert (await message(model="qwen/qwen3-8b"))[0]["reasoning"]  # default_enabled
    assert (await message(model="qwen/qwen3-8b", reasoning={"enabled": False}))[0]["reasoning"] is None


@pytest.mark.asyncio
async def test_length_controls(client: httpx.AsyncClient) -> None:
    long = (await client.post("/chat/completions", json=chat(emulator={"completion_tokens": 2000}))).json()
    assert long["usage"]["completion_tokens"] == 2000
    capped = (await client.post("/chat/completions", json=chat(max_tokens=5))).json()
    assert capped["choices"][0]["finish_reason"] == "length"
    assert capped["usage"]["completion_tokens"] == 5
    capped = (await client.post("/chat/completions", json=chat(max_completion_tokens=3, max_tokens=50))).json()
    assert capped["usage"]["completion_tokens"] == 3
    headers = {"x-emulator-completion-tokens": "4"}
    via_header = (
        await client.post("/chat/completions", json=chat(emulator={"completion_tokens": 9}), headers=headers)
    ).json()
    assert via_header["usage"]["completion_tokens"] == 4  # header wins


# ---------------------------------------------------------------- cost


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "model",
    [
        "openai/gpt-4o-mini",
        "openai/gpt-4o",
        "anthropic/claude-haiku-4.5",
        "anthropic/claude-sonnet-4.5",
        "openai/gpt-4.1-nano",
        "meta-llama/llama-3.1-8b-instruct",
    ],
)
async def test_cost_is_tokens_times_price_exactly(client: httpx.AsyncClient, model: str) -> None:
    prompt_price, completion_price = prices()[model]
    for stream in (False, True):
        response = await client.post("/chat/completions", json=chat(model=model, stream=stream))
        raw = response.content if not stream else split_events(response.content)[-2][6:]
        usage = exact(raw)["usage"]
        prompt_cost = usage["prompt_tokens"] * prompt_price
        completion_cost = usage["completion_tokens"] * completion_price
        details = usage["cost_details"]
        assert details["upstream_inference_prompt_cost"] == prompt_cost
        assert details["upstream_inference_completions_cost"] == completion_cost
        assert usage["cost"] == details["upstream_inference_cost"] == prompt_cost + completion_cost
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        printed = raw.split(b'"cost":', 1)[1].split(b",", 1)[0].decode()
        assert printed == js_number(prompt_cost + completion_cost)
        assert b"e-0" not in raw  # never Python's 7.5e-06
        if prompt_cost + completion_cost >= Decimal("0.000001"):
            assert "e" not in printed


@pytest.mark.asyncio
async def test_cost_of_fixture_example_prints_positionally(client: httpx.AsyncClient) -> None:
    # stream_basic.sse: 14 prompt + 9 completion tokens of gpt-4o-mini cost 0.0000075
    messages = [{"role": "user", "content": "x" * 40}]  # ceil(40/4) + 4 = 14 prompt tokens
    response = await client.post("/chat/completions", json=chat(messages=messages, emulator={"completion_tokens": 9}))
    assert b'"cost":0.0000075,' in response.content
    assert b'"upstream_inference_prompt_cost":0.0000021,' in response.content


@pytest.mark.asyncio
async def test_free_variant_costs_nothing(client: httpx.AsyncClient) -> None:
    body = (await client.post("/chat/completions", json=chat(model="meta-llama/llama-3.3-70b-instruct:free"))).json()
    assert body["usage"]["cost"] == 0
    assert body["provider"] == "DeepInfra"


# ---------------------------------------------------------------- models, routing, fallback


@pytest.mark.asyncio
async def test_variants_and_unknown_models(client: httpx.AsyncClient) -> None:
    nitro = (await client.post("/chat/completions", json=chat(model="openai/gpt-4o-mini:nitro"))).json()
    plain = (await client.post("/chat/completions", json=chat())).json()
    assert nitro["model"] == "openai/gpt-4o-mini:nitro"
    assert nitro["usage"]["cost"] == plain["usage"]["cost"]
    for model in ("openai/gpt-4o-mini:free", "nope/unknown", "openai/gpt-4o-mini:bogus", "emulator/no-such-fault"):
        response = await client.post("/chat/completions", json=chat(model=model))
        assert response.status_code == 400
        assert response.json() == {"error": {"message": f"{model} is not a valid model ID", "code": 400}}


@pytest.mark.asyncio
async def test_models_fallback_list(client: httpx.AsyncClient, app: Emulator) -> None:
    body = chat(model="emulator/error-502", models=["nope/unknown", "anthropic/claude-haiku-4.5"])
    response = await client.post("/chat/completions", json=body)
    assert response.status_code == 200
    assert response.json()["model"] == "anthropic/claude-haiku-4.5"
    assert response.json()["provider"] == "Anthropic"
    assert app.requests[-1].model == "anthropic/claude-haiku-4.5"
    all_down = await client.post(
        "/chat/completions", json=chat(model="emulator/error-429", models=["emulator/error-503"])
    )
    assert all_down.status_code == 503  # the last model's error
    assert all_down.headers["retry-after"] == "30"
    assert app.requests[-1].fault == "error-503"
    fault_model = await client.post(
        "/chat/completions", json=chat(model="emulator/midstream-error", models=["openai/gpt-4o"])
    )
    assert fault_model.json()["choices"][0]["finish_reason"] == "error"  # answered (faults after output)


@pytest.mark.asyncio
async def test_models_endpoint(client: httpx.AsyncClient) -> None:
    listing = (await client.get("/models", headers={"authorization": ""})).json()  # public route
    assert list(listing) == ["data", "total_count", "links"]
    assert listing["links"] == {"next": None}
    assert listing["total_count"] == len(listing["data"])
    assert listing["data"][:4] == reference_json("models.json")["data"]
    ids = {m["id"] for m in listing["data"]}
    assert {"openai/gpt-4o-mini", "openai/gpt-4o", "anthropic/claude-haiku-4.5", "anthropic/claude-sonnet-4.5"} <= ids
    template = list(reference_json("models.json")["data"][3])  # qwen3-8b has every optional key
    for model in listing["data"]:
        keys = list(model)
        assert keys == [k for k in template if k in keys]
        assert keys[:15] == template[:15]
    sonnet = next(m for m in listing["data"] if m["id"] == "anthropic/claude-sonnet-4.5")
    assert (sonnet["pricing"]["prompt"], sonnet["pricing"]["completion"]) == ("0.000003", "0.000015")
    assert "reasoning" in sonnet["supported_parameters"]


@pytest.mark.asyncio
async def test_model_endpoints(client: httpx.AsyncClient) -> None:
    fixture = reference_json("model_endpoints.json")
    assert (await client.get("/models/meta-llama/llama-3.1-8b-instruct/endpoints")).json() == fixture
    composed = (await client.get("/models/anthropic/claude-4.5-sonnet-20250929/endpoints")).json()
    assert list(composed["data"]) == list(fixture["data"])
    assert list(composed["data"]["endpoints"][0]) == list(fixture["data"]["endpoints"][0])
    assert composed["data"]["endpoints"][0]["pricing"]["completion"] == "0.000015"
    missing = await client.get("/models/nope/unknown/endpoints")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == 404


@pytest.mark.asyncio
async def test_generation_key_credits(client: httpx.AsyncClient) -> None:
    headers = {"user-agent": "OpenAI/Python 1.99.0", "http-referer": "https://example.test"}
    response = await client.post("/chat/completions", json=chat(), headers=headers)
    usage = response.json()["usage"]
    record = await client.get("/generation", params={"id": response.headers["x-generation-id"]})
    data = record.json()["data"]
    assert list(data) == list(reference_json("generation.json")["data"])
    assert (data["tokens_prompt"], data["tokens_completion"]) == (usage["prompt_tokens"], usage["completion_tokens"])
    assert data["total_cost"] == data["usage"] == usage["cost"]
    assert (data["model"], data["streamed"], data["cancelled"]) == ("openai/gpt-4o-mini", False, False)
    assert (data["user_agent"], data["http_referer"]) == ("OpenAI/Python 1.99.0", "https://example.test")
    unknown = await client.get("/generation", params={"id": "gen-1-doesnotexist"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == 404
    assert (await client.get("/generation")).status_code == 400
    assert (await client.get("/key")).json() == reference_json("key.json")
    assert (await client.get("/credits")).json() == reference_json("credits.json")


@pytest.mark.asyncio
async def test_unknown_routes_and_bad_requests(client: httpx.AsyncClient) -> None:
    for method, path in (("GET", "/nope"), ("GET", "/chat/completions"), ("POST", "/models")):
        response = await client.request(method, path)
        assert response.status_code == 404
        assert response.json() == {"error": {"message": "Not Found", "code": 404}}
    missing = await client.post("/chat/completions", json={"model": "openai/gpt-4o-mini"})
    assert missing.status_code == 400
    assert missing.json()["error"]["message"] == 'Input required: specify "prompt" or "messages"'
    assert (await client.post("/chat/completions", content=b"{nope")).status_code == 400
    for controls in ({"fault": "explode"}, {"chunk_delay_ms": -1}, {"unknown": 1}, {"completion_tokens": 1.5}):
        response = await client.post("/chat/completions", json=chat(emulator=controls))
        assert response.status_code == 400, controls
    assert (await client.post("/chat/completions", json=chat(max_tokens=0))).status_code == 400


# ---------------------------------------------------------------- auth and records


@pytest.mark.asyncio
async def test_auth() -> None:
    keyed, open_ = create_app(api_key=KEY), create_app()
    for app, headers, message in (
        (keyed, {"authorization": ""}, "No cookie auth credentials found"),
        (keyed, {"authorization": "Bearer sk-or-v1-wrong"}, "User not found."),
        (open_, {"authorization": ""}, "No cookie auth credentials found"),
        (open_, {"authorization": "Basic abc"}, "No cookie auth credentials found"),
    ):
        for path in ("/api/v1/chat/completions", "/api/v1/key", "/api/v1/credits", "/api/v1/generation?id=x"):
            got = await drive(app, "POST" if "chat" in path else "GET", path, chat(), headers)
            assert got.status == 401
            assert got.json() == {"error": {"message": message, "code": 401}}
    assert (
        await drive(open_, "POST", "/api/v1/chat/completions", chat(), {"authorization": "Bearer anything"})
    ).status == 200
    assert (await drive(keyed, "GET", "/api/v1/models", None, {"authorization": ""})).status == 200


@pytest.mark.asyncio
async def test_requests_are_recorded(client: httpx.AsyncClient, app: Emulator) -> None:
    headers = {"http-referer": "https://example.test/app", "x-title": "proxy-tests"}
    await client.post("/chat/completions", json=chat(stream=True), headers=headers)
    record = app.requests[-1]
    assert (record.path, record.model, record.stream, record.status) == (
        "/api/v1/chat/completions",
        "openai/gpt-4o-mini",
        True,
        200,
    )
    assert (record.fault, record.cancelled) == (None, False)
    assert record.headers["authorization"] == "<redacted>"
    assert record.headers["http-referer"] == "https://example.test/app"
    assert record.headers["x-title"] == "proxy-tests"
    assert record.generation_id and record.generation_id.startswith("gen-")
    listed = (await client.get("http://emulator/_emulator/requests")).json()
    assert listed[-1]["generation_id"] == record.generation_id
    assert listed[-1]["headers"]["authorization"] == "<redacted>"
    assert all(not r["path"].startswith("/_emulator") for r in listed)
    await client.post("http://emulator/_emulator/reset")
    assert len(app.requests) == 0
    assert app.requests.maxlen == 1000


@pytest.mark.asyncio
async def test_lifespan(app: Emulator) -> None:
    inbox = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[Any] = []

    async def receive() -> Any:
        return inbox.pop(0)

    async def send(message: Any) -> None:
        sent.append(message)

    await app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    assert sent == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]


# ---------------------------------------------------------------- faults


ERROR_CASES = [
    ("error-400", 400, "errors/400_context_length.json"),
    ("error-401", 401, "errors/401.json"),
    ("error-402", 402, "errors/402.json"),
    ("error-403", 403, "errors/403_moderation.json"),
    ("error-404", 404, "errors/404_no_endpoints.json"),
    ("error-408", 408, "errors/408.json"),
    ("error-429", 429, "errors/429.json"),
    ("error-500", 500, None),
    ("error-502", 502, "errors/502.json"),
    ("error-503", 503, "errors/503.json"),
]


@pytest.mark.asyncio
@pytest.mark.parametrize(("fault", "status", "fixture"), ERROR_CASES)
async def test_error_faults(client: httpx.AsyncClient, fault: str, status: int, fixture: str | None) -> None:
    for stream in (False, True):
        response = await client.post("/chat/completions", json=chat(stream=stream, emulator={"fault": fault}))
        assert response.status_code == status
        assert response.headers["content-type"] == "application/json"
        body = response.json()
        if fixture is None:
            assert body == {
                "error": {"message": "Internal Server Error", "code": 500, "metadata": {"error_type": "server"}}
            }
        else:
            assert list(body) == list(reference_json(fixture))
            assert body == reference_json(fixture)
        assert ("x-ratelimit-reset" in response.headers) == (status == 429)
        assert response.headers.get("retry-after") == ("30" if status == 503 else None)
        assert ("x-generation-id" in response.headers) == (status == 502)


@pytest.mark.asyncio
async def test_error_fault_by_header_and_retry_after(client: httpx.AsyncClient, app: Emulator) -> None:
    headers = {"x-emulator-fault": "error-429", "x-emulator-retry-after": "12"}
    response = await client.post("/chat/completions", json=chat(), headers=headers)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "12"
    assert response.headers["x-ratelimit-limit"] == "50"
    assert app.requests[-1].fault == "error-429" and app.requests[-1].status == 429
    by_model = await client.post("/chat/completions", json=chat(model="emulator/error-403"))
    assert by_model.status_code == 403


@pytest.mark.asyncio
async def test_fail_times(client: httpx.AsyncClient, app: Emulator) -> None:
    controls = {"fault": "error-502", "fail_times": 2, "fault_key": "k1"}
    statuses = [(await client.post("/chat/completions", json=chat(emulator=controls))).status_code for _ in range(4)]
    assert statuses == [502, 502, 200, 200]
    assert [r.fault for r in app.requests] == ["error-502", "error-502", None, None]
    other_key = await client.post("/chat/completions", json=chat(emulator={**controls, "fault_key": "k2"}))
    assert other_key.status_code == 502
    once = {"fail_times": 1}
    by_model = [
        (await client.post("/chat/completions", json=chat(model="emulator/error-503", emulator=once))).status_code
        for _ in range(2)
    ]
    assert by_model == [503, 200]


@pytest.mark.asyncio
async def test_midstream_error(app: Emulator) -> None:
    got = await drive(app, "POST", "/api/v1/chat/completions", chat(stream=True, emulator={"fault": "midstream-error"}))
    assert got.status == 200
    events = [m for m in got.messages if m]
    assert events[-1] == b"data: [DONE]\n\n"
    error_event = orjson.loads(events[-2][6:])
    reference = reference_events("stream_midstream_error.sse")[-1]
    assert shape(error_event) == shape(reference)
    assert error_event["error"] == reference["error"]
    assert error_event["choices"][0]["finish_reason"] == "error"
    content = [e for e in data_events(got.body)[:-1] if e["choices"][0]["delta"].get("content")]
    assert 1 <= len(content) < 10
    record = app.generations.get(got.headers["x-generation-id"])
    assert record is not None and record.finish_reason == "error"
    plain = await drive(app, "POST", "/api/v1/chat/completions", chat(emulator={"fault": "midstream-error"}))
    choice = plain.json()["choices"][0]
    assert choice["finish_reason"] == "error"
    assert choice["error"]["metadata"]["error_type"] == "provider_unavailable"


@pytest.mark.asyncio
async def test_no_done_and_malformed(app: Emulator) -> None:
    no_done = await drive(app, "POST", "/api/v1/chat/completions", chat(stream=True, emulator={"fault": "no-done"}))
    assert no_done.completed
    assert b"[DONE]" not in no_done.body
    assert "usage" in data_events(no_done.body)[-1]
    bad = await drive(app, "POST", "/api/v1/chat/completions", chat(stream=True, emulator={"fault": "malformed"}))
    events = [e for e in split_events(bad.body) if e.startswith(b"data: {")]
    broken = []
    for event in events:
        try:
            orjson.loads(event[6:])
        except orjson.JSONDecodeError:
            broken.append(event)
    assert len(broken) == 1 and broken[0].endswith(b"\n\n")
    assert events.index(broken[0]) not in (0, len(events) - 1)
    assert bad.body.endswith(b"data: [DONE]\n\n")
    plain = await drive(app, "POST", "/api/v1/chat/completions", chat(emulator={"fault": "malformed"}))
    assert plain.status == 200
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(plain.body)


@pytest.mark.asyncio
async def test_cut_raises_inside_the_app(app: Emulator) -> None:
    with pytest.raises(RuntimeError, match="emulated connection cut"):
        await drive(app, "POST", "/api/v1/chat/completions", chat(stream=True, emulator={"fault": "cut"}))
    record = app.requests[-1]
    assert (record.fault, record.status, record.cancelled) == ("cut", 200, True)


@pytest.mark.asyncio
async def test_disconnect_mid_stream_is_recorded(app: Emulator) -> None:
    body = chat(stream=True, emulator={"chunk_delay_ms": 5, "completion_tokens": 50})
    got = await drive(app, "POST", "/api/v1/chat/completions", body, hang_up_after=5)
    assert not got.completed and len(got.messages) == 5
    record = app.requests[-1]
    assert record.cancelled and record.stream and record.status == 200
    generation = app.generations.get(got.headers["x-generation-id"])
    assert generation is not None and generation.cancelled and generation.streamed


@pytest.mark.asyncio
async def test_first_byte_delay(app: Emulator) -> None:
    started = time.perf_counter()
    got = await drive(app, "POST", "/api/v1/chat/completions", chat(emulator={"first_byte_delay_ms": 60}))
    assert got.status == 200 and time.perf_counter() - started >= 0.06


# ---------------------------------------------------------------- real server: timing, disconnects, SDK


def test_chunk_delay_spacing_is_observable(served: Server) -> None:
    body = chat(stream=True, emulator={"chunk_delay_ms": 40, "completion_tokens": 3, "keepalive_comments": 1})
    arrivals: list[float] = []
    with (
        httpx.Client(headers=AUTH, timeout=5) as http,
        http.stream("POST", f"{served.base_url}/chat/completions", json=body) as response,
    ):
        assert response.headers["content-type"] == "text/event-stream"
        buffer = b""
        for chunk in response.iter_raw():
            buffer += chunk
            while b"\n\n" in buffer:
                _, buffer = buffer.split(b"\n\n", 1)
                arrivals.append(time.perf_counter())
    assert len(arrivals) == 1 + 1 + 3 + 2 + 1  # comment, first delta, 3 pieces, finish, usage, [DONE]
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert min(gaps) >= 0.03, gaps


def test_slow_first_token_sends_head_and_comments_first(served: Server) -> None:
    controls = {"fault": "slow-first-token", "first_token_delay_ms": 300, "keepalive_interval_ms": 100}
    started = time.perf_counter()
    with (
        httpx.Client(headers=AUTH, timeout=5) as http,
        http.stream(
            "POST", f"{served.base_url}/chat/completions", json=chat(stream=True, emulator=controls)
        ) as response,
    ):
        head_at = time.perf_counter() - started
        lines = []
        for line in response.iter_lines():
            if line:
                lines.append((time.perf_counter() - started, line))
    assert head_at < 0.2
    comments = [t for t, line in lines if line.startswith(":")]
    first_data = next(t for t, line in lines if line.startswith("data:"))
    assert comments[0] < 0.2 and first_data >= 0.3
    assert len(comments) >= 4  # 2 up front + repeats every 100 ms while waiting
    assert lines[-1][1] == "data: [DONE]"


def test_stall_then_client_gives_up(served: Server) -> None:
    body = chat(stream=True, emulator={"fault": "stall"})
    with httpx.Client(headers=AUTH, timeout=httpx.Timeout(5, read=0.3)) as http:
        seen: list[str] = []
        with (
            pytest.raises(httpx.ReadTimeout),
            http.stream("POST", f"{served.base_url}/chat/completions", json=body) as response,
        ):
            seen.extend(line for line in response.iter_lines() if line)
    assert any(line.startswith("data:") for line in seen)
    assert "data: [DONE]" not in seen
    record = served.wait_for(lambda r: r.fault == "stall")
    assert record.cancelled and record.status == 200


def test_cut_aborts_the_chunked_body(served: Server) -> None:
    with httpx.Client(headers=AUTH, timeout=5) as http:
        with (
            pytest.raises(httpx.RemoteProtocolError),
            http.stream(
                "POST", f"{served.base_url}/chat/completions", json=chat(stream=True, emulator={"fault": "cut"})
            ) as response,
        ):
            assert response.status_code == 200
            for _ in response.iter_raw():
                pass
        after = http.post(f"{served.base_url}/chat/completions", json=chat())  # server still fine
        assert after.status_code == 200


def test_client_disconnect_is_recorded(served: Server) -> None:
    body = chat(stream=True, emulator={"chunk_delay_ms": 50, "completion_tokens": 100})
    with (
        httpx.Client(headers=AUTH, timeout=5) as http,
        http.stream("POST", f"{served.base_url}/chat/completions", json=body) as response,
    ):
        gid = response.headers["x-generation-id"]
        for index, _ in enumerate(response.iter_lines()):
            if index > 5:
                break
    record = served.wait_for(lambda r: r.generation_id == gid and r.cancelled)
    assert record.stream
    generation = served.app.generations.get(gid)
    assert generation is not None and generation.cancelled
    listed = httpx.get(served.base_url.replace("/api/v1", "/_emulator/requests")).json()
    assert any(r["generation_id"] == gid and r["cancelled"] for r in listed)


def test_openai_sdk_parses_plain_stream(sdk: openai.OpenAI, served: Server) -> None:
    stream = sdk.chat.completions.create(
        model="openai/gpt-4o-mini",
        messages=[{"role": "user", "content": "Tell me a story"}],
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"HTTP-Referer": "https://example.test", "X-Title": "sdk-test"},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("You said: Tell me a story.")
    assert chunks[-1].usage is not None
    usage = chunks[-1].usage.model_dump()
    assert usage["cost"] > 0 and usage["is_byok"] is False
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-2:] == ["stop", "stop"]
    record = served.wait_for(lambda r: r.headers.get("x-title") == "sdk-test")
    assert record.headers["http-referer"] == "https://example.test"


def test_openai_sdk_parses_tool_call_stream(sdk: openai.OpenAI) -> None:
    stream = sdk.chat.completions.create(
        model="anthropic/claude-haiku-4.5",
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER_TOOL],
        stream=True,
    )
    name, arguments, finish = "", "", None
    for chunk in stream:
        if not chunk.choices:
            continue
        for call in chunk.choices[0].delta.tool_calls or []:
            assert call.function is not None
            name += call.function.name or ""
            arguments += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert (name, json.loads(arguments), finish) == (
        "get_weather",
        {"city": "example", "unit": "celsius"},
        "tool_calls",
    )
    completion = sdk.chat.completions.create(
        model="anthropic/claude-haiku-4.5",
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER_TOOL],
    )
    calls = completion.choices[0].message.tool_calls
    assert calls and calls[0].type == "function" and calls[0].function.name == "get_weather"


def test_openai_sdk_parses_reasoning_stream(sdk: openai.OpenAI) -> None:
    stream = sdk.chat.completions.create(
        model="anthropic/claude-sonnet-4.5",
        messages=[{"role": "user", "content": "What is 2+2?"}],
        stream=True,
        extra_body={"reasoning": {"max_tokens": 1000}},
    )
    reasoning, content, usage = "", "", None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
        if chunk.choices:
            delta = chunk.choices[0].delta.model_dump()
            reasoning += delta.get("reasoning") or ""
            content += delta.get("content") or ""
    assert reasoning.startswith("Considering the request about What")
    assert content.startswith("You said: What is 2+2?")
    assert usage is not None and usage["completion_tokens_details"]["reasoning_tokens"] > 0
    assert Decimal(str(usage["cost"])) > 0


def test_openai_sdk_sees_errors(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.APIError, match="Provider disconnected unexpectedly"):
        for _ in sdk.chat.completions.create(
            model="emulator/midstream-error",
            messages=USER,
            stream=True,
        ):
            pass
    with pytest.raises(openai.RateLimitError) as caught:
        sdk.chat.completions.create(
            model="openai/gpt-4o-mini", messages=USER, extra_body={"emulator": {"fault": "error-429"}}
        )
    assert caught.value.response.headers["x-ratelimit-remaining"] == "0"
    wrong = openai.OpenAI(base_url=str(sdk.base_url), api_key="sk-or-v1-wrong", max_retries=0)
    with wrong, pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="openai/gpt-4o-mini", messages=USER)
