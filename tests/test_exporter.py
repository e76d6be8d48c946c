"""The exporter delivers every ledger entry exactly once and in order, whatever it crashed on."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from proxy.accounting import account, write_of
from proxy.exporter import Exporter, ExportLocked
from proxy.store import Retention, open_store
from proxy.store.usage import UsageLedger
from proxy.store.usage_memory import MemoryUsage
from proxy.types import Usage

from .usage_fixtures import record

EXE = Path(sys.executable).with_name("openrouter-proxy")


async def fill(usage: UsageLedger, count: int, batch: int = 500) -> list[str]:
    """``count`` request entries; their stream ids."""
    ids: list[str] = []
    line = account(record(usage=Usage(prompt_tokens=3, completion_tokens=4, cost_usd=0.001)), lambda m: None).line()
    for start in range(0, count, batch):
        writes = [write_of({**line, "request_id": f"r{i}"}) for i in range(start, min(start + batch, count))]
        ids += [i for i in await usage.append(writes, Retention(max_entries=None)) if i]
    return ids


def exported_ids(directory: Path) -> list[str]:
    ids = []
    for path in sorted(directory.glob("usage-*.jsonl"), key=_file_order):
        for line in path.read_bytes().splitlines():
            obj = orjson.loads(line)
            assert obj["request_id"].startswith("r") and obj["type"] == "request"
            ids.append(obj["id"])
    return ids


def _file_order(path: Path) -> tuple[str, int]:
    stem = path.name.removeprefix("usage-").removesuffix(".jsonl")
    day, _, part = stem.partition(".")
    return day, int(part or 0)


def test_files_rotate_by_size_and_hold_each_entry_once_in_order(tmp_path: Path) -> None:
    async def main() -> list[str]:
        usage = MemoryUsage()
        ids = await fill(usage, 1200)
        exporter = Exporter(usage, tmp_path, max_file_bytes=64 * 1024, batch_size=100, fsync=False)
        assert exporter.open() == "0-0"
        assert await exporter.drain() == 1200
        exporter.close()
        again = Exporter(usage, tmp_path)
        assert again.open() == ids[-1]  # resumes after the last line, exports nothing twice
        assert await again.drain() == 0
        again.close()
        return ids

    ids = asyncio.run(main())
    files = sorted(tmp_path.glob("usage-*.jsonl"), key=_file_order)
    assert len(files) > 3 and all(f.stat().st_size <= 64 * 1024 for f in files)
    assert exported_ids(tmp_path) == ids


def test_a_crash_at_any_byte_of_a_write_loses_nothing_and_repeats_nothing(tmp_path: Path) -> None:
    """Simulate the process dying after any prefix of the file reached the disk; resume."""

    async def main() -> None:
        usage = MemoryUsage()
        ids = await fill(usage, 40)
        reference = tmp_path / "reference"
        full = Exporter(usage, reference, fsync=False)
        full.open()
        await full.drain()
        full.close()
        data = next(reference.glob("usage-*.jsonl")).read_bytes()
        cuts = sorted({0, len(data)} | {i + d for i, b in enumerate(data) if b == 0x0A for d in (-1, 0, 1, 7)})
        for cut in cuts:
            run = tmp_path / f"cut-{cut}"
            run.mkdir()
            if cut:
                (run / next(reference.glob("usage-*.jsonl")).name).write_bytes(data[: min(cut, len(data))])
            exporter = Exporter(usage, run, fsync=False)
            exporter.open()
            await exporter.drain()
            exporter.close()
            assert exported_ids(run) == ids, f"crash after {cut} bytes"

    asyncio.run(main())


def test_one_exporter_per_directory(tmp_path: Path) -> None:
    first = Exporter(MemoryUsage(), tmp_path)
    first.open()
    with pytest.raises(ExportLocked):
        Exporter(MemoryUsage(), tmp_path).open()
    first.close()
    Exporter(MemoryUsage(), tmp_path).open()


def _config(tmp_path: Path, redis_url: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(f"store:\n  redis_url: {redis_url}\n")
    return path


@pytest.mark.slow
def test_the_export_command_killed_mid_run_resumes_exactly_once(tmp_path: Path, fresh_redis: str) -> None:
    """``openrouter-proxy export`` is SIGKILLed while it writes; a second run completes the files."""

    async def prepare() -> list[str]:
        store = open_store(fresh_redis)
        try:
            return await fill(store.usage, 6000)
        finally:
            await store.aclose()

    ids = asyncio.run(prepare())
    config, out = _config(tmp_path, fresh_redis), tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    command = [str(EXE), "export", "--config", str(config), "--out", str(out), "--batch", "50", "--interval", "0.05"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while sum(f.stat().st_size for f in out.glob("usage-*.jsonl")) < 200_000:
            assert proc.poll() is None and time.monotonic() < deadline, "the exporter did not get going"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=10)
    partial = exported_ids(out) if not _has_partial_line(out) else None
    assert partial is None or len(partial) < len(ids), "killed before it finished, as intended"
    done = subprocess.run([*command, "--once"], env=env, capture_output=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr.decode()
    assert exported_ids(out) == ids


def _has_partial_line(directory: Path) -> bool:
    files = sorted(directory.glob("usage-*.jsonl"), key=_file_order)
    return bool(files) and not files[-1].read_bytes().endswith(b"\n")
