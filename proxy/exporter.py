"""The exporter: drains the ledger stream into JSON-lines files, exactly once and in order.

Files in ``out_dir``: ``usage-YYYY-MM-DD.jsonl``, then ``usage-YYYY-MM-DD.1.jsonl``,
``.2`` ... once a file reaches ``max_file_bytes``. The day is the UTC day of the entry's
stream id (when it was appended), so names sort in stream order. Each line is the ledger
line (``proxy.accounting``) with ``"id"``, its stream id, first.

**Why exactly once.** The files themselves are the cursor; there is no separate
acknowledgement that could disagree with them. Stream ids strictly increase and the
exporter appends entries to the newest file in id order, so every id up to the last
complete line of the newest file is in the files and nothing after it is. On start the
exporter truncates a partial last line (a crash in the middle of a ``write``), reads the id
of the last complete line and continues with the entries strictly after it. A crash at any
point therefore loses nothing still in the stream and repeats nothing. Each batch is
``fsync``ed (and the directory after a new file), so the same holds after a power loss,
up to the unsynced tail, which is simply exported again. One exporter per directory: an
``flock`` on ``out_dir/.export.lock`` keeps a second one out (``ExportLocked``).

The stream must keep entries until they are exported: size ``ledger.stream_max_entries`` /
``stream_max_age_s`` for the longest exporter outage you want to survive.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import re
from pathlib import Path
from typing import BinaryIO

from proxy.store.base import day_of
from proxy.store.usage import UsageLedger, parse_id

__all__ = ["ExportLocked", "Exporter"]

log = logging.getLogger("proxy.exporter")

_NAME = re.compile(r"^usage-(\d{4}-\d{2}-\d{2})(?:\.(\d+))?\.jsonl$")
_TAIL_CHUNK = 64 * 1024


class ExportLocked(Exception):
    """Another exporter holds ``out_dir``."""


class Exporter:
    """Drains ``usage`` into ``out_dir``; ``open()`` first (lock + recovery), ``close()`` last."""

    def __init__(
        self,
        usage: UsageLedger,
        out_dir: Path,
        *,
        max_file_bytes: int = 64 * 1024 * 1024,
        batch_size: int = 1000,
        fsync: bool = True,
    ) -> None:
        self.usage = usage
        self.out_dir = out_dir
        self.max_file_bytes = max_file_bytes
        self.batch_size = batch_size
        self.fsync = fsync
        self.cursor = "0-0"
        self.exported = 0
        self._lock_fd: int | None = None
        self._fd: int | None = None
        self._file: tuple[str, int] | None = None
        self._size = 0

    @property
    def is_open(self) -> bool:
        return self._lock_fd is not None

    def open(self) -> str:
        """Lock the directory and recover the cursor from the files; returns the cursor.

        Raises ``ExportLocked`` when another exporter holds the directory.
        """
        self.out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.out_dir / ".export.lock", os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ExportLocked(f"another exporter is writing to {self.out_dir}") from None
        self._lock_fd = fd
        self.cursor = self._recover()
        return self.cursor

    def _files(self) -> list[tuple[str, int, Path]]:
        found = []
        for path in self.out_dir.iterdir():
            match = _NAME.match(path.name)
            if match:
                found.append((match.group(1), int(match.group(2) or 0), path))
        return sorted(found)

    def _recover(self) -> str:
        for day, part, path in reversed(self._files()):
            last = _truncate_to_last_line(path)
            if last is None:
                path.unlink()  # created, then the process died before its first line
                continue
            self._file, self._size = (day, part), path.stat().st_size
            return last
        return "0-0"

    async def export_once(self) -> int:
        """Export one batch (up to ``batch_size`` entries); the number exported.

        Raises ``StoreUnavailable`` (nothing written) or ``OSError`` (the files are still
        consistent: recovery on the next ``open`` takes care of a partial line).
        """
        assert self._lock_fd is not None, "open() first"
        entries = await self.usage.read(self.cursor, self.batch_size)
        if not entries:
            return 0
        chunk: list[bytes] = []
        for entry_id, line in entries:
            data = b'{"id":"' + entry_id.encode() + (b'",' + line[1:] if len(line) > 2 else b'"}') + b"\n"
            day = day_of(parse_id(entry_id)[0] / 1000)
            if self._file is not None and day < self._file[0]:
                day = self._file[0]  # never write behind the newest file (clock stepped back)
            if self._needs_new_file(day, len(chunk), sum(map(len, chunk)) + len(data)):
                self._write(chunk)
                chunk = []
                self._rotate(day)
            chunk.append(data)
        self._write(chunk)
        self.cursor = entries[-1][0]
        self.exported += len(entries)
        return len(entries)

    def _needs_new_file(self, day: str, lines: int, pending: int) -> bool:
        if self._file is None or day != self._file[0]:
            return True
        return self._size + pending > self.max_file_bytes and (self._size > 0 or lines > 0)

    def _rotate(self, day: str) -> None:
        part = self._file[1] + 1 if self._file is not None and self._file[0] == day else 0
        self._close_file()
        self._file, self._size = (day, part), 0

    def _path(self) -> Path:
        assert self._file is not None
        day, part = self._file
        return self.out_dir / (f"usage-{day}.jsonl" if part == 0 else f"usage-{day}.{part}.jsonl")

    def _write(self, chunk: list[bytes]) -> None:
        if not chunk:
            return
        if self._fd is None:
            path = self._path()
            created = not path.exists()
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            if created and self.fsync:
                _fsync_dir(self.out_dir)
        data = b"".join(chunk)
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
            if self.fsync:
                os.fsync(self._fd)
        except OSError:  # e.g. disk full: cut what got through, so a retry appends whole lines
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
            raise
        self._size += len(data)

    def _close_file(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    async def drain(self) -> int:
        """Export until the stream has nothing newer; the number exported."""
        total = 0
        while count := await self.export_once():
            total += count
        return total

    async def run(self, interval_s: float, stop: asyncio.Event) -> None:
        """Drain every ``interval_s`` seconds until ``stop`` is set; store errors are retried."""
        while not stop.is_set():
            try:
                await self.drain()
            except Exception as exc:
                log.warning("export to %s paused: %s", self.out_dir, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)

    def close(self) -> None:
        self._close_file()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rfind_newline(fh: BinaryIO, end: int) -> int:
    """Offset of the last ``\\n`` before ``end`` in ``fh``, or -1."""
    pos = end
    while pos > 0:
        start = max(0, pos - _TAIL_CHUNK)
        fh.seek(start)
        found = fh.read(pos - start).rfind(b"\n")
        if found >= 0:
            return start + found
        pos = start
    return -1


def _truncate_to_last_line(path: Path) -> str | None:
    """Cut a partial last line off ``path``; the id of its last complete line, or None if empty.

    Raises ``ValueError`` when the last line carries no stream id (not an export file).
    """
    with path.open("r+b") as fh:
        size = fh.seek(0, os.SEEK_END)
        complete = _rfind_newline(fh, size) + 1
        if complete != size:
            fh.truncate(complete)
            fh.flush()
            os.fsync(fh.fileno())
            log.warning("%s: removed a partial last line (%d bytes)", path, size - complete)
        if complete == 0:
            return None
        begin = _rfind_newline(fh, complete - 1) + 1
        fh.seek(begin)
        last = fh.read(complete - begin)
    match = re.match(rb'^\{"id":"(\d+-\d+)"', last)
    if match is None:
        raise ValueError(f"{path}: the last line has no stream id; refusing to guess where to resume")
    return match.group(1).decode()
