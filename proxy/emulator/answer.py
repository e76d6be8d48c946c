"""Compose the deterministic answer of the emulated model (no bytes yet; see ``render.py``).

Text: ``You said: <first 4 words of the last user message>.`` then a fixed filler sentence
repeated, cut to ``completion_tokens`` pieces; one piece = one content delta = one
completion token.  Reasoning: three fixed phrases, ``ceil(chars/4)`` reasoning tokens,
counted in ``completion_tokens``.  Tool call: arguments built from the tool's JSON schema
(each required property gets an example of its type), ``ceil(chars/4) + 8`` tokens.
Cost: ``tokens * USD-per-token price`` in exact ``Decimal`` (openrouter-api.md §2.3).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from itertools import chain, cycle, islice
from typing import Any, Final

import orjson

from proxy.emulator.catalog import ResolvedModel
from proxy.emulator.request import ChatRequest, ToolSpec
from proxy.emulator.wire import random_alnum

__all__ = ["Answer", "ToolCall", "Usage", "compose_answer"]

_FILLER: Final = (" This", " is", " a", " deterministic", " emulated", " reply", ".")
_EXAMPLES: Final[Mapping[str, object]] = {
    "string": "example",
    "integer": 1,
    "number": 1,
    "boolean": True,
    "array": [],
    "object": {},
    "null": None,
}
_NATIVE_FINISH: Final = {"anthropic": {"tool_calls": "tool_use", "length": "max_tokens"}}
REASONING_SIGNATURE: Final = "EqcBCkYIBxgCKkBemulatorSignatureNotRealAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=="
OPENAI_FINGERPRINT: Final = "fp_560af6e559"


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts and their USD cost (``Decimal``, exact)."""

    prompt_tokens: int
    completion_tokens: int
    """Includes ``reasoning_tokens``."""
    reasoning_tokens: int
    prompt_cost: Decimal
    completion_cost: Decimal

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def cost(self) -> Decimal:
        return self.prompt_cost + self.completion_cost


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str
    """Compact JSON object text."""


@dataclass(frozen=True, slots=True)
class Answer:
    """Everything a response (streamed or not) says about one generation."""

    model: str
    """Response ``model``: the id as requested (variant suffixes kept)."""
    provider: str
    content: tuple[str, ...]
    """Content pieces; ``"".join`` is the message text."""
    reasoning: tuple[str, ...]
    """Reasoning pieces shown to the client (empty when off or excluded)."""
    reasoning_format: str
    tool_call: ToolCall | None
    finish_reason: str
    native_finish_reason: str
    system_fingerprint: str | None
    usage: Usage


def compose_answer(request: ChatRequest, model: ResolvedModel, pieces: int, rng: random.Random) -> Answer:
    """Build the answer of ``model`` to ``request`` with up to ``pieces`` content pieces."""
    info = model.info
    words = [w[:24] for w in request.user_text.split()[:4]]
    thinking = model.thinking or (
        info.reasoning and (request.reasoning is True or (request.reasoning is None and info.reasoning_default))
    )
    reasoning = _reasoning_pieces(words) if thinking else ()
    reasoning_tokens = _ceil4(sum(map(len, reasoning)))
    tool_call = None
    content: tuple[str, ...] = ()
    finish = "stop"
    if request.tool is not None:
        tool_call = _tool_call(request.tool, rng)
        completion_tokens = _ceil4(len(tool_call.name) + len(tool_call.arguments)) + 8
        finish = "tool_calls"
    else:
        if request.max_tokens is not None and pieces + reasoning_tokens > request.max_tokens:
            pieces = max(request.max_tokens - reasoning_tokens, 0)
            finish = "length"
        content = _content_pieces(words, pieces)
        completion_tokens = len(content)
    completion_tokens += reasoning_tokens
    usage = Usage(
        prompt_tokens=request.prompt_tokens,
        completion_tokens=completion_tokens,
        reasoning_tokens=reasoning_tokens,
        prompt_cost=request.prompt_tokens * info.prompt_price,
        completion_cost=completion_tokens * info.completion_price,
    )
    return Answer(
        model=model.requested,
        provider=info.provider,
        content=content,
        reasoning=() if request.reasoning_excluded else reasoning,
        reasoning_format="anthropic-claude-v1" if info.author == "anthropic" else "unknown",
        tool_call=tool_call,
        finish_reason=finish,
        native_finish_reason=_NATIVE_FINISH.get(info.author, {}).get(finish, finish),
        system_fingerprint=OPENAI_FINGERPRINT if info.author == "openai" else None,
        usage=usage,
    )


def _ceil4(n: int) -> int:
    return -(-n // 4)


def _content_pieces(words: list[str], count: int) -> tuple[str, ...]:
    lead = ["You", " said", ":", *(" " + w for w in words), "."] if words else ["Hello", "!"]
    return tuple(islice(chain(lead, cycle(_FILLER)), count))


def _reasoning_pieces(words: list[str]) -> tuple[str, ...]:
    topic = words[0] if words else "nothing"
    return ("Considering the request", f" about {topic};", " a short answer will do.")


def _tool_call(tool: ToolSpec, rng: random.Random) -> ToolCall:
    return ToolCall(
        id="call_" + random_alnum(rng, 24),
        name=tool.name,
        arguments=orjson.dumps(_arguments(tool.parameters)).decode(),
    )


def _arguments(schema: Mapping[str, Any]) -> dict[str, object]:
    properties = schema.get("properties")
    required = schema.get("required")
    if not isinstance(properties, dict) or not isinstance(required, list):
        return {}
    return {name: _example(properties.get(name)) for name in required if isinstance(name, str)}


def _example(schema: object) -> object:
    if not isinstance(schema, dict):
        return "example"
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    return _EXAMPLES.get(kind, "example") if isinstance(kind, str) else "example"
