"""Instructions per request: the proxy's and the floor's CPU work counted, not timed.

CPU time per request on a shared 2-CPU VM moves by 15-30% from run to run (other tenants,
cold caches, frequency), so a 5% change in the hot path cannot be seen in ``bench.py``.
This tool runs the served process under ``valgrind --tool=callgrind``, which counts the
machine instructions the process executes: the same code on the same requests gives the
same count to within 2-3% (the timers' share varies), whatever else the machine is doing.

For each target (the proxy with every feature on, as ``bench.py`` configures it, and the
raw ASGI + aiohttp floor, ``passthrough.py``) and mode (streamed or not):

1. start it under callgrind with instrumentation off (startup runs about 10x slower,
   not 50x), Redis and the emulator beside it, uninstrumented;
2. send ``--warmup`` requests, one at a time on one keep-alive connection (caches,
   allotments and connection pools filled);
3. switch instrumentation on, zero the counters, send ``--requests`` more, dump the
   counters (callgrind's monitor commands, sent with ``vgdb``);
4. report the dump's instructions divided by the requests, and what the process spends
   per second when idle right after (its timers), scaled to the same time.

Under callgrind the process runs about 50x slower, while timers keep wall-clock time: a
periodic task (the leased-admission sweeper every 0.1 s, the ledger and request log
flushes every 0.2 s) runs about 50x more often per request than at full speed, and work
batched by time is shared by about 50x fewer requests (a ledger batch, an allotment that
admits for 1 s or one 100 ms bucket). Those features' shares are overstated: the ledger's
about twice, leased admission's more (it takes the exact path far more often). The
figure is for comparing one commit with another on the same code path, and the proxy with
the floor; ``bench.py`` stays the measure of CPU time. ``--variants`` takes the proxy
configurations of ``features.py``. Only 127.0.0.1 is used.

Usage: ``python loadtests/instructions.py [--modes non-stream,stream] [--variants all,...]
[--out FILE]`` (about half a minute per target and mode). Needs valgrind (``vgdb``) and
redis-server.
"""

from __future__ import annotations

import argparse
import http.client
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import stack  # noqa: E402
from bench import MODES, bodies  # noqa: E402
from features import VARIANTS, policies_for  # noqa: E402

__all__ = ["Count", "control", "count_requests", "dump_total", "instructions_of", "main", "render", "send_requests"]

_TOTALS = re.compile(rb"^(?:summary|totals):\s*(\d+)", re.MULTILINE)


@dataclass(frozen=True)
class Count:
    """One measured row: instructions over ``requests`` requests that took ``seconds``, and
    the process's instructions per second when idle (its timers), measured right after."""

    target: str
    mode: str
    requests: int
    instructions: int
    seconds: float
    idle_per_s: float

    @property
    def idle_share(self) -> float:
        """Instructions per request that an idle process would have spent in the same time."""
        return self.idle_per_s * self.seconds / self.requests

    @property
    def per_request(self) -> float:
        """Instructions per request."""
        return self.instructions / self.requests


def instructions_of(dump: bytes) -> int:
    """The instruction total of a callgrind dump (its ``summary:`` or ``totals:`` line)."""
    found = _TOTALS.search(dump)
    if found is None:
        raise ValueError("not a callgrind dump: no summary or totals line")
    return int(found.group(1))


def send_requests(url: str, path: str, bodies_: Sequence[bytes], keys: Sequence[str], count: int) -> None:
    """``count`` requests, one at a time on one keep-alive connection, rotating bodies and
    keys; raises ``RuntimeError`` on any status but 200 (each response is read to its end)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    try:
        for i in range(count):
            body = bodies_[i % len(bodies_)]
            headers = {"content-type": "application/json", "authorization": f"Bearer {keys[i % len(keys)]}"}
            conn.request("POST", path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
            if response.status != 200:
                raise RuntimeError(f"{path} answered {response.status}: {data[:300]!r}")
    finally:
        conn.close()


@contextmanager
def under_callgrind(
    argv: Sequence[str], port: int, ready_path: str, env: dict[str, str], workdir: Path
) -> Iterator[tuple[int, str]]:
    """``argv`` served under callgrind, instrumentation off; yields ``(pid, base url)``.
    Startup and shutdown run about 10x slower than without valgrind."""
    out = workdir / "callgrind.%p"
    cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}", *argv]
    log = workdir / "served.log"
    with stack.child(cmd, port, ready_path, env, log, ready_timeout_s=600, stop_timeout_s=120) as proc:
        yield proc.pid, proc.url


def control(pid: int, *command: str) -> None:
    """Send a callgrind monitor command (``instrumentation on``, ``zero``, ``dump``) to
    ``pid`` through ``vgdb``; returns once it ran. Raises ``RuntimeError`` when vgdb could
    not reach the process (``callgrind_control`` would exit 0 even then)."""
    done = subprocess.run(["vgdb", f"--pid={pid}", *command], capture_output=True, timeout=300, check=False)
    if done.returncode != 0:
        output = (done.stdout + done.stderr).decode(errors="replace").strip()
        raise RuntimeError(f"vgdb {' '.join(command)} failed for pid {pid}: {output}")


def dump_total(pid: int, workdir: Path) -> int:
    """Dump ``pid``'s counters into ``workdir`` (``callgrind.<pid>.<n>``; the empty
    ``callgrind.<pid>`` callgrind made at startup is left alone) and return the
    instructions counted since the last zero or dump. The dump file is removed."""
    before = set(workdir.glob("callgrind.*"))
    control(pid, "dump")
    dumps = set(workdir.glob("callgrind.*")) - before
    if not dumps:
        raise RuntimeError("callgrind wrote no dump")
    total = sum(instructions_of(dump.read_bytes()) for dump in dumps)
    for dump in dumps:
        dump.unlink()
    if total <= 0:
        raise RuntimeError("the dump counted no instructions: was instrumentation on?")
    return total


def count_requests(
    pid: int,
    url: str,
    path: str,
    bodies_: Sequence[bytes],
    keys: Sequence[str],
    warmup: int,
    requests: int,
    workdir: Path,
    idle_s: float = 3.0,
) -> tuple[int, float, float]:
    """``(instructions, seconds, idle instructions per second)``: what the process ``pid``
    executed for ``requests`` requests sent after ``warmup`` and how long that took, then
    what it executes per second when left idle for ``idle_s`` (its timers, and the last
    requests' batched work). Each window runs from one counter reset to the next dump."""
    send_requests(url, path, bodies_, keys, warmup)
    control(pid, "instrumentation", "on")
    control(pid, "zero")
    started = time.monotonic()
    send_requests(url, path, bodies_, keys, requests)
    total = dump_total(pid, workdir)  # a dump also resets the counters
    idle_from = time.monotonic()
    seconds = idle_from - started
    time.sleep(idle_s)
    idle = dump_total(pid, workdir)
    idle_per_s = idle / (time.monotonic() - idle_from)
    control(pid, "instrumentation", "off")
    return total, seconds, idle_per_s


def run(args: argparse.Namespace) -> list[Count]:
    """Count every target, mode and variant ``args`` names; the rows in that order."""
    for tool in ("valgrind", "vgdb"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found (apt-get install -y valgrind)")
    counts: list[Count] = []
    with tempfile.TemporaryDirectory(prefix="proxy-instructions-") as tmp, ExitStack() as stack_:
        workdir = Path(tmp)
        redis = stack_.enter_context(stack.redis(None))
        emulator = stack_.enter_context(stack.emulator(None))
        upstream = f"{emulator.url}/api/v1"
        rows: list[tuple[str, Path | None, dict[str, str], list[str]]] = []  # name, config, env, keys
        if "floor" in args.targets:
            rows.append(("floor (aiohttp)", None, {}, ["floor"]))  # the emulator takes any key
        if "proxy" in args.targets:
            for variant_name in args.variants:
                variant = VARIANTS[variant_name]
                folder = workdir / variant_name
                policies = policies_for(folder / "src", variant.policies)
                overrides = {"limits": {"admission": args.admission}, **variant.overrides}
                config, vkeys = stack.write_config(folder, stack.BENCH_KEYS, overrides, policies)
                store = {"redis": redis.url, "memory": None}[variant.store]
                name = "proxy (all features)" if variant_name == "all" else f"proxy: {variant_name}"
                rows.append((name, config, stack.proxy_env(upstream, store), [k.secret for k in vkeys]))
        for name, config, env, keys in rows:
            for mode in args.modes:
                port = stack.free_port()
                argv = stack.passthrough_argv(port, upstream) if config is None else stack.proxy_argv(port, config)
                served = workdir / f"{len(counts)}-{mode}"
                served.mkdir()
                with under_callgrind(argv, port, "/healthz", env, served) as (pid, url):
                    total, seconds, idle_per_s = count_requests(
                        pid, url, "/v1/chat/completions", bodies(mode), keys, args.warmup, args.requests, served
                    )
                count = Count(name, mode, args.requests, total, seconds, idle_per_s)
                counts.append(count)
                print(
                    f"{name:22} {mode:10} {count.per_request / 1e6:6.3f} M instructions/request "
                    f"({count.idle_share / 1e6:.3f} M of them idle timers)",
                    flush=True,
                )
    return counts


def render(counts: Sequence[Count], args: argparse.Namespace) -> str:
    """The markdown report: one row per count, with its ratio to the floor of its mode."""
    floors = {c.mode: c.per_request for c in counts if c.target.startswith("floor")}
    lines = [
        "# Instructions per request (callgrind)",
        "",
        f"`loadtests/instructions.py`: {args.warmup} warm-up requests, then {args.requests} counted, one at a time "
        f"on one keep-alive connection; limits.admission: {args.admission}. Periodic tasks are overstated "
        "(the module docstring says why); compare commits and targets, not seconds.",
        "",
        "| target | mode | M instructions / request | of which idle timers | vs floor |",
        "|---|---|---:|---:|---:|",
    ]
    for c in counts:
        floor = floors.get(c.mode)
        ratio = f"{c.per_request / floor:.2f}x" if floor and not c.target.startswith("floor") else "-"
        lines.append(f"| {c.target} | {c.mode} | {c.per_request / 1e6:.3f} | {c.idle_share / 1e6:.3f} | {ratio} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (``main`` refuses unknown modes, targets and variants)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default=",".join(MODES), type=lambda s: s.split(","))
    parser.add_argument("--targets", default="floor,proxy", type=lambda s: s.split(","))
    parser.add_argument(
        "--variants",
        default="all",
        type=lambda s: s.split(","),
        help="the proxy's configurations, from features.py (not redis-cluster): " + ", ".join(VARIANTS),
    )
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--admission", choices=("exact", "leased"), default="leased")
    parser.add_argument("--out", type=Path, help="also write the report to this markdown file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS or VARIANTS[v].store == "cluster"]
    unknown += [m for m in args.modes if m not in MODES]
    unknown += [t for t in args.targets if t not in ("floor", "proxy")]
    if unknown:
        raise SystemExit(f"unknown or unsupported: {', '.join(unknown)}")
    report = render(run(args), args)
    print(report)
    if args.out:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
