"""The usage log's writer: whole lines, whatever the disk does."""

from __future__ import annotations

import asyncio
import os
from decimal import Decimal
from pathlib import Path

import orjson
import pytest

from proxy import usagelog
from proxy.accounting import LedgerEntry
from proxy.usagelog import UsageLog

from .factories import usage_record


def _entry(key: str) -> LedgerEntry:
    return LedgerEntry(usage_record(key=key), Decimal("0.0001"), "upstream", False)


def test_lines_come_out_whole_through_short_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    monkeypatch.setattr(usagelog.os, "write", lambda fd, data: real_write(fd, bytes(data[:7])))

    async def run() -> None:
        log = UsageLog(tmp_path / "usage.jsonl", flush_interval_s=3600)
        await log.start()
        for i in range(50):
            log.emit_entry(_entry(f"key-{i}"))
        await log.close()

    asyncio.run(run())
    lines = (tmp_path / "usage.jsonl").read_bytes().splitlines()
    assert [orjson.loads(line)["key"] for line in lines] == [f"key-{i}" for i in range(50)]


def test_a_write_that_fails_part_way_costs_its_own_lines_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk that fills up in the middle of a line loses the rest of that flush; the next
    flush starts on a line of its own instead of finishing the broken one."""
    real_write = os.write
    calls = 0

    def failing_write(fd: int, data: bytes | memoryview) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            return real_write(fd, bytes(data[:40]))  # part of the first line
        if calls == 2:
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(usagelog.os, "write", failing_write)

    async def run() -> None:
        log = UsageLog(tmp_path / "usage.jsonl", flush_interval_s=3600)
        await log.start()
        log.emit_entry(_entry("lost-1"))
        log.emit_entry(_entry("lost-2"))
        log.flush()
        log.emit_entry(_entry("kept-1"))
        log.emit_entry(_entry("kept-2"))
        await log.close()

    asyncio.run(run())
    broken, *lines = (tmp_path / "usage.jsonl").read_bytes().splitlines()
    assert len(broken) == 40
    assert [orjson.loads(line)["key"] for line in lines] == ["kept-1", "kept-2"]
