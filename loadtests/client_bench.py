"""Benchmark the pass-through proxy's upstream client variants with wrk.

Starts ``mock_upstream.py`` and, per client variant, ``passthrough.py`` as
subprocesses on free loopback ports, drives ``POST /v1/chat/completions`` with
wrk (non-stream and ``"stream":true`` bodies, at each concurrency), and reads the
proxy process's CPU time (utime+stime from ``/proc/<pid>/stat``) around each
measured run: CPU µs per request = CPU time / requests completed.  The mock
upstream hit directly is the baseline row (its CPU column is the mock's own).

By default the proxy is pinned to CPU 0 and wrk + mock to CPU 1 (``taskset``).
Prints a markdown table; ``--json`` also writes the raw numbers.  Everything
stays on 127.0.0.1 and every run is bounded by ``--duration``::

    python loadtests/client_bench.py --clients aiohttp,httpx-aiohttp,httpx
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
PYTHON = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")
MOCK = "mock"

BODIES = {
    "non-stream": {
        "model": "openai/gpt-4o-mini",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
    },
    "stream": {
        "model": "openai/gpt-4o-mini",
        "messages": [{"role": "user", "content": "Say hello."}],
        "stream": True,
    },
}

LUA_TEMPLATE = """
wrk.method = "POST"
wrk.body = [==[{body}]==]
wrk.headers["Content-Type"] = "application/json"

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {{"requests":%d,"duration_us":%d,"socket_errors":%d,"status_errors":%d,' ..
    '"p50_us":%d,"p99_us":%d,"mean_us":%.1f}}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99), latency.mean))
end
"""


@dataclass
class Result:
    variant: str
    mode: str
    connections: int
    requests: int
    rps: float
    p50_us: float
    p99_us: float
    cpu_us_per_req: float
    mock_cpu_us_per_req: float
    errors: int
    foreign_cpu_pct: float = 0.0
    runs: int = 1


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def system_busy_seconds() -> float:
    """Busy CPU time of the whole machine (all CPUs), from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / CLK_TCK


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def pinned(cpus: str | None, argv: Sequence[str]) -> list[str]:
    return ["taskset", "-c", cpus, *argv] if cpus else list(argv)


def wait_ready(url: str, body: bytes, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=2) as response:
                response.read()
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not become ready")
        time.sleep(0.1)


@contextmanager
def process(argv: Sequence[str]) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_wrk(url: str, lua: Path, connections: int, seconds: float, cpus: str | None) -> dict[str, float]:
    argv = pinned(
        cpus,
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "5s", "-s", str(lua), url],
    )
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30, check=True).stdout
    for line in out.splitlines():
        if line.startswith("WRKJSON "):
            parsed: dict[str, float] = json.loads(line.removeprefix("WRKJSON "))
            return parsed
    raise RuntimeError(f"no summary in wrk output:\n{out}")


def measure(
    variant: str,
    mode: str,
    connections: int,
    url: str,
    lua: Path,
    pids: tuple[int, int],
    args: argparse.Namespace,
) -> Result:
    proxy_pid, mock_pid = pids
    run_wrk(url, lua, connections, args.warmup, args.load_cpus)
    proxy_before, mock_before = cpu_seconds(proxy_pid), cpu_seconds(mock_pid)
    busy_before, wrk_before = system_busy_seconds(), children_cpu_seconds()
    stats = run_wrk(url, lua, connections, args.duration, args.load_cpus)
    busy = system_busy_seconds() - busy_before
    wrk_cpu = children_cpu_seconds() - wrk_before
    proxy_cpu = cpu_seconds(proxy_pid) - proxy_before
    mock_cpu = cpu_seconds(mock_pid) - mock_before
    ours = proxy_cpu + wrk_cpu + (mock_cpu if mock_pid != proxy_pid else 0.0)
    # CPU used by anything else on the machine during the run (other load spoils the numbers).
    foreign = max(0.0, busy - ours) / (stats["duration_us"] / 1e6) * 100
    requests = int(stats["requests"]) or 1
    result = Result(
        variant=variant,
        mode=mode,
        connections=connections,
        requests=requests,
        rps=requests / (stats["duration_us"] / 1e6),
        p50_us=stats["p50_us"],
        p99_us=stats["p99_us"],
        cpu_us_per_req=proxy_cpu * 1e6 / requests,
        mock_cpu_us_per_req=mock_cpu * 1e6 / requests,
        errors=int(stats["socket_errors"] + stats["status_errors"]),
        foreign_cpu_pct=foreign,
    )
    print(
        f"  {variant:<20} {mode:<10} c={connections:<3} {result.rps:8.0f} req/s  "
        f"p50 {result.p50_us / 1000:6.2f} ms  p99 {result.p99_us / 1000:6.2f} ms  "
        f"cpu {result.cpu_us_per_req:6.0f} µs/req  errors {result.errors}  foreign cpu {foreign:4.0f}%",
        file=sys.stderr,
        flush=True,
    )
    return result


def bench(args: argparse.Namespace) -> list[Result]:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install -y wrk")
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="client-bench-") as tmp:
        luas = {}
        for mode, body in BODIES.items():
            luas[mode] = Path(tmp) / f"{mode}.lua"
            luas[mode].write_text(LUA_TEMPLATE.format(body=json.dumps(body, separators=(",", ":"))))
        probe = json.dumps(BODIES["non-stream"]).encode()
        mock_port = free_port()
        mock_argv = [PYTHON, str(HERE / "mock_upstream.py"), "--port", str(mock_port)]
        with process(pinned(args.load_cpus, mock_argv)) as mock:
            mock_url = f"http://127.0.0.1:{mock_port}/api/v1/chat/completions"
            wait_ready(mock_url, probe)
            variants = [MOCK, *args.clients] if args.baseline else list(args.clients)
            for _ in range(args.repeat):
                for variant in variants:
                    results.extend(bench_variant(variant, mock.pid, mock_port, mock_url, luas, probe, args))
    return results


def bench_variant(
    variant: str,
    mock_pid: int,
    mock_port: int,
    mock_url: str,
    luas: dict[str, Path],
    probe: bytes,
    args: argparse.Namespace,
) -> list[Result]:
    results = []
    if variant == MOCK:
        for mode, lua in luas.items():
            for connections in args.connections:
                results.append(measure(variant, mode, connections, mock_url, lua, (mock_pid, mock_pid), args))
        return results
    port = free_port()
    argv = [
        PYTHON,
        str(HERE / "passthrough.py"),
        "--client",
        variant,
        "--port",
        str(port),
        "--upstream",
        f"http://127.0.0.1:{mock_port}/api/v1",
    ]
    with process(pinned(args.proxy_cpus, argv)) as proxy:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        wait_ready(url, probe)
        for mode, lua in luas.items():
            for connections in args.connections:
                results.append(measure(variant, mode, connections, url, lua, (proxy.pid, mock_pid), args))
    return results


def summarise(results: list[Result], max_foreign_pct: float) -> list[Result]:
    """Median of repeated runs per (variant, mode, connections).

    Runs during which other processes used more than ``max_foreign_pct`` of a CPU
    are dropped when at least one quieter run of the same cell exists.
    """
    groups: dict[tuple[str, str, int], list[Result]] = {}
    for result in results:
        groups.setdefault((result.variant, result.mode, result.connections), []).append(result)
    merged = []
    for (variant, mode, connections), all_runs in groups.items():
        runs = [r for r in all_runs if r.foreign_cpu_pct <= max_foreign_pct] or all_runs
        merged.append(
            Result(
                variant=variant,
                mode=mode,
                connections=connections,
                requests=sum(r.requests for r in runs),
                rps=statistics.median(r.rps for r in runs),
                p50_us=statistics.median(r.p50_us for r in runs),
                p99_us=statistics.median(r.p99_us for r in runs),
                cpu_us_per_req=statistics.median(r.cpu_us_per_req for r in runs),
                mock_cpu_us_per_req=statistics.median(r.mock_cpu_us_per_req for r in runs),
                errors=sum(r.errors for r in runs),
                foreign_cpu_pct=max(r.foreign_cpu_pct for r in runs),
                runs=len(runs),
            )
        )
    return merged


def markdown(results: list[Result]) -> str:
    floor = {(r.mode, r.connections): r.cpu_us_per_req for r in results if r.variant == "aiohttp"}
    lines = [
        "| client | mode | conns | req/s | p50 ms | p99 ms | proxy CPU µs/req | vs aiohttp "
        "| mock CPU µs/req | errors | runs | max foreign CPU % |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(results, key=lambda r: (r.mode, r.connections)):
        base = floor.get((r.mode, r.connections))
        if r.variant == MOCK:
            variant, cpu, ratio = "mock upstream direct", f"({r.cpu_us_per_req:.0f} mock)", "-"
        else:
            variant, cpu = r.variant, f"{r.cpu_us_per_req:.0f}"
            ratio = f"{r.cpu_us_per_req / base:.2f}x" if base else "-"
        mock_cpu = "-" if r.variant == MOCK else f"{r.mock_cpu_us_per_req:.0f}"
        lines.append(
            f"| {variant} | {r.mode} | {r.connections} | {r.rps:,.0f} | {r.p50_us / 1000:.2f} | "
            f"{r.p99_us / 1000:.2f} | {cpu} | {ratio} | {mock_cpu} | {r.errors} | {r.runs} | {r.foreign_cpu_pct:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="aiohttp,httpx-aiohttp,httpx", help="comma-separated variants")
    parser.add_argument("--connections", default="1,16", help="comma-separated wrk connection counts")
    parser.add_argument("--duration", type=int, default=8, help="measured seconds per run")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up seconds before each run")
    parser.add_argument("--repeat", type=int, default=1, help="rounds over all variants; medians reported")
    parser.add_argument("--proxy-cpus", default="0", help="taskset CPU list for the proxy ('' = no pinning)")
    parser.add_argument("--load-cpus", default="1", help="taskset CPU list for wrk + mock ('' = no pinning)")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip the mock-direct row")
    parser.add_argument(
        "--max-foreign", type=float, default=10.0, help="drop runs where other processes used more CPU %%"
    )
    parser.add_argument("--json", type=Path, help="write raw per-run results here")
    args = parser.parse_args()
    args.clients = [c for c in args.clients.split(",") if c]
    args.connections = [int(c) for c in args.connections.split(",")]
    results = bench(args)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    print(markdown(summarise(results, args.max_foreign)))


if __name__ == "__main__":
    main()
