"""Circuit breaker state machine, and sharing open states through the store."""

from __future__ import annotations

import asyncio

from proxy.breaker import Breakers
from proxy.config import BreakerSettings
from proxy.store import MemoryStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


SETTINGS = BreakerSettings(window_s=10, min_requests=4, failure_rate=0.5, open_s=5)


def test_opens_on_failure_rate_then_half_opens_one_probe_and_closes() -> None:
    clock = Clock()
    changes: list[tuple[str, str]] = []
    breakers = Breakers(SETTINGS, clock=clock, wall=clock)
    breakers.listeners.append(lambda target, state: changes.append((target, state)))
    for ok in (True, True, False):
        breakers.record("m", ok)
    assert breakers.allow("m") and breakers.state("m") == "closed"  # 1/3 failed, 3 < min_requests
    breakers.record("m", False)  # 2 of 4 failed: 50 %
    assert breakers.state("m") == "open" and not breakers.allow("m")
    clock.now += 4.9
    assert not breakers.allow("m")
    clock.now += 0.2
    assert breakers.allow("m")  # the probe
    assert breakers.state("m") == "half_open"
    assert not breakers.allow("m")  # only one probe at a time
    breakers.record("m", True)
    assert breakers.state("m") == "closed" and breakers.allow("m")
    assert changes == [("m", "open"), ("m", "half_open"), ("m", "closed")]
    assert breakers.allow("other")


def test_a_failed_probe_opens_again_and_old_failures_age_out() -> None:
    clock = Clock()
    breakers = Breakers(SETTINGS, clock=clock, wall=clock)
    for _ in range(4):
        breakers.record("m", False)
    clock.now += 5.1
    assert breakers.allow("m")
    breakers.record("m", False)
    assert breakers.state("m") == "open"
    clock.now += 100
    breakers.allow("m")
    breakers.record("m", True)
    for _ in range(3):
        breakers.record("m", False)
    clock.now += 20  # the window moved on: these three no longer count
    breakers.record("m", False)
    assert breakers.state("m") == "closed"


def test_open_state_is_shared_through_the_store() -> None:
    async def main() -> None:
        store = MemoryStore()
        clock = Clock()
        a = Breakers(SETTINGS, clock=clock, wall=clock)
        b = Breakers(SETTINGS, clock=clock, wall=clock)
        for _ in range(4):
            a.record("m", False)
        await a.sync_once(store)
        await b.sync_once(store)
        assert b.state("m") == "open" and not b.allow("m")
        clock.now += 5.1
        assert b.allow("m")
        assert b.snapshot()["m"]["state"] == "half_open"

    asyncio.run(main())


def test_disabled_breakers_always_allow() -> None:
    breakers = Breakers(BreakerSettings(enabled=False, min_requests=1))
    for _ in range(10):
        breakers.record("m", False)
    assert breakers.allow("m")


def test_closed_breakers_without_recent_attempts_are_forgotten() -> None:
    """A breaker exists per model id a client names; idle closed ones must not pile up."""
    clock = Clock()
    breakers = Breakers(SETTINGS, clock=clock, wall=clock)
    for i in range(1000):
        breakers.record(f"vendor/made-up-{i}", i % 2 == 0)
    for _ in range(4):
        breakers.record("failing", False)
    breakers.record("recent", False)
    assert breakers.prune() == 0  # every one had an attempt within the window
    clock.now += SETTINGS.window_s + 1
    breakers.record("recent", False)
    assert breakers.prune() == 1000
    snapshot = breakers.snapshot()
    assert set(snapshot) == {"failing", "recent"}
    assert snapshot["failing"]["state"] == "open" and snapshot["recent"]["failures"] == 1
    assert breakers.allow("vendor/made-up-1") and breakers.state("vendor/made-up-1") == "closed"


def test_an_attempt_that_says_nothing_gives_its_half_open_probe_back() -> None:
    """A 404, or a fallback its own limit refused before the attempt: no verdict on the
    model, and the probe must not stay claimed for ``open_s``."""
    clock = Clock()
    breakers = Breakers(SETTINGS, clock=clock, wall=clock)
    for _ in range(4):
        breakers.record("m", False)
    clock.now += SETTINGS.open_s + 0.1
    assert breakers.allow("m") and breakers.state("m") == "half_open"
    assert not breakers.allow("m")  # the probe is out
    breakers.release("m")
    assert breakers.state("m") == "half_open" and breakers.allow("m")  # the next attempt probes
