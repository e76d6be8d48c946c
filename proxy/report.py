"""``openrouter-proxy usage``: totals from the usage log (JSON lines), grouped.

Each group row sums requests, errors, prompt/completion/total tokens and cost (USD,
summed exactly as decimals) and averages latency (seconds). A trailing ``TOTAL`` row
sums every group. Lines that are not valid records are skipped and counted.
"""

from __future__ import annotations

import csv
import io
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

__all__ = ["GROUPS", "Report", "build_report", "parse_since", "render"]

GROUPS = {
    "key": "key",
    "team": "team",
    "model": "routed_model",
    "requested_model": "requested_model",
    "rule": "rule",
    "provider": "provider",
    "status": "status",
    "day": "ts",
}
_DURATION = re.compile(r"^(\d+)([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, now: float | None = None) -> float:
    """``30m``/``12h``/``7d``/``2w`` ago, or an ISO date ``YYYY-MM-DD``, as a Unix time."""
    match = _DURATION.match(text)
    now = time.time() if now is None else now
    if match:
        return now - int(match.group(1)) * _UNIT_S[match.group(2)]
    try:
        return time.mktime(time.strptime(text, "%Y-%m-%d")) - time.timezone
    except ValueError:
        raise ValueError(f"--since takes e.g. 30m, 12h, 7d or YYYY-MM-DD, not {text!r}") from None


@dataclass(slots=True)
class Row:
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost_usd: Decimal = field(default_factory=Decimal)
    latency_s: float = 0.0

    def add(self, rec: dict[str, Any]) -> None:
        self.requests += 1
        status = rec.get("status")
        if (isinstance(status, int) and status >= 400) or rec.get("error_code"):
            self.errors += 1
        for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
            value = rec.get(name)
            if isinstance(value, int):
                setattr(self, name, getattr(self, name) + value)
        cost = rec.get("cost_usd")
        if isinstance(cost, int | float):
            self.cost_usd += Decimal(repr(cost))
        latency = rec.get("latency_s")
        if isinstance(latency, int | float):
            self.latency_s += latency


@dataclass(slots=True)
class Report:
    by: tuple[str, ...]
    rows: dict[tuple[str, ...], Row]
    total: Row
    skipped: int


def _group_value(rec: dict[str, Any], name: str) -> str:
    if name == "day":
        ts = rec.get("ts")
        return time.strftime("%Y-%m-%d", time.gmtime(ts)) if isinstance(ts, int | float) else "-"
    value = rec.get(GROUPS[name])
    return "-" if value is None else str(value)


def build_report(lines: Iterable[bytes], by: tuple[str, ...], since: float | None = None) -> Report:
    rows: dict[tuple[str, ...], Row] = {}
    total = Row()
    skipped = 0
    for line in lines:
        if not line.strip():
            continue
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError:
            skipped += 1
            continue
        if not isinstance(rec, dict):
            skipped += 1
            continue
        ts = rec.get("ts")
        if since is not None and (not isinstance(ts, int | float) or ts < since):
            continue
        group = tuple(_group_value(rec, name) for name in by)
        row = rows.get(group)
        if row is None:
            row = rows[group] = Row()
        row.add(rec)
        total.add(rec)
    return Report(by, dict(sorted(rows.items())), total, skipped)


def read_lines(path: Path) -> Iterable[bytes]:
    with path.open("rb") as fh:
        yield from fh


_COLUMNS = ("requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens", "cost_usd", "avg_latency_s")


def _cells(row: Row) -> list[str]:
    avg = row.latency_s / row.requests if row.requests else 0.0
    return [
        str(row.requests),
        str(row.errors),
        str(row.prompt_tokens),
        str(row.completion_tokens),
        str(row.total_tokens),
        f"{row.cost_usd:.8f}",
        f"{avg:.3f}",
    ]


def render(report: Report, fmt: str = "table") -> str:
    """The report as ``table`` (aligned text with a TOTAL row), ``csv`` or ``json``."""
    header = [*report.by, *_COLUMNS]
    body = [[*group, *_cells(row)] for group, row in report.rows.items()]
    total = ["TOTAL", *[""] * (len(report.by) - 1), *_cells(report.total)]
    if fmt == "json":
        return orjson.dumps(
            {
                "by": list(report.by),
                "rows": [dict(zip(header, r, strict=True)) for r in body],
                "total": dict(zip(header, total, strict=True)),
            },
            option=orjson.OPT_INDENT_2,
        ).decode()
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerows([header, *body, total])
        return out.getvalue()
    table = [header, *body, total]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    n = len(report.by)

    def fmt_row(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < n else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt_row(header), rule, *(fmt_row(r) for r in body), rule, fmt_row(total)]) + "\n"
