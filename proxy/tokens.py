"""A fast prompt-token estimate: no tokenizer, no network, a few microseconds.

About four characters per token for text (the usual rule of thumb for BPE tokenizers on
English and code), plus a small overhead per message, plus the tool schemas. Used by
routing (prompt-size ranges, context-window guard) and admission (tokens reserved before
the actual count is known). It is an estimate: limits settle to OpenRouter's real counts.
"""

from __future__ import annotations

from typing import Any

import orjson

__all__ = ["estimate_prompt_tokens", "last_user_text"]

_CHARS_PER_TOKEN = 4
_PER_MESSAGE = 4
_PER_IMAGE = 765  # a high-detail 1024x1024 image in OpenAI's accounting


def _content_chars(content: Any) -> tuple[int, int]:
    """(text characters, images) of a message's ``content``."""
    if isinstance(content, str):
        return len(content), 0
    chars = images = 0
    if isinstance(content, list):
        for part in content:
            if not isinstance(part, dict):
                continue
            text = part.get("text")
            if isinstance(text, str):
                chars += len(text)
            elif part.get("type") in ("image_url", "input_image", "image"):
                images += 1
    return chars, images


def estimate_prompt_tokens(body: dict[str, Any]) -> int:
    """Estimated prompt tokens of a chat completion request body (tokens, >= 1)."""
    chars = images = 0
    messages = body.get("messages")
    count = 0
    if isinstance(messages, list):
        for message in messages:
            if not isinstance(message, dict):
                continue
            count += 1
            c, i = _content_chars(message.get("content"))
            chars += c
            images += i
            calls = message.get("tool_calls")
            if calls:
                chars += len(orjson.dumps(calls))
    tools = body.get("tools")
    if tools:
        chars += len(orjson.dumps(tools))
    return max(1, chars // _CHARS_PER_TOKEN + count * _PER_MESSAGE + images * _PER_IMAGE)


def last_user_text(body: dict[str, Any]) -> str:
    """The text of the last ``user`` message ('' if none)."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return ""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return "\n".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
            return ""
    return ""
