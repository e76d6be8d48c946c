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
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import redis.asyncio as aioredis
import stack
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from proxy.limits.lane import ScriptLane

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    args = parser.parse_args()
    with stack.redis(None) as server:
        uvloop.run(run(server.url, args.calls))


if __name__ == "__main__":
    main()
