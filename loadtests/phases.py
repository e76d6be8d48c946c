"""Where one request's latency goes at concurrency 1: the critical path, phase by phase.

``bench.py`` reports the p50 latency the proxy adds over the emulator hit directly. This
tool splits that figure. It drives the floor (``passthrough.py``) and the featured proxy
(and the emulator directly, for reference) with wrk at one connection, with the probe of
``loadtests/phase_probe`` loaded into each of them and into the emulator, and reports
the median wall time of each phase of the served requests:

* ``arrival -> app``: the request's bytes arrived -> uvicorn called the app;
* ``app -> upstream``: the app began -> the upstream request began (auth, parse, routing,
  admission in the proxy);
* ``upstream wait``: the upstream request began -> its response head arrived; of which
  the emulator's own ``arrival -> app -> done`` (its *service*) is shown apart;
* ``head -> last byte``: relaying the answer;
* ``last byte -> done``: what the app does after its answer went out (settlement, sinks);
* ``done -> next arrival``: the next request was already waiting if this is near zero.

It also measures what a wake-up costs on this machine (a loopback round trip between the
proxy's CPU and the load CPU after 0.5 ms idle, against the same on one CPU): each
proxied request crosses CPUs four times where the direct run crosses none.

::

    .venv/bin/python loadtests/phases.py                       # ~1 min
    .venv/bin/python loadtests/phases.py --seconds 8 --out docs/measurements/phases.md

Load goes only to 127.0.0.1; every run is bounded in time.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import bench
import features
import measure
import stack

PROBE = stack.HERE / "phase_probe"
PHASES = (
    "arrival -> app",
    "app -> upstream",
    "upstream wait",
    "head -> last byte",
    "last byte -> done",
    "done -> next",
)


def wake_up_us(cpu_a: int, cpu_b: int, rounds: int = 3000) -> float:
    """p50 µs of a one-byte loopback TCP round trip from ``cpu_a`` to an echo process on
    ``cpu_b`` that has been idle 0.5 ms (its CPU may have gone to sleep)."""
    server = socket.create_server(("127.0.0.1", 0))
    pid = os.fork()
    if pid == 0:  # the echo side
        try:
            os.sched_setaffinity(0, {cpu_b})
            conn, _ = server.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while conn.recv(1):
                conn.sendall(b"x")
        finally:
            os._exit(0)
    own = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu_a})
    try:
        with socket.create_connection(server.getsockname()) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            times = []
            for _ in range(rounds):
                time.sleep(0.0005)
                start = time.perf_counter_ns()
                sock.sendall(b"x")
                sock.recv(1)
                times.append(time.perf_counter_ns() - start)
    finally:
        os.sched_setaffinity(0, own)
        server.close()
        os.waitpid(pid, 0)
    return statistics.median(times) / 1000


class Probe:
    """The probe's control files for a set of processes (the probe folder is shared)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.env = {"PYTHONPATH": str(PROBE), "PHASE_PROBE": str(folder)}

    def _touch(self, what: str, pids: Sequence[int]) -> None:
        for pid in pids:
            (self.folder / f"{what}-{pid}").touch()
        deadline = time.monotonic() + 5
        while any((self.folder / f"{what}-{pid}").exists() for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.02)

    def reset(self, pids: Sequence[int]) -> None:
        self._touch("reset", pids)

    def read(self, pids: Sequence[int]) -> dict[str, list[int]]:
        """The marks of whichever of ``pids`` served requests (the worker, not its supervisor)."""
        self._touch("dump", pids)
        best: dict[str, list[int]] = {}
        for pid in pids:
            path = self.folder / f"phases-{pid}.json"
            if path.exists():
                marks = json.loads(path.read_text())
                if len(marks["app"]) > len(best.get("app", [])):
                    best = marks
        return best


def _at_or_before(times: list[int], t: int) -> int | None:
    """The latest of the sorted ``times`` at or before ``t``."""
    i = bisect.bisect_right(times, t)
    return times[i - 1] if i else None


def phases(marks: dict[str, list[int]]) -> dict[str, float]:
    """Median µs of each phase over the requests the marks cover."""
    app, last, done, up, head, recv = (marks[k] for k in ("app", "last", "done", "up", "head", "recv"))
    n = min(len(app), len(last), len(done))
    out: dict[str, list[float]] = {name: [] for name in PHASES}
    for i in range(n - 1):
        arrived = _at_or_before(recv, app[i])
        if arrived is not None:
            out["arrival -> app"].append(app[i] - arrived)
        if up and len(up) >= n and len(head) >= n:
            out["app -> upstream"].append(up[i] - app[i])
            out["upstream wait"].append(head[i] - up[i])
            out["head -> last byte"].append(last[i] - head[i])
        out["last byte -> done"].append(done[i] - last[i])
        nxt = _at_or_before(recv, app[i + 1])
        if nxt is not None and nxt >= done[i]:
            out["done -> next"].append(nxt - done[i])
    return {name: statistics.median(v) / 1000 for name, v in out.items() if v}


def service(marks: dict[str, list[int]]) -> float:
    """Median µs the emulator spent on a request: its bytes arrived -> its app returned."""
    app, done, recv = marks["app"], marks["done"], marks["recv"]
    spans = []
    for a, d in zip(app, done, strict=False):
        arrived = _at_or_before(recv, a)
        if arrived is not None:
            spans.append(d - arrived)
    return statistics.median(spans) / 1000 if spans else float("nan")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--proxy-cpu", type=int, default=0)
    parser.add_argument("--load-cpu", type=int, default=1)
    parser.add_argument("--admission", choices=("exact", "leased"), default="leased")
    parser.add_argument("--out", type=Path, help="also write the report to this markdown file")
    args = parser.parse_args(argv)
    proxy_cpu, load_cpu = str(args.proxy_cpu), str(args.load_cpu)
    os.sched_setaffinity(0, {args.load_cpu})
    cross = wake_up_us(args.proxy_cpu, args.load_cpu)
    same = wake_up_us(args.load_cpu, args.load_cpu)
    rows = []
    with tempfile.TemporaryDirectory(prefix="proxy-phases-") as tmp:
        work = Path(tmp)
        probe = Probe(work)
        with stack.redis(load_cpu) as redis, stack.emulator(load_cpu, env=probe.env) as emulator:
            upstream = f"{emulator.url}/api/v1"
            config, keys = stack.write_config(
                work / "proxy", stack.BENCH_KEYS, {"limits": {"admission": args.admission}}
            )
            proxy_luas = features.wrk_scripts(work / "proxy", [k.secret for k in keys])
            plain_luas = features.wrk_scripts(work / "plain", [])
            env = {**stack.proxy_env(upstream, redis.url), **probe.env}
            emulator_pids = measure.tree(emulator.pid)
            targets = [
                ("emulator", lambda: contextlib.nullcontext(emulator), plain_luas),
                ("floor (aiohttp)", lambda: stack.passthrough(proxy_cpu, upstream, env=probe.env), plain_luas),
                ("proxy (all features)", lambda: stack.proxy(proxy_cpu, config, env), proxy_luas),
            ]
            for name, start, luas in targets:
                with start() as proc:
                    url = (
                        f"{proc.url}/api/v1/chat/completions"
                        if name == "emulator"
                        else f"{proc.url}/v1/chat/completions"
                    )
                    pids = [] if name == "emulator" else measure.tree(proc.pid)
                    for mode in bench.MODES:
                        measure.run_wrk(url, luas[mode], 1, 1.5, load_cpu)
                        probe.reset([*pids, *emulator_pids])
                        stats = measure.run_wrk(url, luas[mode], 1, args.seconds, load_cpu)
                        upstream_marks = probe.read(emulator_pids)
                        own = phases(probe.read(pids)) if name != "emulator" else {}
                        rows.append((name, mode, stats.p50_us / 1000, service(upstream_marks), own))
    report = _report(rows, cross, same, args)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n")
    return 0


def _report(
    rows: list[tuple[str, str, float, float, dict[str, float]]], cross: float, same: float, args: argparse.Namespace
) -> str:
    direct = {mode: p50 for name, mode, p50, _, _ in rows if name == "emulator"}
    lines = [
        "# Where the latency goes at one connection",
        "",
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}; wrk -c1, {args.seconds:g} s per row after 1.5 s of "
        f"warm-up; proxy and floor on CPU {args.proxy_cpu}, wrk, emulator and Redis on CPU {args.load_cpu}; "
        f"limits.admission: {args.admission}. Phase times are medians in µs over the served requests "
        "(`loadtests/phases.py`).",
        "",
        f"Wake-up cost: a loopback round trip to a process idle for 0.5 ms takes {cross:.0f} µs across CPUs "
        f"{args.proxy_cpu} and {args.load_cpu}, {same:.0f} µs on one CPU (p50). A proxied request crosses CPUs four "
        "times (wrk -> proxy -> emulator -> proxy -> wrk); the direct run crosses none.",
        "",
        "| target | mode | wrk p50 ms | added ms | emulator service µs | "
        + " | ".join(f"{p} µs" for p in PHASES)
        + " |",
        "|---|---|---:|---:|---:|" + "---:|" * len(PHASES),
    ]
    for name, mode, p50, svc, own in rows:
        added = "-" if name == "emulator" else f"+{p50 - direct[mode]:.2f}"
        cells = " | ".join(f"{own[p]:.0f}" if p in own else "-" for p in PHASES)
        lines.append(f"| {name} | {mode} | {p50:.2f} | {added} | {svc:.0f} | {cells} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
