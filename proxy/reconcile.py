"""Reconciliation: OpenRouter's own cost for requests whose cost is an estimate.

An estimated request with a generation id leaves a ticket in the store (``proxy.ledger``).
Every ``interval_s`` this job reads the pending tickets and, for each one that is due,
asks ``GET /generation?id=<generation id>`` (openrouter-api.md §6.3). With an answer it
appends an ``"adjustment"`` line (``proxy.accounting``): cost ``data.total_cost`` (USD),
tokens from ``native_tokens_*`` (else ``tokens_*``), as deltas against what was recorded,
into the original day's rollups; ``cost_source`` becomes ``"generation"``. The write
settles the ticket in the same atomic step, so with several replicas reconciling at once
a request is still corrected exactly once.

The generation can 404 for a while after completion: a ticket is first tried
``first_delay_s`` after the request, then retried with exponential back-off (doubling, at
most ``max_backoff_s``) on 404, on upstream errors and on answers without ``total_cost``.
A ticket older than ``max_age_s`` is dropped: its estimate stands (logged).

The replica whose write settled a ticket then hands its cost correction to
``on_correction`` (``proxy.app`` gives it to the limiter, so budgets end at the cost the
ledger ends at, not at the estimate a cut or abandoned stream was settled with).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson

from proxy.accounting import TOKEN_FIELDS, write_of
from proxy.pricing import nano
from proxy.store import Retention, StoreUnavailable, UsageLedger

__all__ = ["Reconciler", "adjustment_of"]

log = logging.getLogger("proxy.reconcile")

FetchGeneration = Callable[[str], Awaitable[Any]]
OnCorrection = Callable[[dict[str, Any], int], Awaitable[Any]]  # (ticket, cost delta in nano-USD)
_GENERATION_TOKENS = {
    "prompt_tokens": ("native_tokens_prompt", "tokens_prompt"),
    "completion_tokens": ("native_tokens_completion", "tokens_completion"),
    "cached_tokens": ("native_tokens_cached",),
    "reasoning_tokens": ("native_tokens_reasoning",),
}


def _cost(value: Any) -> Decimal | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        cost = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    except InvalidOperation:
        return None
    return cost if cost.is_finite() and cost >= 0 else None


def adjustment_of(ref: str, ticket: dict[str, Any], generation: Any, now: float) -> dict[str, Any] | None:
    """The ``"adjustment"`` line correcting ticket ``ref`` by a ``/generation`` body, or
    ``None`` when the body has no usable ``data.total_cost``."""
    data = generation.get("data") if isinstance(generation, dict) else None
    cost = _cost(data.get("total_cost")) if isinstance(data, dict) else None
    if cost is None or not isinstance(data, dict):
        return None
    tokens: dict[str, int] = {}
    for name, sources in _GENERATION_TOKENS.items():
        value = next((data[s] for s in sources if isinstance(data.get(s), int)), None)
        recorded = ticket.get(name)
        tokens[name] = value if value is not None else recorded if isinstance(recorded, int) else 0
    tokens["total_tokens"] = tokens["prompt_tokens"] + tokens["completion_tokens"]
    delta = {name: tokens[name] - int(ticket.get(name) or 0) for name in TOKEN_FIELDS}
    delta["cost_nusd"] = nano(cost) - int(ticket.get("cost_nusd") or 0)
    return {
        "type": "adjustment",
        "ts": round(now, 6),
        "day": ticket["day"],
        "request_ts": ticket.get("ts"),
        "ref": ref,
        "request_id": ticket.get("request_id"),
        "generation_id": ticket.get("generation_id"),
        "key": ticket.get("key"),
        "team": ticket.get("team"),
        "routed_model": ticket.get("routed_model"),
        "rule": ticket.get("rule"),
        "cost_usd": float(cost),
        "cost_source": "generation",
        "delta": delta,
    }


class Reconciler:
    """The background job. ``fetch(generation_id)`` returns the decoded ``/generation`` body
    and raises (e.g. ``ProxyError``) on an error status; ``on_outcome(outcome)`` is told
    ``"settled"``, ``"retry"`` or ``"expired"`` for each ticket handled."""

    def __init__(
        self,
        usage: UsageLedger,
        fetch: FetchGeneration,
        retention: Retention,
        *,
        interval_s: float = 5.0,
        first_delay_s: float = 2.0,
        max_backoff_s: float = 300.0,
        max_age_s: float = 3600.0,
        batch_size: int = 100,
        concurrency: int = 8,
        on_outcome: Callable[[str], None] | None = None,
        on_correction: OnCorrection | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.usage = usage
        self.fetch = fetch
        self.retention = retention
        self.interval_s = interval_s
        self.first_delay_s = first_delay_s
        self.max_backoff_s = max_backoff_s
        self.max_age_s = max_age_s
        self.batch_size = batch_size
        self.on_outcome = on_outcome
        self.on_correction = on_correction  # e.g. the limiter's budgets (proxy.app wires it)
        self._clock = clock
        self._limit = asyncio.Semaphore(concurrency)
        self._backoff: dict[str, tuple[int, float]] = {}  # ticket id -> (failures, next try)
        self._cursor = 0
        self._seen: set[str] = set()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def run_once(self) -> int:
        """Handle one page of due tickets; the number settled. Raises ``StoreUnavailable``."""
        if self._cursor == 0:
            self._seen = set()
        self._cursor, page = await self.usage.tickets(self._cursor, self.batch_size)
        now = self._clock()
        due = []
        self._seen.update(ref for ref, _ in page)
        if self._cursor == 0 and len(self._backoff) > len(self._seen):  # forget tickets now gone
            self._backoff = {ref: v for ref, v in self._backoff.items() if ref in self._seen}
        for ref, raw in page:
            try:
                ticket = orjson.loads(raw)
            except orjson.JSONDecodeError:
                await self.usage.drop_ticket(ref)
                continue
            failures, next_at = self._backoff.get(ref, (0, float(ticket.get("ts") or 0) + self.first_delay_s))
            if now - float(ticket.get("ts") or 0) > self.max_age_s:
                await self._expire(ref, ticket)
            elif now >= next_at:
                due.append((ref, ticket, failures))
        results = await asyncio.gather(*(self._settle(ref, ticket, failures) for ref, ticket, failures in due))
        return sum(results)

    async def _settle(self, ref: str, ticket: dict[str, Any], failures: int) -> bool:
        async with self._limit:
            try:
                body = await self.fetch(str(ticket.get("generation_id")))
                line = adjustment_of(ref, ticket, body, self._clock())
            except StoreUnavailable:
                raise
            except Exception as exc:  # 404 right after completion, upstream errors, bad bodies
                log.debug("generation %s not available yet: %s", ticket.get("generation_id"), exc)
                line = None
            if line is None:
                delay = min(self.first_delay_s * 2 ** (failures + 1), self.max_backoff_s)
                self._backoff[ref] = (failures + 1, self._clock() + delay)
                self._told("retry")
                return False
            applied = await self.usage.append([write_of(line, settles=ref)], self.retention)
            self._backoff.pop(ref, None)
            self._told("settled")
            delta = int(line["delta"].get("cost_nusd") or 0)
            if applied and applied[0] is not None and delta and self.on_correction is not None:
                try:  # this replica settled the ticket: it, and only it, corrects the budgets
                    await self.on_correction(ticket, delta)
                except Exception:
                    log.exception("budget correction for request %s failed", ticket.get("request_id"))
            return True

    async def _expire(self, ref: str, ticket: dict[str, Any]) -> None:
        await self.usage.drop_ticket(ref)
        self._backoff.pop(ref, None)
        log.warning(
            "no /generation cost for %s after %.0f s; request %s keeps its estimate",
            ticket.get("generation_id"),
            self.max_age_s,
            ticket.get("request_id"),
        )
        self._told("expired")

    def _told(self, outcome: str) -> None:
        if self.on_outcome is not None:
            self.on_outcome(outcome)

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="ledger-reconcile")

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:  # one pass walks every page of tickets, so the job keeps up with any rate
                await self.run_once()
                while self._cursor != 0 and not self._stop.is_set():
                    await self.run_once()
            except Exception as exc:
                log.warning("reconciliation pass failed: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval_s)

    async def close(self, timeout_s: float = 2.0) -> None:
        """Stop; a pass still running after ``timeout_s`` is cancelled (settling is idempotent)."""
        self._stop.set()
        task, self._task = self._task, None
        if task is not None:
            done, _ = await asyncio.wait({task}, timeout=timeout_s)
            if not done:
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)
