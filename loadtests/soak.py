"""A bounded soak: minutes of mixed traffic with random upstream faults, then two checks.

Starts ``openrouter-proxy serve --upstream emulator`` (127.0.0.1, a free port, a temporary
config with the embedded store and limits no request reaches, so every request still
reserves and settles a window, a concurrency slot and a budget), drives ``--concurrency``
clients for ``--seconds`` with a mix of streamed and whole requests and random faults (502
then success, mid-stream errors, cut streams, stalls the client hangs up on, slow first
tokens), samples the proxy's RSS, stops it with SIGTERM, and checks:

* **RSS flat**: the highest RSS of the last third of the run stays within ``--rss-growth``
  (default 10 %) of the highest of the middle third (the first third is warm-up: the
  embedded store's bounded stream and ticket list fill up then);
* **every request accounted for**: the usage log holds exactly one record per request sent.

Exits 1 when a check fails. Everything goes to 127.0.0.1 and stops by itself::

    .venv/bin/python loadtests/soak.py --seconds 180 --concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
MIX = [  # (weight, stream, emulator controls, hang up after the first event)
    (40, True, {}, False),
    (25, False, {}, False),
    (8, False, {"fault": "error-502", "fail_times": 1}, False),
    (8, True, {"fault": "midstream-error"}, False),
    (6, True, {"fault": "cut"}, False),
    (6, True, {"fault": "stall", "stall_after": 2}, True),
    (4, True, {"fault": "error-503", "fail_times": 1, "retry_after": 0}, False),
    (3, False, {"first_byte_delay_ms": 50}, False),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def client(base: str, key: str, stop: float, counter: list[int], seed: int) -> None:
    rng = random.Random(seed)
    weights = [m[0] for m in MIX]
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
        while time.monotonic() < stop:
            _, stream, controls, hang_up = rng.choices(MIX, weights)[0]
            controls = {**controls, "fault_key": f"soak-{rng.random()}"} if "fail_times" in controls else controls
            body = {
                "model": rng.choice(["gpt-4o-mini", "openai/gpt-4o-mini", "claude-haiku"]),
                "messages": [{"role": "user", "content": "soak " * rng.randint(1, 200)}],
                "stream": stream,
                "emulator": {**controls, "completion_tokens": rng.randint(5, 60)},
            }
            counter[0] += 1
            try:
                async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                    async for chunk in response.aiter_raw():
                        if hang_up and b"data: {" in chunk:
                            break
            except httpx.HTTPError:
                counter[1] += 1


async def drive(base: str, key: str, seconds: float, concurrency: int, pid: int, samples: list[float]) -> list[int]:
    stop = time.monotonic() + seconds
    counter = [0, 0]
    tasks = [asyncio.create_task(client(base, key, stop, counter, i)) for i in range(concurrency)]
    while time.monotonic() < stop:
        await asyncio.sleep(min(5.0, max(0.1, stop - time.monotonic())))
        samples.append(rss_mb(pid))
        print(f"  t={seconds - (stop - time.monotonic()):6.0f}s  requests={counter[0]:7d}  rss={samples[-1]:.1f} MB")
    await asyncio.gather(*tasks)
    return counter


SOAK_LIMITS = """\
default_tier: soak
tiers:
  soak:
    requests_per_minute: 60000000
    tokens_per_minute: 1000000000
    concurrent_requests: 10000
    budget_usd_per_day: 1000000
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rss-growth", type=float, default=0.10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        config = (
            (REPO / "config.yaml").read_text().replace("log_path: var/usage.jsonl", f"log_path: {folder}/usage.jsonl")
        )
        assert "request_log: stderr" in config
        (folder / "config.yaml").write_text(config.replace("request_log: stderr", "request_log: null"))
        (folder / "policies").mkdir()
        (folder / "policies" / "routing.yaml").write_text((REPO / "policies" / "routing.yaml").read_text())
        (folder / "policies" / "limits.yaml").write_text(SOAK_LIMITS)
        port = free_port()
        env = {k: v for k, v in os.environ.items() if k not in ("OPENROUTER_API_KEY", "REDIS_URL")}
        exe = Path(sys.executable).with_name("openrouter-proxy")
        log_path = folder / "proxy.log"
        with (
            log_path.open("wb") as log_file,
            subprocess.Popen(
                [
                    str(exe),
                    "serve",
                    "--upstream",
                    "emulator",
                    "--port",
                    str(port),
                    "--config",
                    str(folder / "config.yaml"),
                ],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
            ) as proc,
        ):
            deadline = time.monotonic() + 30
            while b"Application startup complete" not in log_path.read_bytes():
                if proc.poll() is not None or time.monotonic() > deadline:
                    print(log_path.read_text(errors="replace"))
                    return 1
                time.sleep(0.05)
            found = re.search(rb"sk-proxy-[A-Za-z0-9_-]+", log_path.read_bytes())
            assert found is not None
            samples: list[float] = []
            print(f"soak: {args.seconds:.0f} s, {args.concurrency} clients, proxy pid {proc.pid}")
            sent, transport_errors = asyncio.run(
                drive(
                    f"http://127.0.0.1:{port}",
                    found.group(0).decode(),
                    args.seconds,
                    args.concurrency,
                    proc.pid,
                    samples,
                )
            )
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        records = sum(1 for _ in (folder / "usage.jsonl").open("rb"))
    third = max(1, len(samples) // 3)
    warm = max(samples[third : 2 * third] or samples)
    tail = samples[-third:]
    grew = max(tail) / warm - 1 if warm else 0.0
    rss_ok = grew <= args.rss_growth
    accounted = records == sent
    print(f"requests sent {sent} (transport errors seen by clients: {transport_errors}), usage records {records}")
    print(f"RSS max in the middle third {warm:.1f} MB, in the last third {max(tail):.1f} MB ({grew:+.1%})")
    print(f"RSS flat: {'yes' if rss_ok else 'NO'}; every request accounted for: {'yes' if accounted else 'NO'}")
    return 0 if rss_ok and accounted else 1


if __name__ == "__main__":
    raise SystemExit(main())
