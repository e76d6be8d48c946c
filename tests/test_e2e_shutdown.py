"""SIGTERM during 50 streams: every stream finishes and every request is recorded."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson

from .factories import free_port

REPO = Path(__file__).resolve().parents[1]


def test_sigterm_drains_in_flight_streams_and_flushes_records(tmp_path: Path) -> None:
    shutil.copy(REPO / "config.yaml", tmp_path / "config.yaml")
    shutil.copytree(REPO / "policies", tmp_path / "policies")
    (tmp_path / "policies" / "limits.yaml").unlink(missing_ok=True)  # 50 parallel streams from one dev key
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("OPENROUTER_API_KEY", "REDIS_URL", "PROXY_DEV_KEY_SHA256")}
    exe = Path(sys.executable).with_name("openrouter-proxy")
    with subprocess.Popen(
        [str(exe), "serve", "--upstream", "emulator", "--port", str(port), "--config", str(tmp_path / "config.yaml")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=tmp_path,
    ) as proc:
        assert proc.stdout is not None
        output = b""
        deadline = time.monotonic() + 20
        while b"Application startup complete" not in output and time.monotonic() < deadline:
            output += proc.stdout.readline()
        key = re.search(rb"sk-proxy-[A-Za-z0-9_-]+", output)
        assert key is not None, output.decode(errors="replace")

        async def one(client: httpx.AsyncClient) -> bytes:
            payload = {
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": "hi"}],
                "stream": True,
                "emulator": {"chunk_delay_ms": 40, "completion_tokens": 25},
            }
            async with client.stream("POST", "/v1/chat/completions", json=payload) as response:
                assert response.status_code == 200
                return b"".join([chunk async for chunk in response.aiter_raw()])

        async def main() -> list[bytes]:
            limits = httpx.Limits(max_connections=60)
            headers = {"Authorization": f"Bearer {key.group(0).decode()}"}
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}", headers=headers, limits=limits, timeout=30
            ) as client:
                tasks = [asyncio.create_task(one(client)) for _ in range(50)]
                await asyncio.sleep(0.4)  # all 50 are mid-stream
                proc.send_signal(signal.SIGTERM)
                return await asyncio.gather(*tasks)

        bodies = asyncio.run(main())
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after draining
    assert len(bodies) == 50
    assert all(b.endswith(b"data: [DONE]\n\n") for b in bodies)
    records = [orjson.loads(line) for line in (tmp_path / "var" / "usage.jsonl").read_bytes().splitlines()]
    assert len(records) == 50
    assert all(r["status"] == 200 and r["done"] is True and r["completion_tokens"] == 25 for r in records)
