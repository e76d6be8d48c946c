"""The featured proxy on one Redis endpoint against the same on a three-node Redis Cluster.

Starts the emulator, one redis-server and a three-node Redis Cluster (the one the test
suite uses, ``tests/redis_server.py``), then runs the benchmark's featured proxy
(``stack.write_config``: 8 keys in 4 teams, the load-test policies) with ``REDIS_URL``
pointing at each in turn, alternating ``--rounds`` times, and drives it with wrk streamed
and not. Prints the proxy's CPU µs per request (process-tree accounting, as ``bench.py``),
req/s and p50 per store; the lowest CPU of the rounds is the steadier figure on a shared
machine. Only 127.0.0.1 is used and every run is bounded::

    .venv/bin/python loadtests/cluster_bench.py --rounds 2     # about 2 minutes
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import bench
import measure
import stack

sys.path.insert(0, str(stack.ROOT))

from tests.redis_server import redis_cluster  # the repository root is on sys.path now


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", default="1,16", help="comma-separated wrk connection counts")
    parser.add_argument("--duration", type=float, default=5, help="measured seconds per run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--proxy-cpus", default="0")
    parser.add_argument("--load-cpus", default="1")
    args = parser.parse_args(argv)
    connections = [int(c) for c in args.connections.split(",") if c]
    if args.load_cpus:
        os.sched_setaffinity(0, {int(c) for c in args.load_cpus.split(",")})
    results: dict[tuple[str, str, int], list[tuple[float, float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="proxy-cluster-bench-") as tmp:
        work = Path(tmp)
        config, keys = stack.write_config(work, stack.BENCH_KEYS)
        luas = {
            mode: measure.write_lua(
                work / f"{mode}.lua", "/v1/chat/completions", bench.bodies(mode), [k.secret for k in keys]
            )
            for mode in bench.MODES
        }
        with (
            stack.redis(args.load_cpus) as single,
            stack.emulator(args.load_cpus) as emulator,
            redis_cluster() as cluster,
        ):
            upstream = f"{emulator.url}/api/v1"
            for _ in range(args.rounds):
                for store, url in (("one endpoint", single.url), ("cluster", cluster)):
                    with stack.proxy(args.proxy_cpus, config, stack.proxy_env(upstream, url)) as proxy:
                        target = f"{proxy.url}/v1/chat/completions"
                        measure.run_wrk(target, luas["non-stream"], 16, 2, args.load_cpus)  # warm-up
                        for mode in bench.MODES:
                            for n in connections:
                                before = measure.cpu_seconds([proxy.pid])
                                stats = measure.run_wrk(target, luas[mode], n, args.duration, args.load_cpus)
                                cpu = measure.cpu_seconds([proxy.pid]) - before
                                if stats.socket_errors or stats.status_errors:
                                    raise SystemExit(f"{store} {mode} c={n}: {stats}")
                                row = (cpu * 1e6 / max(1, stats.requests), stats.requests / stats.seconds, stats.p50_us)
                                results.setdefault((store, mode, n), []).append(row)
                                print(f"  {store:12} {mode:10} c={n:<3} {row[0]:6.0f} µs/req", file=sys.stderr)
    print("| store | mode | conns | proxy CPU µs/req (lowest) | req/s (median) | p50 ms (median) |")
    print("|---|---|---:|---:|---:|---:|")
    for (store, mode, n), rows in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        rps = sorted(r[1] for r in rows)[len(rows) // 2]
        p50 = sorted(r[2] for r in rows)[len(rows) // 2]
        print(f"| {store} | {mode} | {n} | {min(r[0] for r in rows):.0f} | {rps:,.0f} | {p50 / 1000:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
