"""Where usage reports get their facts: the store's rollups, exporter files, the usage log.

A fact is ``(dimensions, counters)`` (see ``proxy.report``). From the store, one fact per
rollup row of each UTC day in the range (day granularity: ``since`` is rounded down to
its day). From JSON lines, one fact per line: ledger lines of both types (exporter files)
and usage-log lines, counted by ``proxy.accounting.counters_of_line`` exactly as the
rollups count them; an ``adjustment`` belongs to its request's day and time.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import orjson

from proxy.accounting import counters_of_line, group_of_line
from proxy.store.base import day_of
from proxy.store.usage import UsageLedger

__all__ = ["Fact", "days_between", "export_files", "facts_from_lines", "facts_from_store", "read_lines"]

Fact = tuple[Mapping[str, str], Mapping[str, int]]

_EXPORT_NAME = re.compile(r"^usage-(\d{4}-\d{2}-\d{2})(?:\.(\d+))?\.jsonl$")


def days_between(since: float, until: float) -> list[str]:
    """The UTC days from ``since``'s to ``until``'s, inclusive, oldest first."""
    days = []
    ts = since
    last = day_of(until)
    while (day := day_of(ts)) <= last:
        days.append(day)
        ts += 86400
    return days


async def facts_from_store(
    usage: UsageLedger,
    since: float,
    *,
    key: str | None = None,
    now: float | None = None,
    max_days: int,
) -> list[Fact]:
    """Rollup rows of the days from ``since`` to now (only key ``key``'s when given), at most
    the last ``max_days`` days (``ledger.rollup_ttl_days``: older rollups are gone, and each
    day is a store call of its own, so ``since=99999d`` must not mean 100,000 of them).

    Raises ``StoreUnavailable``.
    """
    facts: list[Fact] = []
    now = time.time() if now is None else now
    for day in days_between(max(since, now - max_days * 86400), now):
        for row in await usage.totals(day, key):
            dims = {"key": row.key, "team": row.team, "model": row.model, "rule": row.rule, "day": row.day}
            facts.append((dims, row.counters()))
    return facts


def _dims(line: Mapping[str, Any], ts: float) -> dict[str, str]:
    key, team, model, rule = group_of_line(line)
    day = line.get("day")
    status = line.get("status")
    return {
        "key": key,
        "team": team,
        "model": model,
        "rule": rule,
        "day": day if isinstance(day, str) else day_of(ts),
        "requested_model": str(line.get("requested_model") or "-"),
        "provider": str(line.get("provider") or "-"),
        "status": "-" if status is None else str(status),
    }


def facts_from_lines(lines: Iterable[bytes], since: float | None = None) -> tuple[list[Fact], int]:
    """Facts of JSON lines at or after ``since`` (Unix s); also how many lines were unreadable."""
    facts: list[Fact] = []
    skipped = 0
    for raw in lines:
        if not raw.strip():
            continue
        try:
            line = orjson.loads(raw)
        except orjson.JSONDecodeError:
            skipped += 1
            continue
        if not isinstance(line, dict):
            skipped += 1
            continue
        ts = line.get("request_ts") if line.get("type") == "adjustment" else line.get("ts")
        if not isinstance(ts, int | float):
            if since is not None:
                continue
            ts = 0.0
        if since is not None and ts < since:
            continue
        try:
            counters = counters_of_line(line)
        except (ArithmeticError, ValueError):  # a cost that is not a number ("abc", "inf")
            skipped += 1
            continue
        facts.append((_dims(line, ts), counters))
    return facts, skipped


def export_files(out_dir: Path, since: float | None = None) -> list[Path]:
    """The exporter's files in stream order, skipping days before ``since``'s."""
    first = day_of(since) if since is not None else ""
    found = []
    for path in out_dir.glob("usage-*.jsonl"):
        match = _EXPORT_NAME.match(path.name)
        if match and match.group(1) >= first:
            found.append((match.group(1), int(match.group(2) or 0), path))
    return [path for _, _, path in sorted(found)]


def read_lines(paths: Path | Iterable[Path]) -> Iterator[bytes]:
    """The lines of one file or of several, in order."""
    for path in [paths] if isinstance(paths, Path) else paths:
        with path.open("rb") as fh:
            yield from fh
