"""Measuring a load run: wrk scripts and runs, CPU and memory from ``/proc``.

CPU time comes from the kernel's own accounting of each process tree (``utime + stime``
of ``/proc/<pid>/stat`` summed over the process and its live descendants, so uvicorn's
worker processes count), read before and after a run: on a shared machine that is the
stable figure, unlike wall-clock throughput. The machine's busy time (``/proc/stat``)
minus the CPU of every process of the run is the *foreign* load: other tenants' work
during the run, reported so that a noisy run can be recognised.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

# One pre-formatted request per (key, body) pair, cycled: several keys and prompt sizes.
LUA_TEMPLATE = """
local bodies = {bodies}
local keys = {keys}
local path = "{path}"
local requests = {{}}
local n = 0
init = function(args)
  for _, body in ipairs(bodies) do
    for _, key in ipairs(keys) do
      local headers = {{}}
      headers["Content-Type"] = "application/json"
      headers["Authorization"] = "Bearer " .. key
      requests[#requests + 1] = wrk.format("POST", path, headers, body)
    end
  end
end
request = function()
  n = n % #requests + 1
  return requests[n]
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {{"requests":%d,"duration_us":%d,"socket_errors":%d,"status_errors":%d,' ..
    '"p50_us":%d,"p99_us":%d,"mean_us":%.1f}}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99), latency.mean))
end
"""


@dataclass(frozen=True, slots=True)
class WrkStats:
    requests: int
    seconds: float
    socket_errors: int
    status_errors: int
    p50_us: float
    p99_us: float


def _lua_string(text: str) -> str:
    return "[==[" + text + "]==]"


def write_lua(path: Path, url_path: str, bodies: Sequence[bytes], keys: Sequence[str]) -> Path:
    """A wrk script cycling through every (body, key) pair."""
    path.write_text(
        LUA_TEMPLATE.format(
            bodies="{" + ", ".join(_lua_string(b.decode()) for b in bodies) + "}",
            keys="{" + ", ".join(_lua_string(k) for k in keys) + "}",
            path=url_path,
        )
    )
    return path


def run_wrk(url: str, lua: Path, connections: int, seconds: float, cpus: str | None) -> WrkStats:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "10s", "-s", str(lua), url]
    if cpus:
        argv = ["taskset", "-c", cpus, *argv]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    for line in out.splitlines():
        if line.startswith("WRKJSON "):
            raw = json.loads(line.removeprefix("WRKJSON "))
            return WrkStats(
                requests=int(raw["requests"]),
                seconds=raw["duration_us"] / 1e6,
                socket_errors=int(raw["socket_errors"]),
                status_errors=int(raw["status_errors"]),
                p50_us=float(raw["p50_us"]),
                p99_us=float(raw["p99_us"]),
            )
    raise RuntimeError(f"no summary in wrk output:\n{out}")


# ----------------------------------------------------------------------------- /proc


def _stat_fields(pid: int) -> list[str]:
    stat = Path(f"/proc/{pid}/stat").read_text()
    # Fields after the command name; fields[0] is field 3 (state), fields[1] is ppid.
    return stat[stat.rindex(")") + 2 :].split()


def tree(pid: int) -> list[int]:
    """``pid`` and its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(_stat_fields(int(entry))[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, ()))
    return found


def process_cpu(pids: Sequence[int]) -> dict[int, float]:
    """utime + stime of each live one of ``pids`` (not their children), in seconds."""
    out = {}
    for pid in pids:
        try:
            fields = _stat_fields(pid)
        except OSError:
            continue
        out[pid] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of the process trees rooted at ``pids``, in seconds."""
    return sum(sum(process_cpu(tree(root)).values()) for root in pids)


def rss_bytes(pid: int) -> int:
    """Resident memory of the process tree rooted at ``pid``."""
    total = 0
    for member in tree(pid):
        try:
            total += int(Path(f"/proc/{member}/statm").read_text().split()[1]) * PAGE
        except OSError:
            continue
    return total


def system_busy_seconds() -> float:
    """Busy CPU time of the whole machine (all CPUs), from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / CLK_TCK


def own_cpu_seconds() -> float:
    """CPU of this process and its reaped children (wrk runs)."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


class StatusLog:
    """Counts the statuses of the usage-log lines written since the last call."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._offset = path.stat().st_size if path.exists() else 0

    def take(self) -> Counter[int]:
        counts: Counter[int] = Counter()
        if not self._path.exists():
            return counts
        with self._path.open("rb") as handle:
            handle.seek(self._offset)
            data = handle.read()
        end = data.rfind(b"\n") + 1
        self._offset += end
        for line in data[:end].splitlines():
            try:
                counts[int(orjson.loads(line).get("status", 0))] += 1
            except (orjson.JSONDecodeError, TypeError, ValueError, AttributeError):
                counts[0] += 1
        return counts
