"""Helpers for the ledger, exporter, report, metrics and health tests (factories, no globals)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
import orjson

from proxy.auth import hash_key
from proxy.types import UsageRecord

from .conftest import ALICE_KEY, BOB_KEY, ProxyUnderTest
from .factories import usage_record

ADMIN_KEY = "sk-admin-test-key-for-usage-reports-000000"
KINDS = ("stream", "whole", "cut", "failed")
MESSAGES: Any = [{"role": "user", "content": "How long is the Rhine?"}]
T = TypeVar("T")


def ledger_config(
    *, redis_url: str | None = None, export_dir: str | None = "export", request_log: str = "requests.jsonl"
) -> str:
    """Config lines (appended to conftest's config) for a fast ledger, reconciler and exporter."""
    lines = [
        "admin:",
        f"  key_sha256: {hash_key(ADMIN_KEY)}",
        "ledger:",
        "  flush_interval_s: 0.02",
        "  reconcile_interval_s: 0.05",
        "  reconcile_first_delay_s: 0.02",
        "  export_interval_s: 0.05",
    ]
    if export_dir is not None:
        lines.append(f"  export_dir: {export_dir}")
    lines += ["logging:", f"  request_log: {request_log}"]
    if redis_url is not None:
        lines += ["store:", f"  redis_url: {redis_url}"]
    return "\n".join(lines) + "\n"


def wait_for(probe: Callable[[], T | None], timeout: float = 20.0, what: str = "condition") -> T:
    """Poll ``probe`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def exported(directory: Path) -> list[dict[str, Any]]:
    """Every line of the exporter's files, in file order."""
    lines: list[dict[str, Any]] = []
    for path in sorted(directory.glob("usage-*.jsonl")):
        lines.extend(orjson.loads(line) for line in path.read_bytes().splitlines())
    return lines


def admin_usage(proxy: ProxyUnderTest, by: str, since: str = "1d") -> dict[str, Any]:
    response = httpx.get(
        f"{proxy.url}/admin/usage", params={"by": by, "since": since}, headers={"authorization": f"Bearer {ADMIN_KEY}"}
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def record(*, key: str = "alice", **fields: Any) -> UsageRecord:
    """A ``UsageRecord`` (``tests.factories.usage_record``) whose team follows the key."""
    return usage_record(key=key, team="research" if key == "alice" else "web", **fields)


async def fire(proxy: ProxyUnderTest, count: int, prefix: str = "ledger") -> None:
    """``count`` concurrent requests, one kind after the other: streamed, whole, cut, failed."""
    clients = {
        key: openai.AsyncOpenAI(base_url=proxy.base_url, api_key=key, max_retries=0, timeout=20)
        for key in (ALICE_KEY, BOB_KEY)
    }

    async def one(i: int) -> None:
        kind = KINDS[i % 4]
        client = clients[ALICE_KEY if i % 2 == 0 else BOB_KEY]
        extra_body = {"emulator": {"fault": "cut"}} if kind == "cut" else {}
        if kind == "failed":
            extra_body = {"emulator": {"fault": "error-502"}}
        headers = {"x-request-id": f"{prefix}-{i}"}
        try:
            if kind in ("stream", "cut"):
                stream = await client.chat.completions.create(
                    model="gpt-4o-mini", messages=MESSAGES, stream=True, extra_headers=headers, extra_body=extra_body
                )
                async for _ in stream:
                    pass
            else:
                await client.chat.completions.create(
                    model="gpt-4o-mini", messages=MESSAGES, extra_headers=headers, extra_body=extra_body
                )
        except openai.APIError:
            assert kind in ("cut", "failed")

    try:
        await asyncio.gather(*(one(i) for i in range(count)))
    finally:
        for client in clients.values():
            await client.close()
