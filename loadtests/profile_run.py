"""Profile the proxy under benchmark load with py-spy, and rank its hot spots.

``bench.py --profile DIR`` calls ``profile_target`` while the featured proxy runs: py-spy
samples the proxy's pid (``--nonblocking``, so the proxy is never paused; ``--gil``, so only
work holding the interpreter counts)
while wrk drives it at 16 connections, streamed then not, and writes a flame graph
(``profile.svg``) and the raw collapsed stacks (``profile.txt``). ``hotspots`` reads
collapsed stacks and ranks functions by *self* samples and by *inclusive* samples, the
latter for the proxy's own code (``proxy/``) only, which is where changes can be made.
Standalone::

    .venv/bin/python loadtests/profile_run.py loadtests/results/profile.txt
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import measure

if TYPE_CHECKING:
    from bench import Bench, Target

PY_SPY = Path(sys.executable).with_name("py-spy")
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::\d+)?\)$")


def _record(pid: int, seconds: float, out: Path, fmt: str) -> subprocess.Popen[bytes]:
    argv = [str(PY_SPY), "record", "--pid", str(pid), "--duration", f"{seconds:.0f}", "--rate", "200"]
    # --gil: only the thread holding the GIL is sampled, so idle waits (the request log's
    # queue thread, a blocked selector) are not counted as work.
    argv += ["--nonblocking", "--gil", "--format", fmt, "--output", str(out)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def profile_target(bench: Bench, target: Target, folder: Path, seconds: float = 20) -> None:
    """Sample ``target`` (its first pid) for ``seconds`` under wrk load, both modes."""
    py_spy = str(PY_SPY) if PY_SPY.exists() else shutil.which("py-spy")
    if py_spy is None:
        print("  profile: py-spy not installed (.venv/bin/pip install py-spy); skipped", file=sys.stderr)
        return
    folder.mkdir(parents=True, exist_ok=True)
    pid = target.pids[0]
    raw = _record(pid, seconds, folder / "profile.txt", "raw")
    svg = _record(pid, seconds, folder / "profile.svg", "flamegraph")

    def load() -> None:
        for mode in ("non-stream", "stream"):
            stats = measure.run_wrk(target.url, target.luas[mode], 16, seconds / 2 + 1, bench.args.load_cpus)
            target.served += stats.requests

    driver = threading.Thread(target=load)
    driver.start()
    driver.join()
    for proc in (raw, svg):
        _, err = proc.communicate(timeout=60)
        if proc.returncode:
            print(f"  profile: py-spy failed: {err.decode(errors='replace')[-500:]}", file=sys.stderr)
    if (folder / "profile.txt").exists():
        print(hotspots((folder / "profile.txt").read_text().splitlines()), file=sys.stderr)


def _frames(stack: str) -> list[tuple[str, str]]:
    frames = []
    for frame in stack.split(";"):
        match = _FRAME.match(frame.strip())
        if match:
            frames.append((match["func"], match["file"]))
        else:
            frames.append((frame.strip(), "?"))
    return frames


def _short(path: str) -> str:
    for marker in ("site-packages/", "/proxy/", "python3.11/"):
        if marker in path:
            tail = path.split(marker, 1)[1]
            return ("proxy/" + tail) if marker == "/proxy/" else tail
    return path


def _package(path: str) -> str:
    """``proxy/limits``, ``proxy/pipeline.py``, or the library's top-level package."""
    short = _short(path)
    parts = short.split("/")
    if parts[0] == "proxy":
        return "/".join(parts[:2])
    return parts[0].removesuffix(".py") if len(parts) > 1 else short.removesuffix(".py")


def _frame_name(func: str, file: str) -> str:
    return f"{func} ({_short(file)})"


def hotspots(lines: Iterable[str], top: int = 25) -> str:
    """Markdown: top functions by self samples, and the proxy's by inclusive samples."""
    self_counts: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    total = 0
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = _frames(stack)
        func, file = frames[-1]
        self_counts[_frame_name(func, file)] += count
        packages[_package(file)] += count
        seen = set()
        for func, file in frames:
            name = _frame_name(func, file)
            own = file.startswith("proxy/") or "/proxy/" in file
            if own and not file.endswith(("cli.py", "emulator/")) and name not in seen:
                seen.add(name)
                inclusive[name] += count
    if not total:
        return "no samples"
    out = [f"{total} samples", "", "| self % | package or module |", "|---:|---|"]
    out += [f"| {n / total * 100:.1f} | `{name}` |" for name, n in packages.most_common(top)]
    out += ["", "| self % | function |", "|---:|---|"]
    out += [f"| {n / total * 100:.1f} | `{name}` |" for name, n in self_counts.most_common(top)]
    out += ["", "| inclusive % | proxy function |", "|---:|---|"]
    out += [f"| {n / total * 100:.1f} | `{name}` |" for name, n in inclusive.most_common(top)]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description="Rank hot spots in py-spy raw (collapsed) stacks.")
    parser.add_argument("raw", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    print(hotspots(args.raw.read_text().splitlines(), args.top))


if __name__ == "__main__":
    main()
