"""Render an ``Answer`` as OpenRouter's bytes: non-stream body or SSE events.

Non-stream: key order of ``fixtures/completion_basic.json`` / ``completion_tool_call.json``
(§2.1), compact.  Stream: the 2026 wire form of ``fixtures/stream_*.sse`` (§3.1-3.4): key
order ``id, object, created, model, provider, choices``, ``role:"assistant"`` on every delta,
null finish until the finish chunk, then a usage chunk in one of the §3.4 shapes, then
``[DONE]``.  Stream events are composed from byte templates (no per-chunk dict building);
``usage`` is composed by hand so that money prints JavaScript-style (``wire.js_number``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import orjson

from proxy.emulator.answer import REASONING_SIGNATURE, Answer, Usage
from proxy.emulator.types import UsageShape
from proxy.emulator.wire import js_number

__all__ = [
    "DONE",
    "KEEPALIVE",
    "MIDSTREAM_ERROR",
    "StreamPlan",
    "render_completion",
    "render_stream",
    "usage_json",
]

KEEPALIVE: Final = b": OPENROUTER PROCESSING\n\n"
DONE: Final = b"data: [DONE]\n\n"
MIDSTREAM_ERROR: Final = (
    b'{"code":502,"message":"Provider disconnected unexpectedly","metadata":{"error_type":"provider_unavailable"}}'
)
"""The §3.5 in-band error object, as in ``fixtures/stream_midstream_error.sse``."""

_OPEN: Final = b',"finish_reason":null,"native_finish_reason":null}]}\n\n'
_EMPTY_DELTA: Final = b'{"content":"","role":"assistant"}'
_USAGE: Final = (
    '{{"prompt_tokens":{},"completion_tokens":{},"total_tokens":{},"cost":{},"is_byok":false,'
    '"prompt_tokens_details":{{"cached_tokens":0,"cache_write_tokens":0,"audio_tokens":0,"video_tokens":0}},'
    '"cost_details":{{"upstream_inference_cost":{},"upstream_inference_prompt_cost":{},'
    '"upstream_inference_completions_cost":{}}},'
    '"completion_tokens_details":{{"reasoning_tokens":{},"image_tokens":0,"audio_tokens":0}}}}'
)
_SEPARATE_2025: Final = (
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
    b'"finish_reason":null,"native_finish_reason":null,"logprobs":null}]'
)


def usage_json(usage: Usage) -> bytes:
    """The §2.3 usage object in wire key order, numbers printed like JavaScript."""
    cost = js_number(usage.cost)
    return _USAGE.format(
        usage.prompt_tokens,
        usage.completion_tokens,
        usage.total_tokens,
        cost,
        cost,
        js_number(usage.prompt_cost),
        js_number(usage.completion_cost),
        usage.reasoning_tokens,
    ).encode()


def render_completion(answer: Answer, gid: str, created: int, *, error: bool = False) -> bytes:
    """Non-stream body; ``error`` adds the §2.1 partial-output ``choices[0].error``."""
    message: dict[str, object] = {
        "role": "assistant",
        "content": "".join(answer.content),
        "refusal": None,
        "reasoning": "".join(answer.reasoning) or None,
    }
    if answer.reasoning:
        message["reasoning_details"] = [
            {
                "type": "reasoning.text",
                "text": message["reasoning"],
                "signature": REASONING_SIGNATURE,
                "format": answer.reasoning_format,
                "index": 0,
            }
        ]
    call = answer.tool_call
    if call is not None:
        function = {"name": call.name, "arguments": call.arguments}
        message["tool_calls"] = [{"id": call.id, "index": 0, "type": "function", "function": function}]
    choice: dict[str, object] = {
        "index": 0,
        "logprobs": None,
        "finish_reason": answer.finish_reason,
        "native_finish_reason": answer.native_finish_reason,
        "message": message,
    }
    if error:
        choice["error"] = orjson.Fragment(MIDSTREAM_ERROR)
    body = {
        "id": gid,
        "object": "chat.completion",
        "created": created,
        "model": answer.model,
        "provider": answer.provider,
        "system_fingerprint": answer.system_fingerprint,
        "service_tier": "default",
        "choices": [choice],
        "usage": orjson.Fragment(usage_json(answer.usage)),
    }
    return orjson.dumps(body)


@dataclass(frozen=True, slots=True)
class StreamPlan:
    """The SSE events of one streamed answer, one ``bytes`` per ASGI body message."""

    events: list[bytes]
    first_data: int
    """Index of the first ``data:`` event (after the keep-alive comments)."""
    finish: int
    """Index of the finish chunk; deltas are ``events[first_data:finish]``."""
    head: bytes
    """``data: {"id":…,"provider":…,`` — the common chunk prefix, for extra events."""

    def error_event(self) -> bytes:
        """The §3.5 in-band error chunk (``finish_reason:"error"``)."""
        return (
            self.head
            + b'"error":'
            + MIDSTREAM_ERROR
            + b',"choices":[{"index":0,"delta":{"content":""},"finish_reason":"error"}]}\n\n'
        )

    def malformed_event(self) -> bytes:
        """A data event whose JSON is cut off (invalid), correctly framed."""
        return self.head + b'"choices":[{"index":0,"delta":{"content":"unterminated\n\n'


def render_stream(answer: Answer, gid: str, created: int, keepalives: int, usage_shape: UsageShape) -> StreamPlan:
    """All events of the streamed answer, from the keep-alive comments to ``[DONE]``."""
    dumps = orjson.dumps
    head = b'data: {"id":"%b","object":"chat.completion.chunk","created":%d,"model":%b,"provider":%b,' % (
        gid.encode(),
        created,
        dumps(answer.model),
        dumps(answer.provider),
    )
    delta = head + b'"choices":[{"index":0,"delta":'
    events = [KEEPALIVE] * keepalives
    if answer.reasoning:
        fmt = dumps(answer.reasoning_format)
        for i, piece in enumerate(answer.reasoning):
            text = dumps(piece)
            events.append(
                delta + b'{"content":"","role":"assistant","reasoning":%b,"reasoning_details":'
                b'[{"type":"reasoning.text","text":%b,"format":%b,"index":0}]}' % (text, text, fmt) + _OPEN
            )
            if i == 1:
                events.append(KEEPALIVE)
        events.append(
            delta + b'{"content":"","role":"assistant","reasoning_details":[{"type":"reasoning.text",'
            b'"signature":"%b","format":%b,"index":0}]}' % (REASONING_SIGNATURE.encode(), fmt) + _OPEN
        )
    else:
        events.append(delta + _EMPTY_DELTA + _OPEN)
    events.extend(delta + b'{"content":%b,"role":"assistant"}' % dumps(p) + _OPEN for p in answer.content)
    call = answer.tool_call
    if call is not None:
        tool_open = b'{"content":null,"role":"assistant","tool_calls":[{"index":0,'
        events.append(
            delta
            + tool_open
            + b'"id":%b,"type":"function","function":{"name":%b,"arguments":""}}]}' % (dumps(call.id), dumps(call.name))
            + _OPEN
        )
        events.extend(
            delta + tool_open + b'"function":{"arguments":%b}}]}' % dumps(fragment) + _OPEN
            for fragment in _fragments(call.arguments, 3)
        )
    finish_choice = b'"choices":[{"index":0,"delta":%b,"finish_reason":%b,"native_finish_reason":%b}]' % (
        _EMPTY_DELTA,
        dumps(answer.finish_reason),
        dumps(answer.native_finish_reason),
    )
    finish = len(events)
    events.append(head + finish_choice + b"}\n\n")
    usage = b',"usage":' + usage_json(answer.usage) + b"}\n\n"
    if usage_shape == "repeat_finish":
        events.append(head + b'"service_tier":"default",' + finish_choice + usage)
    elif usage_shape == "empty_choices":
        events.append(head + b'"choices":[]' + usage)
    else:
        events.append(head + _SEPARATE_2025 + usage)
    events.append(DONE)
    return StreamPlan(events=events, first_data=keepalives, finish=finish, head=head)


def _fragments(text: str, parts: int) -> list[str]:
    size = max(1, -(-len(text) // parts))
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]
