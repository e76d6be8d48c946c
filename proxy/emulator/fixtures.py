"""Byte-for-byte replay of fixture files (the ``fixture`` control).

``*.sse`` → 200 ``text/event-stream``, one SSE event (split after each ``\\n\\n``) per ASGI
body message; ``*.json`` → 200 ``application/json``; ``errors/NNN*.json`` → status NNN with
the headers of ``fixtures/errors/README.md``.  ``x-generation-id`` is taken from the first
``"id":"gen-…"`` in the file when there is one.  File bytes are cached per store.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from proxy.emulator.faults import error_headers
from proxy.emulator.types import Headers
from proxy.emulator.wire import JSON_HEADERS, SSE_HEADERS

__all__ = ["FixtureError", "FixtureStore", "Replay", "split_events"]

_GEN_ID: Final = re.compile(rb'"id":\s*"(gen-[^"]+)"')
_ERROR_NAME: Final = re.compile(r"errors/(\d{3})[^/]*\.json")


class FixtureError(LookupError):
    """The fixture cannot be served; ``str(self)`` is the 400 message."""


@dataclass(frozen=True, slots=True)
class Replay:
    status: int
    headers: Headers
    chunks: list[bytes]
    """Body messages: SSE events for ``.sse``, else the whole file."""
    stream: bool


def split_events(data: bytes) -> list[bytes]:
    """Split SSE bytes after every blank line, keeping separators (``b"".join`` restores ``data``)."""
    parts = data.split(b"\n\n")
    events = [part + b"\n\n" for part in parts[:-1]]
    if parts[-1]:
        events.append(parts[-1])
    return events


class FixtureStore:
    """Serves files below ``root``; ``root=None`` means replay is not configured."""

    def __init__(self, root: Path | None) -> None:
        self._root = root.resolve() if root is not None else None
        self._cache: dict[str, bytes] = {}

    def replay(self, name: str, generation_id: str, retry_after: int | None = None) -> Replay:
        """Response for fixture ``name`` (already checked: ``[errors/]basename``).

        ``generation_id`` is used for a 502's ``x-generation-id`` when the file has none.
        """
        data = self._read(name)
        match = _GEN_ID.search(data)
        if name.startswith("errors/"):
            error = _ERROR_NAME.fullmatch(name)
            if error is None:
                raise FixtureError("error fixtures must be named errors/NNN*.json")
            status = int(error.group(1))
            gid = match.group(1).decode() if match else generation_id
            return Replay(status, error_headers(status, gid, retry_after), [data], stream=False)
        id_header = [(b"x-generation-id", match.group(1))] if match else []
        if name.endswith(".sse"):
            return Replay(200, [*SSE_HEADERS, *id_header], split_events(data), stream=True)
        if name.endswith(".json"):
            return Replay(200, [*JSON_HEADERS, *id_header], [data], stream=False)
        raise FixtureError(f"fixture {name!r} is neither .sse nor .json")

    def _read(self, name: str) -> bytes:
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        if self._root is None:
            raise FixtureError("fixture replay needs the emulator to be created with fixtures_dir")
        path = (self._root / name).resolve()
        if not path.is_relative_to(self._root) or not path.is_file():
            raise FixtureError(f"fixture {name!r} not found")
        data = self._cache[name] = path.read_bytes()
        return data
