"""What each feature costs: the proxy's CPU per request with one feature off at a time.

Runs the featured proxy (as ``bench.py`` does) and then variants of it, each with one
feature turned off by configuration, at one concurrency, streamed and not, with the
floor as reference. The difference to "all features" is that feature's CPU cost per
request, measured the same way as the benchmark (process-tree CPU / requests)::

    .venv/bin/python loadtests/features.py                     # every variant, ~2 min
    .venv/bin/python loadtests/features.py --variants all,no-request-log --repeat 2
    .venv/bin/python loadtests/features.py --variants all,redis-cluster --connections 1 --repeat 2
    .venv/bin/python loadtests/features.py --admission leased --connections 1 --repeat 2

``redis-cluster`` runs the same proxy on a three-node Redis Cluster (the one the test suite
starts, ``tests/redis_server.py``) instead of one redis-server: what the cluster costs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import bench
import measure
import stack


@dataclass(frozen=True, slots=True)
class Variant:
    """Config overrides, an alternative policies folder and the store: ``redis`` (one
    redis-server), ``cluster`` (a three-node Redis Cluster) or ``memory``."""

    overrides: Mapping[str, Mapping[str, object]]
    policies: str | None = None
    store: str = "redis"


ALIASES_ONLY = "aliases-only"
NO_LIMITS = "no-limits"
VARIANTS: dict[str, Variant] = {
    "all": Variant({}),
    "no-request-log": Variant({"logging": {"request_log": None}}),
    "no-usage-log": Variant({"usage": {"log_path": None}}),
    "no-ledger": Variant({"ledger": {"enabled": False}}),
    "no-metrics": Variant({"metrics": {"enabled": False}}),
    "no-limits": Variant({}, policies=NO_LIMITS),
    "no-rules": Variant({}, policies=ALIASES_ONLY),
    "leased": Variant({"limits": {"admission": "leased"}}),
    "memory-store": Variant({}, store="memory"),
    "redis-cluster": Variant({}, store="cluster"),
    "minimal": Variant(
        {
            "logging": {"request_log": None},
            "usage": {"log_path": None},
            "ledger": {"enabled": False},
            "metrics": {"enabled": False},
        },
        policies=NO_LIMITS + "+" + ALIASES_ONLY,
        store="memory",
    ),
}


def policies_for(directory: Path, kind: str | None) -> Path:
    """A policies folder for ``kind``: the load-test policies with limits and/or rules removed."""
    if kind is None:
        return stack.POLICIES
    directory.mkdir(parents=True, exist_ok=True)
    routing = (stack.POLICIES / "routing.yaml").read_text()
    if ALIASES_ONLY in kind:
        routing = routing.split("\nrules:", 1)[0] + "\n"
    (directory / "routing.yaml").write_text(routing)
    limits = (stack.POLICIES / "limits.yaml").read_text()
    if NO_LIMITS in kind:  # the keys' tiers exist but limit nothing
        limits = "tiers:\n  bench: {}\n  tight: {}\n"
    (directory / "limits.yaml").write_text(limits)
    return directory


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of: {', '.join(VARIANTS)}")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--duration", type=float, default=4)
    parser.add_argument("--warmup", type=float, default=1)
    parser.add_argument(
        "--repeat", type=int, default=1, help="rounds over all variants; least CPU and median req/s reported"
    )
    parser.add_argument(
        "--admission", choices=("exact", "leased"), default="exact", help="limits.admission in every variant"
    )
    parser.add_argument("--proxy-cpus", default="0")
    parser.add_argument("--load-cpus", default="1")
    args = parser.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants: {', '.join(unknown)}")
    if args.load_cpus:
        os.sched_setaffinity(0, {int(c) for c in args.load_cpus.split(",")})
    cpu: dict[tuple[str, str], list[float]] = {}
    rps: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="proxy-features-") as tmp:
        work = Path(tmp)
        with (
            stack.redis(args.load_cpus) as redis,
            stack.emulator(args.load_cpus) as emulator,
            _cluster(any(VARIANTS[n].store == "cluster" for n in names)) as cluster,
        ):
            stores = {"redis": redis.url, "cluster": cluster, "memory": None}
            upstream = f"{emulator.url}/api/v1"
            runner = bench.Bench(args, [], emulator.pid, redis.pid)
            for round_ in range(args.repeat):
                with stack.passthrough(args.proxy_cpus, upstream) as floor:
                    luas = wrk_scripts(work / "floor", [])
                    target = bench.Target("floor", f"{floor.url}/v1/chat/completions", [floor.pid], luas)
                    _collect(runner, target, "floor (aiohttp)", args, cpu, rps)
                for name in names:
                    variant = VARIANTS[name]
                    folder = work / f"{name}-{round_}"
                    policies = policies_for(folder / "src", variant.policies)
                    overrides = {"limits": {"admission": args.admission}, **variant.overrides}
                    config, keys = stack.write_config(folder, stack.BENCH_KEYS, overrides, policies)
                    env = stack.proxy_env(upstream, stores[variant.store])
                    luas = wrk_scripts(folder, [k.secret for k in keys])
                    with stack.proxy(args.proxy_cpus, config, env) as proc:
                        target = bench.Target(name, f"{proc.url}/v1/chat/completions", [proc.pid], luas)
                        _collect(runner, target, name, args, cpu, rps)
    print(table(cpu, rps, args.connections))
    return 0


@contextmanager
def _cluster(wanted: bool) -> Iterator[str | None]:
    """The test suite's three-node Redis Cluster (its ``redis+cluster://`` URL), if ``wanted``."""
    if not wanted:
        yield None
        return
    sys.path.insert(0, str(stack.ROOT))
    from tests.redis_server import redis_cluster

    with redis_cluster() as url:
        yield url


def wrk_scripts(folder: Path, keys: list[str]) -> dict[str, Path]:
    """One wrk script per benchmark mode (``bench.MODES``), in ``folder``: the benchmark's
    bodies, cycled over ``keys`` (none given: a placeholder key, for targets without auth)."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = keys or ["none"]
    return {
        mode: measure.write_lua(folder / f"{mode}.lua", "/v1/chat/completions", bench.bodies(mode), keys)
        for mode in bench.MODES
    }


def _collect(
    runner: bench.Bench,
    target: bench.Target,
    name: str,
    args: argparse.Namespace,
    cpu: dict[tuple[str, str], list[float]],
    rps: dict[tuple[str, str], list[float]],
) -> None:
    for mode in bench.MODES:
        cell = runner.measure(target, mode, args.connections, args.duration)
        cpu.setdefault((name, mode), []).append(cell.cpu_us or 0.0)
        rps.setdefault((name, mode), []).append(cell.rps)


def table(cpu: dict[tuple[str, str], list[float]], rps: dict[tuple[str, str], list[float]], conns: int) -> str:
    names = list(dict.fromkeys(name for name, _ in cpu))
    lines = [
        f"| variant (c={conns}) | non-stream µs/req | saved vs all | stream µs/req | saved vs all "
        "| non-stream req/s | stream req/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def med(data: dict[tuple[str, str], list[float]], name: str, mode: str) -> float:
        # CPU: the least-disturbed round (other load only ever adds CPU per request).
        values = data.get((name, mode), [float("nan")])
        return min(values) if data is cpu else statistics.median(values)

    for name in names:
        cells = []
        for mode in bench.MODES:
            value, base = med(cpu, name, mode), med(cpu, "all", mode)
            saved = f"{base - value:+.0f}" if name not in ("all", "floor (aiohttp)") else "-"
            cells += [f"{value:.0f}", saved]
        lines.append(
            f"| {name} | {' | '.join(cells)} | {med(rps, name, 'non-stream'):,.0f} | {med(rps, name, 'stream'):,.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
