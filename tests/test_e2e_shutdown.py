"""SIGTERM during 50 streams: every stream finishes and every request is recorded."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import httpx
import orjson

from .factories import served_cli

REPO = Path(__file__).resolve().parents[1]


def test_sigterm_drains_in_flight_streams_and_flushes_records(tmp_path: Path) -> None:
    # no limits: 50 parallel streams from one dev key
    with served_cli(tmp_path, limits=False) as served:

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
            headers = {"Authorization": f"Bearer {served.key}"}
            async with httpx.AsyncClient(base_url=served.url, headers=headers, limits=limits, timeout=30) as client:
                tasks = [asyncio.create_task(one(client)) for _ in range(50)]
                await asyncio.sleep(0.4)  # all 50 are mid-stream
                served.proc.send_signal(signal.SIGTERM)
                return await asyncio.gather(*tasks)

        bodies = asyncio.run(main())
        assert served.proc.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after draining
    assert len(bodies) == 50
    assert all(b.endswith(b"data: [DONE]\n\n") for b in bodies)
    records = [orjson.loads(line) for line in (tmp_path / "var" / "usage.jsonl").read_bytes().splitlines()]
    assert len(records) == 50
    assert all(r["status"] == 200 and r["done"] is True and r["completion_tokens"] == 25 for r in records)
