"""Time to first token and event pacing of streamed answers, seen from a client.

One connection, requests one after another (concurrency 1). For each streamed response
the arrival time of every ``data:`` event is taken as the moment the socket read that
delivered it returned. TTFT is the arrival of the first ``data: {`` event (keep-alive
comments do not count). With the emulator pacing its events ``chunk_delay_ms`` apart,
an event that arrives within a fifth of that delay after the previous one was *held
back* somewhere on the way (buffered and released together with its successor); a
transparent proxy adds none.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp

_DATA = b"data: {"


@dataclass(frozen=True, slots=True)
class StreamTiming:
    ttft_s: float
    total_s: float
    arrivals_s: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class ProbeSummary:
    samples: int
    ttft_p50_ms: float
    ttft_p99_ms: float
    total_p50_ms: float
    events: int
    held_back: int
    """Events that arrived less than ``chunk_delay_ms / 5`` after the previous event."""
    errors: int


async def _one(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]) -> StreamTiming:
    start = time.perf_counter()
    arrivals: list[float] = []
    first = 0.0
    async with session.post(url, data=body, headers=headers) as response:
        if response.status != 200:
            await response.read()
            raise RuntimeError(f"status {response.status}")
        carry = b""
        async for chunk in response.content.iter_any():
            now = time.perf_counter() - start
            data = carry + chunk
            count = data.count(_DATA)
            if count and not first:
                first = now
            arrivals.extend([now] * count)
            carry = data[-(len(_DATA) - 1) :]
    return StreamTiming(first, time.perf_counter() - start, tuple(arrivals))


async def probe(
    url: str, body: bytes, keys: Sequence[str], requests: int, chunk_delay_ms: float, seconds: float
) -> ProbeSummary:
    """``requests`` streamed requests (at most ``seconds`` long in total), one at a time."""
    timings: list[StreamTiming] = []
    errors = 0
    deadline = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        for i in range(requests):
            if time.monotonic() > deadline:
                break
            headers = {"Content-Type": "application/json", "Authorization": f"Bearer {keys[i % len(keys)]}"}
            try:
                timings.append(await _one(session, url, body, headers))
            except (TimeoutError, aiohttp.ClientError, RuntimeError):
                errors += 1
    return summarise(timings, chunk_delay_ms, errors)


def summarise(timings: Sequence[StreamTiming], chunk_delay_ms: float, errors: int) -> ProbeSummary:
    if not timings:
        return ProbeSummary(0, float("nan"), float("nan"), float("nan"), 0, 0, errors)
    ttfts = sorted(t.ttft_s * 1000 for t in timings)
    threshold = chunk_delay_ms / 5 / 1000
    held = sum(
        1 for t in timings for prev, cur in zip(t.arrivals_s, t.arrivals_s[1:], strict=False) if cur - prev < threshold
    )
    return ProbeSummary(
        samples=len(timings),
        ttft_p50_ms=statistics.median(ttfts),
        ttft_p99_ms=ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.99))],
        total_p50_ms=statistics.median(t.total_s * 1000 for t in timings),
        events=sum(len(t.arrivals_s) for t in timings),
        held_back=held,
        errors=errors,
    )


def run_probe(
    url: str, body: bytes, keys: Sequence[str], requests: int, chunk_delay_ms: float, seconds: float
) -> ProbeSummary:
    return asyncio.run(probe(url, body, keys, requests, chunk_delay_ms, seconds))
