"""The cyclic garbage collector, tuned for a serving worker.

CPython's collector runs a young-generation pass every 700 net new container objects and,
every so often, a full pass over every object the process holds. A proxy worker holds a
large, unchanging heap after startup (pydantic models, redis-py, prometheus-client, the
compiled policies: about 80,000 objects) and, under load, hundreds of short-lived
containers per request in flight. With the defaults a worker at 16 connections ran a young
pass every 16 requests and a 40 to 50 ms full pass every 2,000, and spent 200 to 400 µs of CPU
per request more than with the tuning below (an A/B on the benchmark's traffic, one worker,
10 s of wrk per run: 16 and 64 connections, streamed and not; within the noise at 1
connection). Benchmark run l (``docs/measurements/bench-2026-11-22l-leased-full.md``) is
the first with it.

``tune_gc`` is called once, at the end of a served worker's startup:

* ``gc.freeze()`` moves every object alive then into the permanent generation, which no
  collection walks again (objects there are still freed by reference counting);
* the young generation's threshold goes from 700 to ``YOUNG_THRESHOLD``: most request
  objects are freed by reference counting before a pass would look at them.

Reference cycles are still collected; only how often the collector looks changes. Tests
that build many apps in one process do not call it (freezing their garbage would keep it).
"""

from __future__ import annotations

import gc

__all__ = ["YOUNG_THRESHOLD", "tune_gc"]

YOUNG_THRESHOLD = 10_000
"""Net new container objects between young-generation passes (CPython's default: 700)."""


def tune_gc() -> int:
    """Collect once, freeze the startup heap, raise the young threshold; returns the number
    of objects frozen."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
    return gc.get_freeze_count()
