"""The usage ledger's storage contract: an append-only stream plus per-day rollups.

Every store (``MemoryStore``, ``RedisStore``) exposes one ``UsageLedger`` as ``store.usage``.
What it keeps:

* **The stream**: ledger lines (JSON objects, bytes) in append order, each with an id
  ``"<ms>-<seq>"`` (Redis stream ids: strictly increasing, never reused). Capped by
  ``Retention.max_entries`` and ``Retention.max_age_s``.
* **The rollups**: per UTC day (``YYYY-MM-DD``) and group ``(key, team, model, rule)``,
  integer counters named in ``METRICS``. Cost is integer nano-USD (1e-9 USD) so sums are
  exact. Day buckets expire after ``Retention.day_ttl_s``.
* **Pending tickets**: a request whose cost is an estimate leaves a ticket (its stream id
  -> opaque bytes) for the reconciliation job. A ``LedgerWrite`` with ``settles=<id>``
  applies only if that ticket was still pending, and removes it in the same step, so a
  correction is applied exactly once even when several replicas reconcile.

``append`` is atomic per batch: stream entries, rollups and tickets agree (one Lua script
in Redis; one uninterrupted step in memory). A batch sent again with the same ``batch_id``
(after a timeout that left its fate unknown) is applied at most once: the store remembers
batch ids for a day. Every method may raise ``StoreUnavailable``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "BATCH_TTL_S",
    "METRICS",
    "Group",
    "LedgerWrite",
    "Retention",
    "UsageLedger",
    "UsageTotals",
    "parse_id",
    "totals_of",
]

METRICS = (
    "requests",
    "errors",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "cost_nusd",
    "estimated",
    "latency_ms",
)
"""Counters per (day, group): tokens are counts, ``cost_nusd`` nano-USD, ``estimated`` the
number of requests whose cost is still an estimate, ``latency_ms`` summed milliseconds."""

BATCH_TTL_S = 86400
"""How long a store remembers an applied ``batch_id`` (seconds)."""

Group = tuple[str, str, str, str]
"""``(key, team, model, rule)``; ``"-"`` where a value is unknown or absent."""


def parse_id(stream_id: str) -> tuple[int, int]:
    """``"<ms>-<seq>"`` as a tuple that sorts like the stream. Raises ``ValueError``."""
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True, slots=True)
class Retention:
    """How long the ledger keeps things. ``None`` disables that cap.

    ``max_entries`` caps the stream's length (trimmed approximately, in whole nodes, as
    Redis' ``MAXLEN ~``); ``max_age_s`` drops entries older than that many seconds;
    ``day_ttl_s`` is how long a day's rollups live after their last update (seconds).
    """

    max_entries: int | None = 1_000_000
    max_age_s: float | None = 7 * 86400.0
    day_ttl_s: int = 400 * 86400


@dataclass(frozen=True, slots=True)
class LedgerWrite:
    """One line to append and the counters it adds to ``(day, group)``.

    ``counters`` are ``(METRICS name, amount)`` pairs (amounts may be negative for a
    correction). ``ticket`` leaves a pending ticket under the new entry's id; ``settles``
    makes the write conditional on the ticket of that id still being pending.
    """

    line: bytes
    day: str
    group: Group
    counters: tuple[tuple[str, int], ...]
    ticket: bytes | None = None
    settles: str | None = None


@dataclass(frozen=True, slots=True)
class UsageTotals:
    """One rollup row: usage of one group on one UTC day. ``cost_usd`` is ``cost_nusd / 1e9``."""

    day: str
    key: str
    model: str
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_usd: float
    team: str = "-"
    rule: str = "-"
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    estimated: int = 0
    latency_ms: int = 0
    cost_nusd: int = 0

    def counters(self) -> dict[str, int]:
        """The raw counters, by ``METRICS`` name."""
        return {name: getattr(self, name) for name in METRICS}


def totals_of(day: str, groups: Mapping[Group, Mapping[str, int]]) -> list[UsageTotals]:
    """``UsageTotals`` rows sorted by group, from raw counters per group (missing = 0)."""
    rows = []
    for (key, team, model, rule), c in sorted(groups.items()):
        get = c.get
        rows.append(
            UsageTotals(
                day=day,
                key=key,
                model=model,
                requests=get("requests", 0),
                errors=get("errors", 0),
                prompt_tokens=get("prompt_tokens", 0),
                completion_tokens=get("completion_tokens", 0),
                total_tokens=get("total_tokens", 0),
                cost_usd=get("cost_nusd", 0) / 1e9,
                team=team,
                rule=rule,
                cached_tokens=get("cached_tokens", 0),
                reasoning_tokens=get("reasoning_tokens", 0),
                estimated=get("estimated", 0),
                latency_ms=get("latency_ms", 0),
                cost_nusd=get("cost_nusd", 0),
            )
        )
    return rows


class UsageLedger(Protocol):
    """The ledger part of a store (``store.usage``). Every method may raise ``StoreUnavailable``."""

    async def append(
        self, writes: Sequence[LedgerWrite], retention: Retention, batch_id: str | None = None
    ) -> list[str | None]:
        """Append ``writes`` in order, atomically; the new ids (``None``: a ``settles`` write
        whose ticket was no longer pending, so nothing was applied). A repeated ``batch_id``
        applies nothing and returns ``[]``."""

    async def read(self, after: str, count: int) -> list[tuple[str, bytes]]:
        """Up to ``count`` ``(id, line)`` entries with ids greater than ``after``, in order
        (``after="0-0"``: from the oldest kept)."""

    async def tickets(self, cursor: int, count: int) -> tuple[int, list[tuple[str, bytes]]]:
        """About ``count`` pending tickets ``(id, ticket)`` from ``cursor`` (start with 0);
        returns the next cursor (0 when the scan wrapped around)."""

    async def drop_ticket(self, entry_id: str) -> bool:
        """Forget a pending ticket without correcting anything; False if it was gone."""

    async def totals(self, day: str, key: str | None = None) -> list[UsageTotals]:
        """The rollup rows of UTC ``day``, optionally only those of virtual key ``key``."""
