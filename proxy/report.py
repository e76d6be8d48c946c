"""Usage reports: counters grouped by key, team, model, rule, day (...), with a total.

A report is built from *facts*: ``(dimensions, counters)`` pairs, where dimensions map a
group name (``key``, ``team``, ``model``, ``rule``, ``day``; from lines also
``requested_model``, ``provider``, ``status``) to its value and counters are the ledger's
rollup counters (``proxy.store.usage.METRICS``: tokens, ``cost_nusd`` in nano-USD,
``latency_ms``). ``proxy.report_sources`` makes facts from the store's rollups, the
exporter's files or the usage log. Costs are summed as integers and shown as exact
decimal USD; latency is averaged over requests (seconds).

Renderings (``render``): ``table`` (aligned, with a ``TOTAL`` row), ``csv`` (header, rows,
total) and ``json`` (``{"by", "rows": [...], "total": {...}}``, cells as strings, as
``report_dict``; ``GET /admin/usage`` and ``GET /v1/usage`` return this too).
"""

from __future__ import annotations

import calendar
import csv
import io
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import orjson

from proxy.report_sources import Fact, facts_from_lines

__all__ = [
    "AGGREGATE_GROUPS",
    "GROUPS",
    "Fact",
    "Report",
    "Row",
    "build",
    "build_report",
    "parse_since",
    "render",
    "report_dict",
]

GROUPS = ("key", "team", "model", "requested_model", "rule", "provider", "status", "day")
"""Groups available from ledger lines and the usage log."""
AGGREGATE_GROUPS = ("key", "team", "model", "rule", "day")
"""Groups available from the store's per-day rollups."""

_DURATION = re.compile(r"^(\d{1,12})([smhdw])$")  # (12 digits: any span, no overflow)
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_NANO = Decimal(1_000_000_000)


def parse_since(text: str, now: float | None = None) -> float:
    """``30m``/``12h``/``7d``/``2w`` ago, or an ISO date ``YYYY-MM-DD`` (midnight UTC, whatever
    the local time zone and its daylight saving), as a Unix time, not before 1970-01-01.

    Raises ``ValueError`` for anything else.
    """
    match = _DURATION.match(text)
    now = time.time() if now is None else now
    if match:
        return max(0.0, now - int(match.group(1)) * _UNIT_S[match.group(2)])
    try:
        return float(max(0, calendar.timegm(time.strptime(text, "%Y-%m-%d"))))
    except ValueError:
        raise ValueError(f"--since takes e.g. 30m, 12h, 7d or YYYY-MM-DD, not {text[:40]!r}") from None


@dataclass(slots=True)
class Row:
    """Summed usage of one group. Tokens are counts, ``cost_usd`` exact USD, ``latency_s`` a sum."""

    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    total_tokens: int = 0
    estimated: int = 0
    cost_nusd: int = 0
    latency_ms: int = 0

    @property
    def cost_usd(self) -> Decimal:
        return Decimal(self.cost_nusd) / _NANO

    @property
    def latency_s(self) -> float:
        return self.latency_ms / 1000

    def add(self, counters: Mapping[str, int]) -> None:
        for name, value in counters.items():
            if name in _FIELDS:
                setattr(self, name, getattr(self, name) + value)


_FIELDS = frozenset(Row.__dataclass_fields__)


@dataclass(slots=True)
class Report:
    by: tuple[str, ...]
    rows: dict[tuple[str, ...], Row]
    total: Row
    skipped: int = 0
    source: str = ""


def build(facts: Iterable[Fact], by: tuple[str, ...], *, skipped: int = 0, source: str = "") -> Report:
    """Group ``facts`` by the dimensions ``by`` (missing values show as ``-``)."""
    rows: dict[tuple[str, ...], Row] = {}
    total = Row()
    for dims, counters in facts:
        group = tuple(dims.get(name) or "-" for name in by)
        row = rows.get(group)
        if row is None:
            row = rows[group] = Row()
        row.add(counters)
        total.add(counters)
    return Report(by, dict(sorted(rows.items())), total, skipped, source)


def build_report(lines: Iterable[bytes], by: tuple[str, ...], since: float | None = None) -> Report:
    """A report from JSON lines (usage log or exporter files); unreadable lines are skipped."""
    facts, skipped = facts_from_lines(lines, since)
    return build(facts, by, skipped=skipped)


_COLUMNS = (
    "requests",
    "errors",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "total_tokens",
    "cost_usd",
    "estimated",
    "avg_latency_s",
)


def _cells(row: Row) -> list[str]:
    avg = row.latency_s / row.requests if row.requests else 0.0
    return [
        str(row.requests),
        str(row.errors),
        str(row.prompt_tokens),
        str(row.completion_tokens),
        str(row.cached_tokens),
        str(row.reasoning_tokens),
        str(row.total_tokens),
        f"{row.cost_usd:.9f}",
        str(row.estimated),
        f"{avg:.3f}",
    ]


def report_dict(report: Report) -> dict[str, Any]:
    """The JSON shape: ``{"by": [...], "rows": [{group..., column...}], "total": {...}}``."""
    header = [*report.by, *_COLUMNS]
    total = ["TOTAL", *[""] * (len(report.by) - 1), *_cells(report.total)]
    return {
        "by": list(report.by),
        "rows": [dict(zip(header, [*group, *_cells(row)], strict=True)) for group, row in report.rows.items()],
        "total": dict(zip(header, total, strict=True)),
    }


def render(report: Report, fmt: str = "table") -> str:
    """The report as ``table`` (aligned text with a TOTAL row), ``csv`` or ``json``."""
    if fmt == "json":
        return orjson.dumps(report_dict(report), option=orjson.OPT_INDENT_2).decode() + "\n"
    header = [*report.by, *_COLUMNS]
    body = [[*group, *_cells(row)] for group, row in report.rows.items()]
    total = ["TOTAL", *[""] * (len(report.by) - 1), *_cells(report.total)]
    if fmt == "csv":
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows([header, *body, total])
        return out.getvalue()
    table = [header, *body, total]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    n = len(report.by)

    def fmt_row(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < n else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))

    rule = "  ".join("-" * w for w in widths)
    lines = [fmt_row(header), rule, *(fmt_row(r) for r in body), rule, fmt_row(total)]
    if report.source:
        lines.append(f"({report.source})")
    return "\n".join(lines) + "\n"
