"""The embedded in-memory store: the single-process default, same semantics as Redis."""

from __future__ import annotations

from collections import defaultdict

from proxy.store.base import METRICS, UsageTotals, counters_of, day_of, totals_of
from proxy.types import UsageRecord

__all__ = ["MemoryStore"]


class MemoryStore:
    name = "memory"

    def __init__(self) -> None:
        self._usage: dict[str, dict[tuple[str, str], dict[str, int]]] = defaultdict(dict)

    async def add_usage(self, record: UsageRecord) -> None:
        bucket = self._usage[day_of(record.ts)]
        group = (record.key_name or "-", record.routed_model or record.requested_model or "-")
        totals = bucket.get(group)
        if totals is None:
            totals = bucket[group] = dict.fromkeys(METRICS, 0)
        for name, value in counters_of(record).items():
            totals[name] += value

    async def usage_totals(self, day: str) -> list[UsageTotals]:
        return totals_of(day, self._usage.get(day, {}))

    async def ping(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None
