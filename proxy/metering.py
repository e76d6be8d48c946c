"""Metering: turn what upstream said into ``Usage`` and a ``UsageRecord``'s JSON line.

Sources: OpenRouter's ``usage`` object (openrouter-api.md §2.3): ``prompt_tokens``,
``completion_tokens``, ``total_tokens``, ``cost`` (USD credits),
``prompt_tokens_details.cached_tokens``, ``completion_tokens_details.reasoning_tokens``,
``server_tool_use_details.web_search_requests``.
Anything missing, mistyped or out of range counts as 0 (cost as ``None``, which is then
priced from the tokens): metering never fails a request, and one absurd answer (a token
count of 2**64, a cost of -0.25 or 2e10 USD) cannot overflow the store's counters,
switch a budget off or take other requests' ledger lines with it. In range: token counts
0 to ``MAX_TOKENS``, cost 0 to ``MAX_COST_USD``.
"""

from __future__ import annotations

from typing import Any

import orjson

from proxy.types import PRIVATE_EXTRA, Usage, UsageRecord

__all__ = ["MAX_COST_USD", "MAX_TOKENS", "record_json", "usage_from"]


MAX_TOKENS = 1_000_000_000  # per field of one answer
MAX_COST_USD = 10_000.0  # for one answer


def _int(obj: Any, key: str) -> int:
    value = obj.get(key) if isinstance(obj, dict) else None
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TOKENS:
        return value
    return 0


def _cost(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= MAX_COST_USD:
        return float(value)  # (NaN fails the comparison)
    return None


def usage_from(usage: Any) -> Usage | None:
    """``Usage`` from OpenRouter's ``usage`` dict, or ``None`` when there is none."""
    if not isinstance(usage, dict):
        return None
    prompt = _int(usage, "prompt_tokens")
    completion = _int(usage, "completion_tokens")
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=_int(usage, "total_tokens") or prompt + completion,
        cached_tokens=_int(usage.get("prompt_tokens_details"), "cached_tokens"),
        reasoning_tokens=_int(usage.get("completion_tokens_details"), "reasoning_tokens"),
        cost_usd=_cost(usage.get("cost")),
        web_search_requests=_int(usage.get("server_tool_use_details"), "web_search_requests"),
    )


def record_json(record: UsageRecord, *, cost_usd: float | None, cost_source: str, estimated: bool) -> bytes:
    """The usage-log line for ``record`` (JSON object + ``\\n``), flat and stable.

    Keys: ``ts, request_id, key, team, requested_model, routed_model, rule, model,
    provider, generation_id, stream, status, prompt_tokens, completion_tokens,
    total_tokens, cached_tokens, reasoning_tokens, cost_usd, cost_source, estimated,
    finish_reason, latency_s, ttfb_s, ttft_s, done, cancelled, error_code,
    malformed_events`` (+ ``extra``). ``cost_usd`` is the cost as accounted (USD:
    OpenRouter's, else priced from the tokens; ``cost_source`` says which, ``none``
    when neither, then ``null``), the same figure the ledger records.
    """
    usage = record.usage or Usage()
    line: dict[str, Any] = {
        "ts": round(record.ts, 6),
        "request_id": record.request_id,
        "key": record.key_name,
        "team": record.team,
        "requested_model": record.requested_model,
        "routed_model": record.routed_model,
        "rule": record.rule,
        "model": record.model,
        "provider": record.provider,
        "generation_id": record.generation_id,
        "stream": record.stream,
        "status": record.status,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "cached_tokens": usage.cached_tokens,
        "reasoning_tokens": usage.reasoning_tokens,
        "cost_usd": cost_usd,
        "cost_source": cost_source,
        "estimated": estimated,
        "finish_reason": record.finish_reason,
        "latency_s": round(record.latency_s, 6),
        "ttfb_s": None if record.ttfb_s is None else round(record.ttfb_s, 6),
        "ttft_s": None if record.ttft_s is None else round(record.ttft_s, 6),
        "done": record.done,
        "cancelled": record.cancelled,
        "error_code": record.error_code,
        "malformed_events": record.malformed_events,
    }
    if record.extra:
        extra = {k: v for k, v in record.extra.items() if k not in PRIVATE_EXTRA}
        if extra:
            line["extra"] = extra
    return orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE)
