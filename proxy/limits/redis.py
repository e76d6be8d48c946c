"""Counters in Redis: one ``EVALSHA`` reserves a request's checks, one settles them.

Built on the store's shared client (``RedisStore.client``, one pool per worker). Every call
is bounded by ``timeout_s`` (tens of milliseconds), and every redis-py error or timeout is
translated to ``StoreUnavailable`` here. A call cut short by the timeout may still have run
on the server: its window counts age out with the window and its holds with their lease.
After a Redis restart the scripts are loaded again on first use (redis-py's ``Script``
retries ``NOSCRIPT`` with ``SCRIPT LOAD``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from proxy.limits.backend import Check, CheckState, Decision, Release
from proxy.limits.lane import ScriptLane
from proxy.limits.lua import RESERVE, SETTLE
from proxy.store import StoreUnavailable

__all__ = ["RedisBackend"]


class RedisBackend:
    """The shared ``Backend``; ``timeout_s`` bounds each call."""

    name = "redis"

    def __init__(self, client: aioredis.Redis, timeout_s: float) -> None:
        self._client = client
        self._timeout_s = timeout_s
        self._reserve = client.register_script(RESERVE)
        self._settle = client.register_script(SETTLE)
        self._lane = ScriptLane(client)

    async def _run(self, script: Any, keys: list[str], args: list[Any]) -> list[int]:
        try:
            async with asyncio.timeout(self._timeout_s):
                result = await self._lane.evalsha(script, keys, args)
        except TimeoutError:
            raise StoreUnavailable(f"Redis did not answer within {self._timeout_s * 1000:.0f} ms") from None
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc
        if isinstance(result, bytes):
            result = result.decode()
        if not isinstance(result, str):
            raise StoreUnavailable(f"unexpected script result {result!r}")
        return [int(v) for v in result.split(",")] if result else []

    async def reserve(
        self, checks: Sequence[Check], rid: str, now_ms: int, lease_ms: int, *, dry: bool = False
    ) -> Decision:
        keys: list[str] = []
        params: list[int] = []
        for check in checks:
            keys += (check.key, check.key + ":x")
            window = check.window
            bucket_ms, buckets = (window.bucket_ms, window.buckets) if window else (0, 0)
            params += (check.limit, check.cost, bucket_ms, buckets, check.ttl_ms)
        args = [now_ms, rid, lease_ms, 1 if dry else 0, ",".join(map(str, params))]
        raw = await self._run(self._reserve, keys, args)
        states = tuple(
            CheckState(used=u, spent=s, reset_ms=r, retry_ms=t, bucket=b)
            for u, s, r, t, b in zip(*[iter(raw[1:])] * 5, strict=True)
        )
        return Decision(bool(raw[0]), states)

    async def settle(self, releases: Sequence[Release], rid: str, now_ms: int) -> list[int]:
        keys: list[str] = []
        params: list[int] = []
        for rel in releases:
            keys += (rel.key, rel.key + ":x")
            params += (1 if rel.window else 2, rel.bucket, rel.delta, rel.spend, rel.ttl_ms)
        return await self._run(self._settle, keys, [rid, ",".join(map(str, params))])

    async def warm(self) -> None:
        """Load both scripts and open a connection now, not on the first requests (never raises)."""
        try:
            async with asyncio.timeout(max(1.0, self._timeout_s)):
                for script in (self._reserve, self._settle):
                    script.sha = await self._client.script_load(script.script)
        except (RedisError, OSError, TimeoutError):
            return

    async def aclose(self) -> None:
        """Close the script lane's own connections (the shared client is the store's)."""
        await self._lane.aclose()

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(self._timeout_s):
                return bool(await self._client.ping())
        except (RedisError, OSError, TimeoutError):
            return False
