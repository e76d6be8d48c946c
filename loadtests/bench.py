"""Benchmark the proxy with every feature on against the emulator and the bare floor.

One run drives wrk (POST /v1/chat/completions, streamed and not, at each concurrency)
against, in order:

a. ``emulator``: the OpenRouter emulator directly (the baseline latency);
b. ``floor``: ``passthrough.py --client aiohttp`` in front of it (the bare pass-through: a
   raw ASGI callable on uvicorn with aiohttp, the same stack as the proxy's hot path);
b'. ``starlette-floor``: the same pass-through as a starlette route (``--app starlette``), the
   reference issue #7 measured (~660 µs) and states its CPU target against;
c. ``proxy``: ``openrouter-proxy serve`` in front of it, with virtual keys (8 keys in
   4 teams, cycled), ``loadtests/policies/routing.yaml`` (10 aliases, 23 rules),
   Redis-backed limits and budgets (``loadtests/policies/limits.yaml``, generous tiers;
   a redis-server the bench starts), metering, the usage log and metrics;

then probes time to first token and event pacing (``streamprobe.py``), RSS after many
requests, and the proxy unpinned with ``--workers 1`` and ``2`` (with the cores each used).
Each process tree's CPU time is read from ``/proc`` around every measured run
(``measure.py``). The proxy and the floor are pinned to CPU 0, wrk, the emulator and Redis
to CPU 1 (``--proxy-cpus`` / ``--load-cpus``).
Writes ``loadtests/results/bench-<date>.md`` and prints it. Only 127.0.0.1 is used;
every run is bounded in time::

    .venv/bin/python loadtests/bench.py --quick     # about 2.5 minutes
    .venv/bin/python loadtests/bench.py             # about 10 minutes, 100,000-request RSS check
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import measure
import report
import stack
import streamprobe
from report import Cell, MemoryCheck, ProbeRow, ScalingRow

MODEL = "openai/gpt-4o-mini"
SHORT = "What is the capital of France?"
LONG = " ".join(["Summarise the following meeting notes in three bullet points."] + ["The team met."] * 150)
MODES = ("non-stream", "stream")


def bodies(mode: str) -> list[bytes]:
    """Two prompt sizes (30 B and ~2 KB); streamed answers have 20 content events."""
    out = []
    for prompt in (SHORT, LONG):
        body: dict[str, object] = {"model": MODEL, "messages": [{"role": "user", "content": prompt}]}
        if mode == "stream":
            body.update(stream=True, emulator={"completion_tokens": 20})
        out.append(json.dumps(body, separators=(",", ":")).encode())
    return out


PACED_BODY = json.dumps(
    {
        "model": MODEL,
        "messages": [{"role": "user", "content": SHORT}],
        "stream": True,
        "emulator": {"completion_tokens": 10, "chunk_delay_ms": 10},
    }
).encode()


@dataclass
class Target:
    """One thing wrk drives: its name, chat URL, the pids whose CPU is its own."""

    name: str
    url: str
    pids: list[int]
    luas: dict[str, Path]
    rss_pid: int | None = None
    served: int = 0
    status_log: measure.StatusLog | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Bench:
    args: argparse.Namespace
    keys: list[str]
    emulator_pid: int
    redis_pid: int
    cells: list[Cell] = field(default_factory=list)

    def measure(self, target: Target, mode: str, connections: int, seconds: float) -> Cell:
        args = self.args
        warm = measure.run_wrk(target.url, target.luas[mode], connections, args.warmup, args.load_cpus)
        target.served += warm.requests
        if target.status_log is not None:
            target.status_log.take()
        before = (
            measure.cpu_seconds(target.pids),
            measure.cpu_seconds([self.emulator_pid]),
            measure.cpu_seconds([self.redis_pid]),
        )
        busy_before, own_before = measure.system_busy_seconds(), measure.own_cpu_seconds()
        stats = measure.run_wrk(target.url, target.luas[mode], connections, seconds, args.load_cpus)
        busy = measure.system_busy_seconds() - busy_before
        own = measure.own_cpu_seconds() - own_before
        proxy_cpu = measure.cpu_seconds(target.pids) - before[0]
        emulator_cpu = measure.cpu_seconds([self.emulator_pid]) - before[1]
        redis_cpu = measure.cpu_seconds([self.redis_pid]) - before[2]
        target.served += stats.requests
        time.sleep(0.6 if target.status_log else 0)  # let the usage log flush
        statuses = target.status_log.take() if target.status_log else Counter[int]()
        ours = own + (proxy_cpu if target.pids != [self.emulator_pid] else 0) + emulator_cpu + redis_cpu
        requests = stats.requests or 1
        cell = Cell(
            target=target.name,
            mode=mode,
            connections=connections,
            requests=stats.requests,
            rps=stats.requests / stats.seconds,
            p50_us=stats.p50_us,
            p99_us=stats.p99_us,
            cpu_us=proxy_cpu * 1e6 / requests if target.pids != [self.emulator_pid] else None,
            emulator_cpu_us=emulator_cpu * 1e6 / requests,
            redis_cpu_us=redis_cpu * 1e6 / requests,
            errors=stats.socket_errors + stats.status_errors,
            rejected=statuses.get(429, 0),
            rss_mb=measure.rss_bytes(target.rss_pid) / 2**20 if target.rss_pid else None,
            foreign_pct=max(0.0, busy - ours) / stats.seconds * 100,
        )
        print(report.progress(cell), file=sys.stderr, flush=True)
        self.cells.append(cell)
        return cell

    def grid(self, target: Target) -> None:
        for mode in self.args.modes:
            for connections in self.args.connections:
                self.measure(target, mode, connections, self.args.duration)

    def probes(self, target: Target) -> ProbeRow:
        args = self.args
        url = target.url
        ttft = streamprobe.run_probe(url, bodies("stream")[0], self.keys, args.probe_requests, 0.0, 20)
        paced = streamprobe.run_probe(url, PACED_BODY, self.keys, args.paced_requests, 10.0, 20)
        target.served += ttft.samples + ttft.errors + paced.samples + paced.errors
        print(
            f"  probe {target.name}: ttft p50 {ttft.ttft_p50_ms:.2f} ms, held back {paced.held_back}", file=sys.stderr
        )
        return ProbeRow(target.name, ttft, paced)


def memory_check(bench: Bench, target: Target, total: int) -> MemoryCheck:
    """Drive the proxy until it has served ``total`` requests; RSS before and after."""
    assert target.rss_pid is not None
    start_served, start_rss = target.served, measure.rss_bytes(target.rss_pid)
    samples: list[tuple[int, float]] = [(target.served, start_rss / 2**20)]
    deadline = time.monotonic() + bench.args.memory_timeout
    mode_index = 0
    while (target.served < total or mode_index == 0) and time.monotonic() < deadline:
        mode = MODES[mode_index % 2]
        mode_index += 1
        stats = measure.run_wrk(target.url, target.luas[mode], 16, 10, bench.args.load_cpus)
        target.served += stats.requests
        samples.append((target.served, measure.rss_bytes(target.rss_pid) / 2**20))
        print(f"  memory: {target.served:,} requests, RSS {samples[-1][1]:.1f} MB", file=sys.stderr, flush=True)
    return MemoryCheck(start_served, start_rss / 2**20, target.served, samples[-1][1], samples)


def scaling(bench: Bench, config: Path, env: dict[str, str], luas: dict[str, Path]) -> list[ScalingRow]:
    """Throughput at 64 connections with 1 and then 2 workers, the proxy not pinned.

    Besides req/s, each row records how many cores the proxy tree used, each process's
    share and how busy the whole machine was: on a machine with few CPUs the second
    worker can only take what wrk, the emulator and Redis leave, and these figures say
    whether the proxy or the machine set the limit.
    """
    args, rows = bench.args, []
    for workers in (1, 2):
        with stack.proxy(stack.ALL_CPUS, config, env, workers=workers) as proc:
            url = f"{proc.url}/v1/chat/completions"
            for mode in MODES:
                measure.run_wrk(url, luas[mode], 64, args.warmup, args.load_cpus)
                pids = measure.tree(proc.pid)
                before, busy_before = measure.process_cpu(pids), measure.system_busy_seconds()
                stats = measure.run_wrk(url, luas[mode], 64, args.duration, args.load_cpus)
                busy = measure.system_busy_seconds() - busy_before
                after = measure.process_cpu(pids)
                used = sorted((after[p] - before[p] for p in after if p in before), reverse=True)
                seconds, requests = stats.seconds, stats.requests or 1
                rows.append(
                    ScalingRow(
                        workers=workers,
                        mode=mode,
                        rps=stats.requests / seconds,
                        cpu_us=sum(used) * 1e6 / requests,
                        p50_us=stats.p50_us,
                        errors=stats.socket_errors + stats.status_errors,
                        proxy_cores=sum(used) / seconds,
                        process_cores=tuple(u / seconds for u in used if u / seconds >= 0.01),
                        machine_busy=busy / seconds,
                        cpus=os.cpu_count() or 1,
                    )
                )
                print(f"  workers {workers} {mode}: {report.scaling_line(rows[-1])}", file=sys.stderr, flush=True)
    return rows


def run(args: argparse.Namespace) -> str:
    for tool in ("wrk", "redis-server"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found (apt-get install -y {tool})")
    if args.load_cpus:
        os.sched_setaffinity(0, {int(c) for c in args.load_cpus.split(",")})
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="proxy-bench-") as tmp, ExitStack() as stack_:
        workdir = Path(tmp)
        config, vkeys = stack.write_config(workdir, stack.BENCH_KEYS, {"limits": {"admission": args.admission}})
        keys = [k.secret for k in vkeys]
        luas = {
            mode: measure.write_lua(workdir / f"{mode}.lua", "/v1/chat/completions", bodies(mode), keys)
            for mode in MODES
        }
        redis = stack_.enter_context(stack.redis(args.load_cpus))
        emulator = stack_.enter_context(stack.emulator(args.load_cpus))
        upstream = f"{emulator.url}/api/v1"
        env = stack.proxy_env(upstream, redis.url)
        problem = stack.check_config(config, env)
        if problem:
            raise SystemExit(f"the generated config does not pass `openrouter-proxy check`:\n{problem}")
        bench = Bench(args, keys, emulator.pid, redis.pid)
        direct_luas = {
            mode: measure.write_lua(workdir / f"direct-{mode}.lua", "/api/v1/chat/completions", bodies(mode), keys)
            for mode in MODES
        }
        direct = Target("emulator", f"{upstream}/chat/completions", [emulator.pid], direct_luas)
        probe_rows: list[ProbeRow] = []
        memory: MemoryCheck | None = None
        if "emulator" in args.targets:
            bench.grid(direct)
            probe_rows.append(bench.probes(direct))
        if "floor" in args.targets:
            with stack.passthrough(args.proxy_cpus, upstream, log=workdir / "floor.log") as floor_proc:
                floor = Target("floor (aiohttp)", f"{floor_proc.url}/v1/chat/completions", [floor_proc.pid], luas)
                floor.rss_pid = floor_proc.pid
                bench.grid(floor)
                probe_rows.append(bench.probes(floor))
        if "starlette-floor" in args.targets:
            with stack.passthrough(
                args.proxy_cpus, upstream, log=workdir / "starlette-floor.log", app="starlette"
            ) as floor_proc:
                floor = Target(report.STARLETTE_FLOOR, f"{floor_proc.url}/v1/chat/completions", [floor_proc.pid], luas)
                floor.rss_pid = floor_proc.pid
                bench.grid(floor)
        if "proxy" in args.targets:
            with stack.proxy(args.proxy_cpus, config, env) as proxy_proc:
                proxy = Target("proxy (all features)", f"{proxy_proc.url}/v1/chat/completions", [proxy_proc.pid], luas)
                proxy.rss_pid = proxy_proc.pid
                proxy.status_log = measure.StatusLog(workdir / "usage.jsonl")
                bench.grid(proxy)
                probe_rows.append(bench.probes(proxy))
                if args.memory_requests > 0:
                    memory = memory_check(bench, proxy, args.memory_requests)
                if args.profile:
                    from profile_run import profile_target

                    profile_target(bench, proxy, args.profile)
        scaling_rows = scaling(bench, config, env, luas) if args.scaling else []
        notes = log_notes(workdir / "proxy.log")
    elapsed = time.monotonic() - started
    meta = report.Meta(vars(args), elapsed, machine_note(), notes)
    return report.render(bench.cells, probe_rows, memory, scaling_rows, meta)


def log_notes(log: Path, top: int = 5) -> list[str]:
    """The proxy's warnings and errors during the run, most frequent first."""
    if not log.exists():
        return ["the proxy wrote no log"]
    counts: Counter[str] = Counter()
    for line in log.read_text(errors="replace").splitlines():
        for level in (" WARNING ", " ERROR ", " CRITICAL ", "Traceback"):
            if level in line:
                counts[line.split(level, 1)[-1][:160] if level != "Traceback" else "Traceback"] += 1
    if not counts:
        return ["the proxy logged no warnings or errors during the run"]
    return [f"proxy log, {n}x: `{message}`" for message, n in counts.most_common(top)]


def machine_note() -> str:
    load = Path("/proc/loadavg").read_text().split()[:3]
    return f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, load average before the run {' '.join(load)}"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs, 20,000-request memory check (~2.5 min)")
    parser.add_argument("--connections", default="1,16,64", help="comma-separated wrk connection counts")
    parser.add_argument(
        "--targets", default="emulator,floor,starlette-floor,proxy", help="comma-separated subset to run"
    )
    parser.add_argument("--modes", default="non-stream,stream", help="comma-separated subset of the modes")
    parser.add_argument("--duration", type=float, help="measured seconds per run (quick 3, full 10)")
    parser.add_argument("--warmup", type=float, help="warm-up seconds before each run (quick 1, full 2)")
    parser.add_argument(
        "--memory-requests", type=int, help="RSS check after this many requests (quick 20k, full 100k, 0 = none)"
    )
    parser.add_argument("--memory-timeout", type=float, default=300, help="stop the memory check after this long")
    parser.add_argument("--probe-requests", type=int, default=300, help="sequential streamed requests for TTFT")
    parser.add_argument("--paced-requests", type=int, default=20, help="paced streams for the held-back check")
    parser.add_argument("--no-scaling", dest="scaling", action="store_false", help="skip the --workers 2 run")
    parser.add_argument(
        "--admission",
        choices=("exact", "leased"),
        default="exact",
        help="the featured proxy's limits.admission (README, 'Rate limits and budgets')",
    )
    parser.add_argument("--profile", type=Path, help="also record the proxy with py-spy into this folder")
    parser.add_argument("--proxy-cpus", default="0", help="taskset CPUs for the proxy and the floor ('' = none)")
    parser.add_argument("--load-cpus", default="1", help="taskset CPUs for wrk, emulator, Redis ('' = none)")
    parser.add_argument("--out", type=Path, help="markdown output (default loadtests/results/bench-<date>.md)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.connections = [int(c) for c in args.connections.split(",") if c]
    args.targets = [t for t in args.targets.split(",") if t]
    args.modes = [m for m in args.modes.split(",") if m in MODES]
    args.duration = args.duration or (3.0 if quick else 10.0)
    args.warmup = args.warmup or (1.0 if quick else 2.0)
    if args.memory_requests is None:
        args.memory_requests = 20_000 if quick else 100_000
    if args.out is None:
        stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M")
        args.out = stack.HERE / "results" / f"bench-{stamp}{'-quick' if quick else ''}.md"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    text = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    print(f"written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
