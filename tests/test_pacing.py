"""Upstream pacing: a leaky bucket that queues bursts, with a bounded queue and wait."""

from __future__ import annotations

import asyncio
import time

import pytest

from proxy.config import PacingSettings
from proxy.errors import UpstreamBusy, render_error
from proxy.pacing import Pacer


async def through(pacer: Pacer, n: int) -> list[float | UpstreamBusy]:
    """``n`` concurrent slots: when each got through (seconds from start), or its error."""
    began = time.monotonic()

    async def one() -> float | UpstreamBusy:
        try:
            async with pacer.slot():
                return time.monotonic() - began
        except UpstreamBusy as exc:
            return exc

    return await asyncio.gather(*(one() for _ in range(n)))


def test_off_by_default_costs_nothing() -> None:
    pacer = Pacer(PacingSettings())
    assert not pacer.enabled
    times = asyncio.run(through(pacer, 200))
    assert all(isinstance(t, float) and t < 0.5 for t in times)


def test_a_burst_is_queued_and_paced() -> None:
    pacer = Pacer(PacingSettings(requests_per_s=20, burst=2, max_wait_s=5))
    times = sorted(t for t in asyncio.run(through(pacer, 8)) if isinstance(t, float))
    assert len(times) == 8
    assert times[1] < 0.05  # the burst goes at once
    # The other six drain at 20/s: the last one about 6 x 50 ms after the burst.
    assert 0.25 <= times[-1] < 0.6
    assert pacer.waiting == 0 and pacer.rejected_total == 0


def test_the_queue_is_bounded() -> None:
    pacer = Pacer(PacingSettings(requests_per_s=10, burst=1, max_waiters=3, max_wait_s=5))
    results = asyncio.run(through(pacer, 10))
    passed = [r for r in results if isinstance(r, float)]
    busy = [r for r in results if isinstance(r, UpstreamBusy)]
    assert (len(passed), len(busy)) == (4, 6)  # one slot now, three queued
    assert pacer.rejected_total == 6
    assert "queue is full" in busy[0].message


def test_a_wait_longer_than_max_wait_fails_with_a_retryable_503() -> None:
    pacer = Pacer(PacingSettings(requests_per_s=2, burst=1, max_wait_s=0.1))
    results = asyncio.run(through(pacer, 3))
    assert sum(isinstance(r, float) for r in results) == 1
    errors = [r for r in results if isinstance(r, UpstreamBusy)]
    assert len(errors) == 2 and "Timed out" in errors[0].message
    status, headers, body = render_error(errors[0])
    assert status == 503 and b'"code":"upstream_busy"' in body
    assert (b"retry-after", b"1") in headers and (b"x-should-retry", b"false") not in headers
    assert pacer.waiting == 0


@pytest.mark.parametrize("rate", [0, -1])
def test_the_rate_must_be_positive(rate: float) -> None:
    with pytest.raises(ValueError, match="greater than 0"):
        PacingSettings(requests_per_s=rate)
