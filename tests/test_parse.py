from __future__ import annotations

import json

import orjson
import pytest

from proxy.errors import InvalidRequest
from proxy.parse import MAX_DEPTH, MAX_MODEL_ID, parse_chat_request

GOOD = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def body(**changes: object) -> bytes:
    data = {**GOOD, **changes}
    return orjson.dumps({k: v for k, v in data.items() if v is not ...})


def test_valid_request_keeps_every_field() -> None:
    raw = body(stream=True, provider={"order": ["openai"]}, reasoning={"effort": "low"}, custom_field=[1])
    call = parse_chat_request(raw)
    assert call.model == "openai/gpt-4o-mini" and call.stream is True
    assert call.body["provider"] == {"order": ["openai"]} and call.body["custom_field"] == [1]
    assert call.raw == raw


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (b"", None),
        (body(model=...), "model"),
        (body(model=""), "model"),
        (body(model=5), "model"),
        (body(messages=...), "messages"),
        (body(messages=[]), "messages"),
        (body(messages="hi"), "messages"),
        (body(messages=["hi"]), "messages[0]"),
        (body(messages=[{"role": "robot", "content": "x"}]), "messages[0].role"),
        (body(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
        (body(stream="yes"), "stream"),
        (body(max_tokens="10"), "max_tokens"),
        (body(max_tokens=0), "max_tokens"),
        (body(max_tokens=1.5), "max_tokens"),
        (body(temperature=3), "temperature"),
        (body(temperature=True), "temperature"),
        (body(top_p=-0.1), "top_p"),
        (body(n=0), "n"),
        (body(stop=["a", "b", "c", "d", "e"]), "stop"),
        (body(tools={"type": "function"}), "tools"),
        (body(response_format="json"), "response_format"),
        (body(models="openai/gpt-4o"), "models"),
    ],
)
def test_bad_input_is_400_with_param(raw: bytes, param: str | None) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_chat_request(raw)
    assert info.value.status == 400
    assert info.value.param == param
    assert info.value.message


def nested(levels: int, inner: object = 1) -> object:
    """``levels`` containers, arrays and objects alternating, around ``inner``."""
    value = inner
    for i in range(levels):
        value = [value] if i % 2 else {"k": value}
    return value


def test_nesting_up_to_the_limit_passes_and_deeper_is_400_naming_the_field() -> None:
    # the body is level 1, so a field may hold MAX_DEPTH - 1 levels
    assert parse_chat_request(body(transforms=nested(MAX_DEPTH - 1))).body["transforms"]
    with pytest.raises(InvalidRequest) as info:
        parse_chat_request(body(transforms=nested(MAX_DEPTH)))
    assert info.value.status == 400 and info.value.param == "transforms"
    assert str(MAX_DEPTH) in info.value.message
    deep = {**GOOD, "messages": [{"role": "user", "content": "x", "x": nested(300)}]}
    with pytest.raises(InvalidRequest) as info:  # orjson parses this deep, but cannot encode it again
        parse_chat_request(json.dumps(deep).encode())
    assert info.value.param == "messages"


def test_many_shallow_containers_pass() -> None:
    """More brackets than ``MAX_DEPTH`` (a long conversation, brackets inside strings) is not depth."""
    messages = [{"role": "user", "content": [{"type": "text", "text": "[{" * 50}]} for _ in range(300)]
    assert len(parse_chat_request(body(messages=messages)).body["messages"]) == 300


@pytest.mark.parametrize("field", ["model", "models"])
def test_a_model_id_longer_than_any_real_one_is_refused(field: str) -> None:
    long = "x/" + "y" * MAX_MODEL_ID
    body = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    body[field] = long if field == "model" else [long]
    with pytest.raises(InvalidRequest) as info:
        parse_chat_request(orjson.dumps(body))
    assert info.value.param == field
