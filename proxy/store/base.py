"""The ``Store`` protocol and the values it returns."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

from proxy.types import UsageRecord

__all__ = ["METRICS", "Store", "StoreUnavailable", "UsageTotals", "counters_of", "day_of", "nano_usd", "totals_of"]

# The counters kept per (day, key, model). Cost is kept in integer nano-USD (1e-9 USD)
# so that sums are exact in Redis (HINCRBY) and in memory alike.
METRICS = ("requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens", "cost_nusd")


class StoreUnavailable(Exception):
    """The store could not be reached or answered with an error."""


def nano_usd(cost_usd: float | None) -> int:
    """USD as integer nano-USD, rounded to the nearest (``None`` -> 0)."""
    return 0 if cost_usd is None else round(cost_usd * 1_000_000_000)


def day_of(ts: float) -> str:
    """UTC calendar day of a Unix time, ``YYYY-MM-DD``."""
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


def counters_of(record: UsageRecord) -> dict[str, int]:
    usage = record.usage
    return {
        "requests": 1,
        "errors": 1 if record.status >= 400 or record.error_code else 0,
        "prompt_tokens": usage.prompt_tokens if usage else 0,
        "completion_tokens": usage.completion_tokens if usage else 0,
        "total_tokens": usage.total_tokens if usage else 0,
        "cost_nusd": nano_usd(usage.cost_usd) if usage else 0,
    }


@dataclass(frozen=True, slots=True)
class UsageTotals:
    """Usage summed per (day, key name, model sent upstream). Cost in USD."""

    day: str
    key: str
    model: str
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_usd: float


def totals_of(day: str, groups: dict[tuple[str, str], dict[str, int]]) -> list[UsageTotals]:
    """``UsageTotals`` rows, sorted by (key, model), from raw counters per (key, model)."""
    return [
        UsageTotals(
            day=day,
            key=key,
            model=model,
            requests=c["requests"],
            errors=c["errors"],
            prompt_tokens=c["prompt_tokens"],
            completion_tokens=c["completion_tokens"],
            total_tokens=c["total_tokens"],
            cost_usd=c["cost_nusd"] / 1e9,
        )
        for (key, model), c in sorted(groups.items())
    ]


class Store(Protocol):
    """What the pipeline needs from shared state. Every method may raise ``StoreUnavailable``."""

    name: str

    async def add_usage(self, record: UsageRecord) -> None:
        """Add one request's counters to its (day, key, model) totals."""

    async def usage_totals(self, day: str) -> list[UsageTotals]:
        """All totals of the UTC ``day`` (``YYYY-MM-DD``)."""

    async def ping(self) -> bool:
        """True when the store answers."""

    async def aclose(self) -> None:
        """Release connections."""
