"""The in-memory side of the response cache: bytes with a TTL, bounded in entries and bytes.

Expired entries are dropped when read, and swept when the bounds are reached; then the
oldest entries go first (insertion order). Times are ``time.monotonic()`` seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["MemoryCache"]


class MemoryCache:
    """``get``/``set`` of bytes values; at most ``max_entries`` and ``max_bytes`` in total."""

    def __init__(
        self,
        *,
        max_entries: int = 10_000,
        max_bytes: int = 256 << 20,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._clock = clock
        self._entries: dict[str, tuple[float, bytes]] = {}
        self._bytes = 0

    def get(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            self._drop(key)
            return None
        return entry[1]

    def set(self, key: str, value: bytes, ttl_s: float) -> None:
        if len(value) > self.max_bytes:
            return
        self._drop(key)
        if len(self._entries) >= self.max_entries or self._bytes + len(value) > self.max_bytes:
            now = self._clock()
            for old in [k for k, (expires, _) in self._entries.items() if expires <= now]:
                self._drop(old)
        while self._entries and (len(self._entries) >= self.max_entries or self._bytes + len(value) > self.max_bytes):
            self._drop(next(iter(self._entries)))
        self._entries[key] = (self._clock() + ttl_s, value)
        self._bytes += len(value)

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= len(entry[1])
