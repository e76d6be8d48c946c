"""CPU per ``EVALSHA`` round trip: redis-py's client against the limiter's script lane.

Starts a throw-away ``redis-server`` on a free loopback port and times, by process CPU
(``time.process_time``) and by wall clock, calls of a trivial script with the limiter's
shape of arguments (24 keys, 5 arguments), sequentially and 16 at a time:

* ``redis-py``: ``Script.__call__`` on a pooled ``redis.asyncio`` client, under an
  ``asyncio.timeout`` as a hot path would use it;
* ``lane``: ``proxy.limits.lane.ScriptLane.evalsha`` (what the limiter uses);
* ``lane, settle+admit``: one deferred and one immediate call per step, as a request's
  settlement and the next request's admission (they share one write)::

    .venv/bin/python loadtests/lane_bench.py [--calls 20000]

``--checks``: what the limits cost Redis instead. Admits and settles requests through the
limiter's own ``RedisBackend``, 16 at a time, for requests carrying 1 to 8 checks (windows
and holds, as the benchmark's keys), and reports the redis-server's CPU per request and
the requests per second one Redis core could then serve (``docs/deploy.md``, "Sizing")::

    .venv/bin/python loadtests/lane_bench.py --checks [--requests 6000]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import measure
import redis.asyncio as aioredis
import stack
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from proxy.limits.backend import Check, Release
from proxy.limits.lane import ScriptLane
from proxy.limits.policy import DAY, MINUTE, SECOND
from proxy.limits.redis import RedisBackend

SCRIPT = "return ARGV[1]"
KEYS = [f"orp:{{t:bench}}:k:{i}" for i in range(24)]
ARGS = [1_700_000_000_000, "abcdef0123", 60_000, 0, "1,2,3,4,5," * 12]


async def timed(name: str, call: Callable[[], Awaitable[object]], calls: int, concurrency: int) -> None:
    async def worker(n: int) -> None:
        for _ in range(n):
            await call()

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(calls // concurrency) for _ in range(concurrency)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    print(f"{name:24s} c={concurrency:<3d} {cpu / calls * 1e6:8.1f} µs CPU/call {wall / calls * 1e6:8.1f} µs wall/call")


async def run(url: str, calls: int) -> None:
    client = aioredis.Redis.from_url(url)
    script = client.register_script(SCRIPT)
    lane = ScriptLane(client)

    async def redis_py() -> object:
        async with asyncio.timeout(0.05):
            return await script(keys=KEYS, args=ARGS)

    async def lane_call() -> object:
        return await lane.evalsha(script, KEYS, ARGS, 0.05)

    async def settle_admit() -> object:
        settle = asyncio.ensure_future(lane.evalsha(script, KEYS, ARGS, 0.05, defer=True))
        await lane.evalsha(script, KEYS, ARGS, 0.05)
        return await settle

    await lane_call()
    for concurrency in (1, 16):
        await timed("redis-py", redis_py, calls, concurrency)
        await timed("lane", lane_call, calls, concurrency)
        await timed("lane, settle+admit", settle_admit, calls // 2, concurrency)
    await lane.aclose()
    await client.aclose()


# (windows, holds) per request; the last is the benchmark keys' 8 checks
SHAPES = ((1, 0), (0, 1), (2, 1), (3, 2), (5, 3))
_UNLIMITED = 10**15


def shape_checks(windows: int, holds: int) -> list[Check]:
    """Checks as the limiter makes them: request and token windows, then a slot and budgets."""
    spans = (SECOND, MINUTE, MINUTE, DAY, MINUTE)[:windows]
    checks = [Check(f"orp:{{t:bench}}:w{i}", _UNLIMITED, 500 if i == 2 else 1, w) for i, w in enumerate(spans)]
    checks += [Check(f"orp:{{t:bench}}:h{i}", _UNLIMITED, 10_000 if i else 1, None, 1_020_000) for i in range(holds)]
    return checks


async def redis_cost(url: str, redis_pid: int, windows: int, holds: int, requests: int) -> tuple[float, float]:
    """``(Redis CPU µs per request, requests/s one Redis core could serve)``."""
    client = aioredis.Redis.from_url(url)
    backend = RedisBackend(client, 2.0)
    checks, shape, ids = shape_checks(windows, holds), ("bench", windows, holds), itertools.count()

    async def one() -> None:
        rid, now = f"r{next(ids)}", int(time.time() * 1000)
        decision = await backend.reserve(checks, rid, now, 960_000, shape=shape)
        releases = [
            Release(c.key, False, spend=5_000 if c.cost > 1 else 0)
            if c.window is None
            else Release(c.key, True, st.bucket, -100)
            for c, st in zip(checks, decision.states, strict=True)
            if c.window is None or c.cost > 1
        ]
        if releases:  # as the limiter: nothing to settle (requests windows only), no call
            await backend.settle(releases, rid, now, shape=shape)

    async def worker(n: int) -> None:
        for _ in range(n):
            await one()

    await asyncio.gather(*(worker(50) for _ in range(16)))  # warm-up: scripts loaded, shapes cached
    before = measure.cpu_seconds([redis_pid])
    await asyncio.gather(*(worker(requests // 16) for _ in range(16)))
    cpu_us = (measure.cpu_seconds([redis_pid]) - before) / (requests // 16 * 16) * 1e6
    await backend.aclose()
    await client.aclose()
    return cpu_us, 1e6 / cpu_us


async def checks_table(url: str, redis_pid: int, requests: int) -> None:
    print("| checks per request | Redis CPU per request | requests/s per Redis core |")
    print("|---|---:|---:|")
    for windows, holds in SHAPES:
        cpu_us, rate = await redis_cost(url, redis_pid, windows, holds, requests)
        kinds = [f"{n} {kind}{'s' if n > 1 else ''}" for n, kind in ((windows, "window"), (holds, "hold")) if n]
        print(f"| {' + '.join(kinds)} | {cpu_us:,.0f} µs | {rate:,.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--checks", action="store_true", help="Redis CPU per request by checks per request")
    parser.add_argument("--requests", type=int, default=6_000, help="requests per shape with --checks")
    args = parser.parse_args()
    if not args.checks:
        with stack.redis(None) as server:
            uvloop.run(run(server.url, args.calls))
        return
    cpus, redis_cpus = sorted(os.sched_getaffinity(0)), None
    if len(cpus) > 1:  # Redis on a CPU of its own, this process on another
        os.sched_setaffinity(0, {cpus[0]})
        redis_cpus = str(cpus[-1])
    with stack.redis(redis_cpus) as server:
        uvloop.run(checks_table(server.url, server.pid, args.requests))


if __name__ == "__main__":
    main()
