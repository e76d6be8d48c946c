"""Parse and validate a chat completion request body.

Checks what a gateway must know to be right (the JSON is an object, ``model`` and
``messages`` are present and well typed, the common sampling parameters have OpenAI's
types and ranges) and keeps everything else as the client sent it, so OpenRouter's
extensions (``provider``, ``models``, ``reasoning``, ``plugins`` ...) pass through
(openrouter-api.md §1). Every failure is ``InvalidRequest`` (400) naming the ``param``.
"""

from __future__ import annotations

from typing import Any

import orjson

from proxy.config import ServerSettings
from proxy.errors import InvalidRequest
from proxy.types import ChatCall

__all__ = ["NUMERIC_PARAMETERS", "check_caps", "parse_chat_request"]

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})

# name -> (integer only?, lower bound, upper bound); bounds None = unbounded
# Numeric parameters checked here: (integer only, lowest, highest; None: unbounded).
NUMERIC_PARAMETERS: dict[str, tuple[bool, float | None, float | None]] = {
    "max_tokens": (True, 1, None),
    "max_completion_tokens": (True, 1, None),
    "n": (True, 1, 128),
    "temperature": (False, 0, 2),
    "top_p": (False, 0, 1),
    "frequency_penalty": (False, -2, 2),
    "presence_penalty": (False, -2, 2),
    "seed": (True, None, None),
    "top_logprobs": (True, 0, 20),
}
# JSON nesting a body may have: orjson (which re-encodes rewritten bodies, cache keys and log
# lines) encodes at most 254 levels, and the lines that embed a body add a few of their own.
MAX_DEPTH = 128
MAX_MODEL_ID = 256  # characters of a model id (OpenRouter's are well under 100)
_OBJECTS = ("response_format", "provider", "reasoning", "stream_options", "metadata", "logit_bias")
_LISTS = ("tools", "plugins")


def parse_chat_request(raw: bytes) -> ChatCall:
    """Validate ``raw`` (the request body) and return the ``ChatCall``.

    Raises ``InvalidRequest`` for malformed JSON, a non-object body nested deeper than
    ``MAX_DEPTH`` levels, a missing or empty ``model``/``messages``, and wrongly typed or
    out-of-range standard parameters.
    """
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc.msg}.") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    if raw.count(b"{") + raw.count(b"[") > MAX_DEPTH:  # at most this deep: no need to look
        _check_depth(body)

    model = body.get("model")
    if model is None:
        raise InvalidRequest("You must provide a model parameter.", param="model")
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequest("'model' must be a non-empty string.", param="model")
    if len(model) > MAX_MODEL_ID:
        raise InvalidRequest(f"'model' must be at most {MAX_MODEL_ID} characters.", param="model")

    _check_messages(body.get("messages"))

    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean.", param="stream")

    for name, (integer, low, high) in NUMERIC_PARAMETERS.items():
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int if integer else int | float):
            raise InvalidRequest(f"'{name}' must be {'an integer' if integer else 'a number'}.", param=name)
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise InvalidRequest(f"'{name}' must be {bounds}.", param=name)
    for name in _OBJECTS:
        if body.get(name) is not None and not isinstance(body[name], dict):
            raise InvalidRequest(f"'{name}' must be an object.", param=name)
    for name in _LISTS:
        if body.get(name) is not None and not isinstance(body[name], list):
            raise InvalidRequest(f"'{name}' must be an array.", param=name)
    _check_stop(body.get("stop"))
    _check_models(body.get("models"))
    return ChatCall(body=body, raw=raw, model=model, stream=stream)


def _check_depth(body: dict[str, Any]) -> None:
    """``InvalidRequest`` naming the top-level field nested deeper than ``MAX_DEPTH`` levels
    (the body itself is level 1). Walks containers only, without recursion."""
    for name, value in body.items():
        stack = [(value, 2)]
        while stack:
            node, depth = stack.pop()
            if not isinstance(node, dict | list):
                continue
            if depth > MAX_DEPTH:
                raise InvalidRequest(
                    f"The request body is nested deeper than {MAX_DEPTH} levels (in '{name}').", param=name
                )
            for child in node.values() if isinstance(node, dict) else node:
                if isinstance(child, dict | list):
                    stack.append((child, depth + 1))


def _check_messages(messages: Any) -> None:
    if messages is None:
        raise InvalidRequest("You must provide a messages parameter.", param="messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty array.", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequest(f"'messages[{i}]' must be an object.", param=f"messages[{i}]")
        role = message.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise InvalidRequest(
                f"'messages[{i}].role' must be one of {', '.join(sorted(_ROLES))}.",
                param=f"messages[{i}].role",
            )
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise InvalidRequest(
                f"'messages[{i}].content' must be a string or an array of content parts.",
                param=f"messages[{i}].content",
            )


def _check_stop(stop: Any) -> None:
    if stop is None or isinstance(stop, str):
        return
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise InvalidRequest("'stop' must be a string or an array of at most 4 strings.", param="stop")


def _check_models(models: Any) -> None:
    if models is None:
        return
    if not isinstance(models, list) or not all(isinstance(m, str) and 0 < len(m) <= MAX_MODEL_ID for m in models):
        raise InvalidRequest(
            f"'models' must be an array of model ids (each at most {MAX_MODEL_ID} characters).", param="models"
        )


def check_caps(call: ChatCall, server: ServerSettings) -> None:
    """Reject ``n`` above ``server.max_n``, ``max_tokens``/``max_completion_tokens`` above
    ``server.max_output_tokens`` and a ``models`` list longer than ``server.max_models``
    (``InvalidRequest``, 400), so one request cannot ask for an unbounded answer or for
    unboundedly many upstream attempts (each ``models`` entry can be one)."""
    body = call.body
    max_n, max_output_tokens = server.max_n, server.max_output_tokens
    n = body.get("n")
    if isinstance(n, int) and n > max_n:
        raise InvalidRequest(f"'n' must be at most {max_n} on this gateway.", param="n")
    models = body.get("models")
    if models is not None and len(models) > server.max_models:
        raise InvalidRequest(f"'models' may list at most {server.max_models} models on this gateway.", param="models")
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if isinstance(value, int) and value > max_output_tokens:
            raise InvalidRequest(f"'{name}' must be at most {max_output_tokens} on this gateway.", param=name)
