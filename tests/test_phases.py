"""The latency split of ``loadtests/phases.py``: which probe marks make which phase.

Synthetic marks of two requests (times in ns), as the probe would record them on a
connection that sends the next request while the proxy still works on the last one.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "loadtests"))

from phases import phases, service


def marks(requests: list[dict[str, int]], extra_recv: tuple[int, ...] = ()) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {name: [] for name in ("recv", "app", "up", "head", "last", "done")}
    for request in requests:
        for name, t in request.items():
            out[name].append(t)
    out["recv"] = sorted([*out["recv"], *extra_recv])
    return out


def test_each_phase_is_measured_between_its_own_marks() -> None:
    first = {"recv": 1_000, "app": 51_000, "up": 351_000, "head": 1_051_000, "last": 1_181_000, "done": 1_361_000}
    # the next request arrived only after the first one's app returned
    second = {"recv": 1_376_000, "app": 1_426_000, "up": 1_726_000, "head": 2_426_000, "last": 2_556_000}
    second["done"] = 2_736_000
    third = {"recv": 2_751_000, "app": 2_801_000, "up": 3_101_000, "head": 3_801_000, "last": 3_931_000}
    third["done"] = 4_111_000
    got = phases(marks([first, second, third]))
    assert got == {
        "arrival -> app": 50.0,
        "app -> upstream": 300.0,
        "upstream wait": 700.0,
        "head -> last byte": 130.0,
        "last byte -> done": 180.0,
        "done -> next": 15.0,
    }


def test_arrival_is_the_latest_bytes_before_the_app_started() -> None:
    # a request whose body came in a second read: its arrival is the read right before the app
    first = {"app": 100_000, "last": 200_000, "done": 210_000}
    second = {"app": 400_000, "last": 500_000, "done": 510_000}
    got = phases(marks([first, second], extra_recv=(10_000, 90_000, 380_000)))
    assert got["arrival -> app"] == 10.0
    assert got["done -> next"] == 170.0
    assert "upstream wait" not in got  # no upstream marks: the emulator itself


def test_service_runs_from_arrival_to_the_app_returning() -> None:
    upstream = marks([{"recv": 0, "app": 40_000, "done": 140_000}, {"recv": 500_000, "app": 560_000, "done": 700_000}])
    assert service(upstream) == (140.0 + 200.0) / 2
