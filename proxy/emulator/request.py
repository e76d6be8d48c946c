"""Parse a ``POST /chat/completions`` body into a ``ChatRequest`` (openrouter-api.md §1).

Validation is minimal, like OpenRouter's: what the emulator needs must be well-typed,
everything else is ignored.  ``RequestError`` carries the message of the 400 body.
Token estimate (deterministic, cheap): ``ceil(chars/4) + 4`` per message, plus
``ceil(len(tools JSON)/4)`` when tools are sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson

__all__ = ["ChatRequest", "RequestError", "ToolSpec", "parse_chat_request"]

MISSING_INPUT: Final = 'Input required: specify "prompt" or "messages"'
PER_MESSAGE_TOKENS: Final = 4


class RequestError(ValueError):
    """The body is invalid; ``str(self)`` is the OpenRouter error message (status 400)."""


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """The function tool the emulated model will call."""

    name: str
    parameters: Mapping[str, Any]
    """JSON schema of the arguments (``function.parameters``), possibly empty."""


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """What the emulator uses of a chat completion request."""

    models: tuple[str, ...]
    """Candidate model ids in order: ``model`` then the ``models`` fallback list, deduplicated."""
    stream: bool
    max_tokens: int | None
    """``max_completion_tokens`` or else ``max_tokens``: cap on completion tokens."""
    tool: ToolSpec | None
    """Tool to call, or None to answer with text."""
    reasoning: bool | None
    """True asked for, False switched off, None not mentioned (model default applies)."""
    reasoning_excluded: bool
    """``reasoning.exclude`` / ``include_reasoning: false``: think but omit from the output."""
    user_text: str
    """Text of the last user message."""
    prompt_tokens: int


def parse_chat_request(body: Mapping[str, Any], default_model: str) -> ChatRequest:
    """Validate ``body``; ``default_model`` stands in for a missing ``model`` and ``models``."""
    messages = body.get("messages")
    if messages is None or messages == []:
        raise RequestError(MISSING_INPUT)
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages
    ):
        raise RequestError("messages must be an array of objects with a string role")
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise RequestError("stream must be a boolean")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise RequestError("tools must be an array")
    prompt_tokens = sum(_ceil4(len(_text_of(m.get("content")))) + PER_MESSAGE_TOKENS for m in messages)
    if tools:
        prompt_tokens += _ceil4(len(orjson.dumps(tools)))
    reasoning, excluded = _reasoning(body)
    user_text = next((_text_of(m.get("content")) for m in reversed(messages) if m["role"] == "user"), "")
    return ChatRequest(
        models=_models(body, default_model),
        stream=bool(stream),
        max_tokens=_max_tokens(body),
        tool=_tool(tools, body.get("tool_choice", "auto"), last_role=messages[-1]["role"]),
        reasoning=reasoning,
        reasoning_excluded=excluded,
        user_text=user_text,
        prompt_tokens=prompt_tokens,
    )


def _ceil4(n: int) -> int:
    return -(-n // 4)


def _text_of(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _models(body: Mapping[str, Any], default_model: str) -> tuple[str, ...]:
    model = body.get("model")
    fallbacks = body.get("models")
    if model is not None and not isinstance(model, str):
        raise RequestError("model must be a string")
    if fallbacks is not None and not (isinstance(fallbacks, list) and all(isinstance(m, str) for m in fallbacks)):
        raise RequestError("models must be an array of strings")
    ids = ([model] if model else []) + (fallbacks or [])
    return tuple(dict.fromkeys(ids)) or (default_model,)


def _max_tokens(body: Mapping[str, Any]) -> int | None:
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RequestError(f"{key} must be a positive integer")
        return value
    return None


def _reasoning(body: Mapping[str, Any]) -> tuple[bool | None, bool]:
    """(asked, excluded) from ``reasoning``, ``include_reasoning``, ``reasoning_effort`` (§1.2)."""
    config = body.get("reasoning")
    if isinstance(config, dict):
        if config.get("exclude") is True:
            return True, True
        off = config.get("enabled") is False or config.get("effort") == "none"
        return not off, False
    legacy = body.get("include_reasoning")
    if isinstance(legacy, bool):
        return True, not legacy
    effort = body.get("reasoning_effort")
    if isinstance(effort, str):
        return effort != "none", False
    return None, False


def _tool(tools: list[Any] | None, choice: object, last_role: str) -> ToolSpec | None:
    """First function tool, or the one ``tool_choice`` names; none after a tool result."""
    if not tools or choice == "none" or last_role == "tool":
        return None
    functions = [
        t["function"]
        for t in tools
        if isinstance(t, dict)
        and t.get("type") == "function"
        and isinstance(t.get("function"), dict)
        and isinstance(t["function"].get("name"), str)
    ]
    wanted = None
    if isinstance(choice, dict):
        named = choice.get("function")
        wanted = named.get("name") if isinstance(named, dict) else None
    for function in functions:
        if wanted is None or function["name"] == wanted:
            parameters = function.get("parameters")
            return ToolSpec(function["name"], parameters if isinstance(parameters, dict) else {})
    if wanted is not None:
        raise RequestError(f"Tool choice {wanted!r} not found in tools")
    return None
