"""Run ``locustfile.py`` headless against a local stack: emulator, Redis, proxy.

Starts the OpenRouter emulator, a throw-away redis-server and the proxy with every feature
on (``stack.py``: 8 keys with generous limits, 2 keys of a tight tier), runs locust for
``--run-time`` and stops everything. Locust prints its summary and exits non-zero when a
request failed (an expected 429 or fault outcome is not a failure)::

    .venv/bin/python loadtests/run_locust.py --users 20 --run-time 30s
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import stack


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--spawn-rate", type=float, default=10)
    parser.add_argument("--run-time", default="30s", help="locust --run-time, e.g. 30s, 2m")
    parser.add_argument("--workers", type=int, default=1, help="proxy workers")
    args = parser.parse_args()
    locust = Path(sys.executable).with_name("locust")
    if not locust.exists():
        raise SystemExit("locust is not installed: .venv/bin/pip install -e '.[load]'")
    with tempfile.TemporaryDirectory(prefix="proxy-locust-") as tmp:
        config, keys = stack.write_config(Path(tmp))
        with stack.redis(None) as redis, stack.emulator(None) as emulator:
            env = stack.proxy_env(f"{emulator.url}/api/v1", redis.url)
            with stack.proxy(None, config, env, workers=args.workers) as proxy:
                load_env = {
                    **os.environ,
                    "LOAD_KEYS": ",".join(k.secret for k in keys if k.tier != "tight"),
                    "LOAD_LIMITED_KEYS": ",".join(k.secret for k in keys if k.tier == "tight"),
                    "LOAD_EMULATOR": "1",
                }
                argv = [
                    str(locust),
                    "-f",
                    str(stack.HERE / "locustfile.py"),
                    "--headless",
                    "--host",
                    proxy.url,
                    "--users",
                    str(args.users),
                    "--spawn-rate",
                    str(args.spawn_rate),
                    "--run-time",
                    args.run_time,
                    "--stop-timeout",
                    "10",
                    "--only-summary",
                ]
                result = subprocess.run(argv, env=load_env, timeout=_seconds(args.run_time) + 120, check=False)
            log = Path(tmp, "proxy.log").read_text(errors="replace").splitlines()
            problems = [line for line in log if " ERROR " in line or "Traceback" in line]
            print(f"proxy log: {len(log)} lines, {len(problems)} errors")
            for line in problems[:10]:
                print("  " + line[:300])
    return result.returncode


def _seconds(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    total, number = 0.0, ""
    for char in text:
        if char.isdigit():
            number += char
        elif char in units and number:
            total, number = total + int(number) * units[char], ""
    return total + (int(number) if number else 0)


if __name__ == "__main__":
    raise SystemExit(main())
