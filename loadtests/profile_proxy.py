"""Profile one pass-through client variant in-process while wrk drives it.

Runs ``passthrough.PassThrough`` on uvicorn (uvloop, httptools) in this process
under cProfile or pyinstrument, with the mock upstream and wrk as pinned
subprocesses, and reports where the per-request time goes::

    python loadtests/profile_proxy.py --client httpx-aiohttp --mode non-stream

cProfile output: own time per package (µs/request) and the top functions.  Its
instrumentation overhead inflates call-heavy code, so read the split, not the
absolute numbers; compare with ``client_bench.py`` for real CPU costs.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import json
import os
import pstats
import sys
import tempfile
import threading
import time
from pathlib import Path

import uvicorn
from client_bench import BODIES, HERE, LUA_TEMPLATE, PYTHON, free_port, pinned, process, run_wrk, wait_ready
from passthrough import CLIENTS, PassThrough

_PACKAGES = ("httpx_aiohttp", "httpx", "httpcore", "aiohttp", "yarl", "multidict", "uvicorn", "h11", "anyio")


def package_of(filename: str) -> str:
    if "site-packages/" in filename:
        return filename.split("site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
    if filename.startswith("~") or filename.startswith("<"):
        return "builtins/C"
    if "/loadtests/" in filename:
        return "loadtests"
    return "stdlib:" + Path(filename).stem


def report_cprofile(profile: cProfile.Profile, requests: int, top: int) -> str:
    stats = pstats.Stats(profile)
    raw: dict[tuple[str, int, str], tuple[int, int, float, float, object]] = stats.stats  # type: ignore[attr-defined]
    own: collections.defaultdict[str, float] = collections.defaultdict(float)
    for (filename, _line, _name), (_cc, _nc, tottime, _ct, _callers) in raw.items():
        own[package_of(filename)] += tottime
    total = sum(own.values())
    lines = [
        f"requests: {requests}, profiled time: {total:.2f} s, {total * 1e6 / requests:.0f} µs/request",
        "",
    ]
    lines.append("| package | own µs/req | share |")
    lines.append("|---|---:|---:|")
    for package, seconds in sorted(own.items(), key=lambda kv: kv[1], reverse=True)[:25]:
        lines.append(f"| {package} | {seconds * 1e6 / requests:.1f} | {seconds / total:.1%} |")
    lines.append("")
    lines.append(f"top {top} functions by own time (µs/request, calls/request):")
    ranked = sorted(raw.items(), key=lambda item: item[1][2], reverse=True)[:top]
    for (filename, line, name), (_cc, ncalls, tottime, cumtime, _callers) in ranked:
        where = f"{package_of(filename)}:{Path(filename).name}:{line}"
        lines.append(
            f"  {tottime * 1e6 / requests:7.1f} own {cumtime * 1e6 / requests:8.1f} cum "
            f"{ncalls / requests:5.1f}x  {name}  ({where})"
        )
    lines.append("")
    lines.append("cumulative µs/request of httpx-side entry points:")
    for (filename, line, name), (_cc, ncalls, _tt, cumtime, _callers) in raw.items():
        if package_of(filename) in _PACKAGES[:3] and name in _ENTRY_POINTS:
            lines.append(
                f"  {cumtime * 1e6 / requests:8.1f} cum {ncalls / requests:5.1f}x  {name}  "
                f"({package_of(filename)}:{Path(filename).name}:{line})"
            )
    return "\n".join(lines)


_ENTRY_POINTS = {
    "build_request",
    "send",
    "_send_handling_auth",
    "_send_handling_redirects",
    "_send_single_request",
    "extract_cookies",
    "handle_async_request",
    "__init__",
    "_merge_headers",
    "_merge_url",
    "aclose",
    "aiter_raw",
    "aiter_bytes",
    "encode_request",
    "stream",
    "__aenter__",
    "__aexit__",
    "request",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--client", choices=sorted(CLIENTS), default="httpx-aiohttp")
    parser.add_argument("--mode", choices=sorted(BODIES), default="non-stream")
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--profiler", choices=("cprofile", "pyinstrument"), default="cprofile")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--out", type=Path, help="also write the report here")
    args = parser.parse_args()

    os.sched_setaffinity(0, {0})
    body = json.dumps(BODIES[args.mode], separators=(",", ":"))
    with tempfile.TemporaryDirectory(prefix="profile-proxy-") as tmp:
        lua = Path(tmp) / "load.lua"
        lua.write_text(LUA_TEMPLATE.format(body=body))
        mock_port, port = free_port(), free_port()
        mock_argv = [PYTHON, str(HERE / "mock_upstream.py"), "--port", str(mock_port)]
        with process(pinned("1", mock_argv)):
            wait_ready(f"http://127.0.0.1:{mock_port}/api/v1/chat/completions", body.encode())
            app = PassThrough(args.client, f"http://127.0.0.1:{mock_port}/api/v1", "sk-or-profile")
            config = uvicorn.Config(
                app,
                host="127.0.0.1",
                port=port,
                loop="uvloop",
                http="httptools",
                log_level="warning",
                access_log=False,
                lifespan="on",
            )
            server = uvicorn.Server(config)
            stats: dict[str, float] = {}

            def drive() -> None:
                try:
                    url = f"http://127.0.0.1:{port}/v1/chat/completions"
                    wait_ready(url, body.encode())
                    warm = run_wrk(url, lua, args.connections, 1.0, "1")
                    stats.update(run_wrk(url, lua, args.connections, args.duration, "1"))
                    stats["requests"] += warm["requests"]  # the profile covers the warm-up too
                finally:
                    server.should_exit = True

            driver = threading.Thread(target=drive, daemon=True)
            driver.start()
            started = time.perf_counter()
            if args.profiler == "cprofile":
                profile = cProfile.Profile()
                profile.enable()
                server.run()
                profile.disable()
                driver.join()
                requests = int(stats.get("requests", 0)) or 1
                report = report_cprofile(profile, requests, args.top)
            else:
                from pyinstrument import Profiler

                profiler = Profiler(interval=0.0002, async_mode="disabled")
                profiler.start()
                server.run()
                profiler.stop()
                driver.join()
                requests = int(stats.get("requests", 0)) or 1
                report = f"requests: {requests}\n" + profiler.output_text(unicode=True, show_all=False)
    header = (
        f"# {args.client} {args.mode} c={args.connections} ({args.profiler}, "
        f"{time.perf_counter() - started:.0f} s wall, {stats.get('requests', 0):.0f} requests)\n"
    )
    print(header + report)
    if args.out:
        args.out.write_text(header + report + "\n")
    sys.exit(0)


if __name__ == "__main__":
    main()
