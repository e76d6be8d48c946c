"""Cost accounting: a finished request's ``UsageRecord`` becomes its ledger line.

The cost of a request, in USD, and where it came from (``cost_source``):

* ``upstream``: OpenRouter's ``usage.cost`` (openrouter-api.md §2.3), exact;
* ``pricing``: usage without a cost (or tokens the pipeline estimated), priced with the
  cached ``/models`` prices (``proxy.pricing``);
* ``generation``: filled in later from ``GET /generation`` (``total_cost``, §6.3) by the
  reconciliation job (``proxy.reconcile``);
* ``none``: nothing to price (no usage, or no known price).

A cost that is not OpenRouter's own figure is ``estimated`` when OpenRouter may have billed
something (there is usage or a generation id); estimated requests with a generation id
get a reconciliation ticket.

Ledger lines (JSON objects; the exporter adds ``"id"``, the stream id) are of two types.
``"request"``: ``ts, day, request_id, key, team, requested_model, routed_model, rule,
model, provider, generation_id, stream, status, prompt_tokens, completion_tokens,
total_tokens, cached_tokens, reasoning_tokens, web_search_requests, cost_usd,
cost_source, estimated, tokens_estimated, finish_reason, latency_s, ttfb_s, ttft_s,
done, cancelled, error_code, malformed_events`` (+ ``attempts``, ``extra``).
``"adjustment"``: a correction of an earlier request (``ref`` = its stream id) with
``ts`` (when corrected), ``day`` and ``request_ts`` (the request's), ``request_id,
generation_id, key, team, routed_model, rule, cost_usd, cost_source,
delta{prompt_tokens, completion_tokens, total_tokens, cached_tokens, reasoning_tokens,
cost_nusd}``. ``counters_of_line`` turns either into rollup counters, so summing the
lines of a day gives exactly that day's rollups.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal, Protocol

import orjson

from proxy.pricing import Price, cost_of, nano
from proxy.store.base import day_of
from proxy.store.usage import Group, LedgerWrite
from proxy.types import PRIVATE_EXTRA, UsageRecord

__all__ = [
    "TOKEN_FIELDS",
    "AccountingSink",
    "CostSource",
    "EntrySink",
    "LedgerEntry",
    "account",
    "counters_of_line",
    "group_of_line",
    "nano",
    "write_of",
]

log = logging.getLogger("proxy.accounting")

CostSource = Literal["upstream", "pricing", "generation", "none"]
TOKEN_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens", "reasoning_tokens")
_GROUP_MAX = 200
_RESERVED_EXTRA = PRIVATE_EXTRA | {"attempts", "estimated"}  # (the last two have fields of their own)


def _label(value: Any) -> str:
    if value is None or value == "":
        return "-"
    return str(value).replace("\x1f", " ")[:_GROUP_MAX]


def group_of_line(line: Mapping[str, Any]) -> Group:
    """The rollup group ``(key, team, model, rule)`` of a ledger line."""
    return (
        _label(line.get("key")),
        _label(line.get("team")),
        _label(line.get("routed_model") or line.get("requested_model")),
        _label(line.get("rule")),
    )


def _int(line: Mapping[str, Any], name: str) -> int:
    value = line.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def counters_of_line(line: Mapping[str, Any]) -> dict[str, int]:
    """The rollup counters a ledger line adds (zeros omitted); see the module docstring."""
    if line.get("type") == "adjustment":
        delta = line.get("delta")
        delta = delta if isinstance(delta, dict) else {}
        counters = {name: _int(delta, name) for name in (*TOKEN_FIELDS, "cost_nusd")}
        counters["estimated"] = -1
    else:
        status = line.get("status")
        failed = (isinstance(status, int) and status >= 400) or bool(line.get("error_code"))
        latency = line.get("latency_s")
        counters = {name: _int(line, name) for name in TOKEN_FIELDS}
        counters.update(
            requests=1,
            errors=1 if failed else 0,
            cost_nusd=nano(line.get("cost_usd")),
            estimated=1 if line.get("estimated") else 0,
            latency_ms=round(latency * 1000) if isinstance(latency, int | float) else 0,
        )
    return {name: value for name, value in counters.items() if value}


def write_of(
    line: dict[str, Any],
    *,
    counters: tuple[tuple[str, int], ...] | None = None,
    ticket: bytes | None = None,
    settles: str | None = None,
) -> LedgerWrite:
    """The store write of ``line``: its JSON bytes, day, group and counters (``counters_of_line``
    unless given, as ``LedgerEntry.counters`` does faster). Raises ``TypeError`` when ``line``
    holds a value JSON cannot encode.
    """
    return LedgerWrite(
        line=orjson.dumps(line),
        day=str(line["day"]),
        group=group_of_line(line),
        counters=tuple(counters_of_line(line).items()) if counters is None else counters,
        ticket=ticket,
        settles=settles,
    )


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """A request as accounted: the record, its cost (USD), the cost's source, the estimate flag."""

    record: UsageRecord
    cost_usd: Decimal
    cost_source: CostSource
    estimated: bool

    @property
    def reconcilable(self) -> bool:
        """An estimate that ``GET /generation`` can correct."""
        return self.estimated and self.record.generation_id is not None

    def counters(self) -> tuple[tuple[str, int], ...]:
        """The rollup counters (zeros left out), read straight from the record: always equal to
        ``counters_of_line(self.line())``, only cheaper (tests hold the two together)."""
        rec = self.record
        pairs = [("requests", 1)]
        if rec.status >= 400 or rec.error_code:
            pairs.append(("errors", 1))
        usage = rec.usage
        if usage is not None:
            for name, value in (
                ("prompt_tokens", usage.prompt_tokens),
                ("completion_tokens", usage.completion_tokens),
                ("total_tokens", usage.total_tokens),
                ("cached_tokens", usage.cached_tokens),
                ("reasoning_tokens", usage.reasoning_tokens),
            ):
                if value:
                    pairs.append((name, value))
        cost = nano(float(self.cost_usd))
        if cost:
            pairs.append(("cost_nusd", cost))
        if self.estimated:
            pairs.append(("estimated", 1))
        latency_ms = round(round(rec.latency_s, 6) * 1000)
        if latency_ms:
            pairs.append(("latency_ms", latency_ms))
        return tuple(pairs)

    def line(self) -> dict[str, Any]:
        """The ``"request"`` ledger line (see the module docstring)."""
        rec = self.record
        usage = rec.usage
        line: dict[str, Any] = {
            "type": "request",
            "ts": round(rec.ts, 6),
            "day": day_of(rec.ts),
            "request_id": rec.request_id,
            "key": rec.key_name,
            "team": rec.team,
            "requested_model": rec.requested_model,
            "routed_model": rec.routed_model,
            "rule": rec.rule,
            "model": rec.model,
            "provider": rec.provider,
            "generation_id": rec.generation_id,
            "stream": rec.stream,
            "status": rec.status,
            "prompt_tokens": usage.prompt_tokens if usage else 0,
            "completion_tokens": usage.completion_tokens if usage else 0,
            "total_tokens": usage.total_tokens if usage else 0,
            "cached_tokens": usage.cached_tokens if usage else 0,
            "reasoning_tokens": usage.reasoning_tokens if usage else 0,
            "web_search_requests": usage.web_search_requests if usage else 0,
            "cost_usd": float(self.cost_usd),
            "cost_source": self.cost_source,
            "estimated": self.estimated,
            "tokens_estimated": bool(rec.extra and rec.extra.get("estimated")),
            "finish_reason": rec.finish_reason,
            "latency_s": round(rec.latency_s, 6),
            "ttfb_s": None if rec.ttfb_s is None else round(rec.ttfb_s, 6),
            "ttft_s": None if rec.ttft_s is None else round(rec.ttft_s, 6),
            "done": rec.done,
            "cancelled": rec.cancelled,
            "error_code": rec.error_code,
            "malformed_events": rec.malformed_events,
        }
        if rec.extra:
            attempts = rec.extra.get("attempts")
            if isinstance(attempts, list) and attempts:
                line["attempts"] = attempts
            extra = {k: v for k, v in rec.extra.items() if k not in _RESERVED_EXTRA}
            if extra:
                line["extra"] = extra
        return line

    def ticket(self) -> bytes:
        """The reconciliation ticket: what a correction needs to know about this request."""
        line = self.line()
        keep = ("request_id", "generation_id", "ts", "day", "key", "team", "routed_model", "rule", *TOKEN_FIELDS)
        ticket = {name: line[name] for name in keep}
        ticket["routed_model"] = group_of_line(line)[2]
        ticket["cost_nusd"] = counters_of_line(line).get("cost_nusd", 0)
        budget = self.record.extra.get("budget") if self.record.extra else None
        if budget is not None:  # the budget keys the request charged, and how much (proxy.admission)
            ticket["budget"] = budget
        return orjson.dumps(ticket)


def account(record: UsageRecord, prices: Callable[[str | None], Price | None]) -> LedgerEntry:
    """Cost, cost source and estimate flag of ``record``; ``prices`` looks a model's price up."""
    usage = record.usage
    if usage is not None and usage.cost_usd is not None:
        return LedgerEntry(record, Decimal(repr(usage.cost_usd)), "upstream", False)
    billable = usage is not None or record.generation_id is not None
    if usage is not None:
        price = prices(record.model or record.routed_model)
        if price is None and record.model and record.routed_model:
            price = prices(record.routed_model)
        if price is not None:
            return LedgerEntry(record, cost_of(price, usage), "pricing", True)
    return LedgerEntry(record, Decimal(0), "none", billable)


class EntrySink(Protocol):
    def emit_entry(self, entry: LedgerEntry) -> None:
        """Take one accounted request; never blocks, never raises."""


class AccountingSink:
    """The ``RecordSink`` that accounts each record once and hands the entry to ``outputs``.

    ``prices`` is a synchronous lookup (``PriceBook.get``), so ``emit`` never waits. The
    usage log, the ledger writer, metrics, the request log and tracing are outputs; an
    output that raises is logged and skipped, never the request's problem, and a record
    that cannot be priced still reaches every output (with OpenRouter's cost or none).
    """

    def __init__(self, prices: Callable[[str | None], Price | None], outputs: list[EntrySink]) -> None:
        self.prices = prices
        self.outputs = outputs

    def emit(self, record: UsageRecord) -> None:
        try:
            entry = account(record, self.prices)
        except Exception:  # (a price that breaks the arithmetic): unpriced, but every output still gets it
            log.exception("accounting failed for request %s", record.request_id)
            usage = record.usage
            cost = Decimal(repr(usage.cost_usd)) if usage is not None and usage.cost_usd is not None else Decimal(0)
            entry = LedgerEntry(record, cost, "upstream" if cost else "none", False)
        for output in self.outputs:
            try:
                output.emit_entry(entry)
            except Exception:
                log.exception("%s failed on request %s", type(output).__name__, record.request_id)
