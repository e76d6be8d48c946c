"""The benchmark report's verdicts (``loadtests/report.py``): ``--workers`` must not call a
machine that ran out of CPU a proxy that does not scale, nor the reverse; CPU per request
is checked against both floors, each ratio against its own floor."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "loadtests"))

from report import (
    EMULATOR,
    FLOOR,
    PROXY,
    STARLETTE_FLOOR,
    Cell,
    ScalingRow,
    main_table,
    scaling_table,
    scaling_verdict,
    targets,
)


def row(workers: int, rps: float, proxy_cores: float, busy: float, cpus: int = 2) -> ScalingRow:
    shares = tuple([proxy_cores / workers] * workers)
    return ScalingRow(workers, "non-stream", rps, proxy_cores * 1e6 / rps, 5_000, 0, proxy_cores, shares, busy, cpus)


@pytest.mark.parametrize(
    ("one", "two", "verdict"),
    [
        (row(1, 1000, 1.0, 1.6), row(2, 1900, 2.0, 3.0, cpus=4), "yes"),
        # the second worker took all the CPU that was left: the machine set the limit
        (row(1, 960, 1.0, 1.6), row(2, 1130, 1.3, 1.92), "machine-bound"),
        # idle CPU left and no more throughput: the proxy does not scale
        (row(1, 960, 1.0, 1.6), row(2, 980, 1.0, 1.5), "**no**"),
        # a saturated machine and no gain: this run cannot tell
        (row(1, 960, 1.0, 1.6), row(2, 970, 1.23, 1.95), "**no** (machine saturated: not measurable here)"),
        # more throughput but the proxy stayed on one core: something serialises the workers
        (row(1, 960, 1.0, 1.6), row(2, 1100, 1.02, 1.5), "**no**"),
    ],
)
def test_scaling_verdict(one: ScalingRow, two: ScalingRow, verdict: str) -> None:
    assert scaling_verdict(one, two) == verdict


def test_scaling_table_shows_each_process_and_the_machine() -> None:
    table = scaling_table([row(1, 960, 1.0, 1.6), row(2, 1130, 1.3, 1.92)])
    assert "| 2 | non-stream | 64 | 1,130 | 1.18x |" in table
    assert "1.30 (0.65 + 0.65) | 1.92 of 2 |" in table


def cell(target: str, mode: str, cpu_us: float | None) -> Cell:
    return Cell(target, mode, 16, 10_000, 1_000.0, 2_000.0, 9_000.0, cpu_us, 300.0, 250.0, 0, 0, None, 0.0)


def test_cpu_targets_are_checked_against_both_floors() -> None:
    cells = [
        cell(EMULATOR, "non-stream", None),
        cell(FLOOR, "non-stream", 400.0),
        cell(STARLETTE_FLOOR, "non-stream", 700.0),
        cell(PROXY, "non-stream", 980.0),
    ]
    text = targets(cells, [], None, [])
    assert "| CPU/request ≤ 1.5x the issue's reference, the starlette + aiohttp pass-through, non-stream " in text
    assert "| c=16: 1.40x | yes |" in text  # 980 / 700
    assert "| CPU/request ≤ 1.5x the raw ASGI + aiohttp floor (the proxy's own stack), non-stream " in text
    assert "| c=16: 2.45x | **no** |" in text  # 980 / 400
    table = main_table(cells)
    assert "| 980 | 2.45x | 1.40x |" in table  # the proxy's row
    assert f"| {STARLETTE_FLOOR} | non-stream | 16 |" in table
    assert "| 700 | 1.75x | - |" in table  # the starlette floor against the raw floor, not itself
