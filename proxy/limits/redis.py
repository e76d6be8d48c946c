"""Counters in Redis: one ``EVALSHA`` reserves a request's checks, one settles them.

Both go through ``proxy.limits.lane.ScriptLane`` (one pipelined connection per worker, set
up from the store client's settings); a settlement may wait up to 5 ms to share the next
admission's write. On a Redis Cluster they go through ``proxy.limits.cluster.ClusterScripts``
(redis-py's cluster client: the node owning the request's hash tag, redirects followed).
Every call is bounded by ``timeout_s`` (tens of milliseconds), and every redis-py error or
timeout is translated to ``StoreUnavailable`` here. A call cut short by the timeout may
still have run on the server: its window counts age out with the window and its holds with
their lease. After a Redis restart the scripts are loaded again (``NOSCRIPT``). Encodings
are cached per ``shape`` (see ``Backend.reserve``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Sequence
from typing import Any

import redis.asyncio as aioredis

from proxy.limits.backend import Check, CheckState, Decision, Release
from proxy.limits.cluster import ClusterScripts
from proxy.limits.lane import EncodedKeys, ScriptLane, encode_keys
from proxy.limits.lua import ADD_SPEND, RESERVE, SETTLE
from proxy.store import StoreUnavailable
from proxy.store.redis_errors import REDIS_ERRORS

__all__ = ["RedisBackend"]

_MAX_SHAPES = 4096


def _kind(release: Release) -> int:
    """SETTLE's kind: 1 window, 2 hold, 3 hold allotment, 4 window allotment (``proxy.limits.lua``)."""
    if release.window:
        return 4 if release.allotment else 1
    return 3 if release.allotment else 2


class RedisBackend:
    """The shared ``Backend``; ``timeout_s`` bounds each call."""

    name = "redis"

    def __init__(self, client: aioredis.Redis | aioredis.RedisCluster, timeout_s: float) -> None:
        self._client = client
        self.timeout_s = timeout_s  # bounds each call (seconds)
        self._reserve = client.register_script(RESERVE)
        self._settle = client.register_script(SETTLE)
        self._add_spend = client.register_script(ADD_SPEND)
        self._lane = ScriptLane(client) if isinstance(client, aioredis.Redis) else ClusterScripts(client)
        self._reserve_shapes: dict[Hashable, tuple[EncodedKeys, str]] = {}
        self._granting_shapes: dict[Hashable, tuple[EncodedKeys, str]] = {}
        self._settle_shapes: dict[Hashable, EncodedKeys] = {}

    async def _run(
        self,
        script: Any,
        keys: list[str] | EncodedKeys,
        args: list[Any],
        *,
        defer: bool = False,
        timeout_s: float | None = None,
    ) -> list[int]:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        try:
            result = await self._lane.evalsha(script, keys, args, timeout_s, defer=defer)
        except TimeoutError:
            raise StoreUnavailable(f"Redis did not answer within {timeout_s * 1000:.0f} ms") from None
        except REDIS_ERRORS as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(result, bytes):
            raise StoreUnavailable(f"unexpected script result {result!r}")
        return [int(v) for v in result.split(b",")] if result else []

    def _reserve_encoding(
        self, checks: Sequence[Check], shape: Hashable | None, *, granting: bool = False
    ) -> tuple[EncodedKeys, str]:
        """The keys and the argument template (``%d`` for each cost, and each ``want`` when
        ``granting``) of ``checks``."""
        cache = self._granting_shapes if granting else self._reserve_shapes
        found = cache.get(shape) if shape is not None else None
        if found is None:
            keys: list[str] = []
            params: list[str] = []
            for check in checks:
                keys += (check.key, check.key + ":x")
                window = check.window
                bucket_ms, buckets = (window.bucket_ms, window.buckets) if window else (0, 0)
                grant = f",%d,{check.least}" if granting else ""
                params.append(f"{check.limit},%d,{bucket_ms},{buckets},{check.ttl_ms}{grant}")
            found = (encode_keys(keys), ",".join(params))
            if shape is not None:
                if len(cache) >= _MAX_SHAPES:
                    cache.clear()
                cache[shape] = found
        return found

    async def reserve(
        self,
        checks: Sequence[Check],
        rid: str,
        now_ms: int,
        lease_ms: int,
        *,
        dry: bool = False,
        shape: Hashable | None = None,
    ) -> Decision:
        keys, template = self._reserve_encoding(checks, shape)
        params = template % tuple([check.cost for check in checks])
        raw = await self._run(self._reserve, keys, [now_ms, rid, lease_ms, 1 if dry else 0, params])
        make = CheckState._make
        return Decision(raw[0] == 1, tuple([make(raw[i : i + 5]) for i in range(1, len(raw), 5)]))

    async def reserve_granting(
        self,
        checks: Sequence[Check],
        wants: Sequence[int],
        rid: str,
        now_ms: int,
        lease_ms: int,
        *,
        factor: int,
        life_ms: int,
        shape: Hashable | None = None,
    ) -> tuple[Decision, tuple[int, ...]]:
        """``reserve``, and when admitted also grant each check up to ``wants[i]`` more (an
        allotment, see ``proxy.limits.leased``): ``(decision, granted amounts)``. A check is
        granted nothing unless at least ``factor`` times the grant stays free after it and
        the grant is at least its ``Check.least``; a hold's allotment is member ``rid + "+"``,
        leased ``life_ms`` longer than the request. The states' ``used`` include the grants.
        """
        keys, template = self._reserve_encoding(checks, shape, granting=True)
        params = template % tuple([v for check, want in zip(checks, wants, strict=True) for v in (check.cost, want)])
        raw = await self._run(self._reserve, keys, [now_ms, rid, lease_ms, 0, params, factor, life_ms])
        make = CheckState._make
        states = tuple([make(raw[i : i + 5]) for i in range(1, len(raw), 6)])
        return Decision(raw[0] == 1, states), tuple(raw[6::6])

    async def settle(
        self,
        releases: Sequence[Release],
        rid: str,
        now_ms: int,
        *,
        shape: Hashable | None = None,
        once_ms: int = 0,
        defer: bool = True,
    ) -> list[int]:
        """Settle ``releases`` (see ``Backend.settle``). With ``once_ms`` the call applies at
        most once per ``rid`` within ``once_ms`` (SETTLE's marker, ``proxy.limits.lua``), so a
        call that timed out may be repeated; a repeat returns the first call's result (-1 per
        release if that one stopped part way). ``defer``: the call may wait a few ms to share
        the next admission's round trip."""
        if once_ms:  # its key list names the request: never cached by shape
            shape = None
        keys = self._settle_shapes.get(shape) if shape is not None else None
        if keys is None:
            names = [k for rel in releases for k in (rel.key, rel.key + ":x")]
            if once_ms:  # the once-marker is declared, so a cluster slot in migration redirects it
                names.append(f"{releases[0].key}:once:{rid}")
            keys = encode_keys(names)
            if shape is not None:
                if len(self._settle_shapes) >= _MAX_SHAPES:
                    self._settle_shapes.clear()
                self._settle_shapes[shape] = keys
        params = ",".join([f"{_kind(r)},{r.bucket},{r.delta},{r.spend}" for r in releases])
        args: list[Any] = [rid, params]
        allotments = [r.allotment for r in releases if r.allotment]
        if allotments or once_ms:
            args.append(",".join(allotments))
        if once_ms:
            args.append(once_ms)
        return await self._run(self._settle, keys, args, defer=defer)

    async def add_spend(self, keys: Sequence[str], delta: int) -> list[int]:
        """See ``Backend.add_spend`` (off any request's path: a second, not ``timeout_s``)."""
        return await self._run(self._add_spend, list(keys), [delta], timeout_s=max(1.0, self.timeout_s)) if keys else []

    async def warm(self) -> None:
        """Load both scripts and open a connection now, not on the first requests (never raises)."""
        try:
            async with asyncio.timeout(max(1.0, self.timeout_s)):
                for script in (self._reserve, self._settle):
                    script.sha = await self._client.script_load(script.script)
        except REDIS_ERRORS:
            return
        await self._lane.connect()  # the lane's own connection: a first admission must not open it

    async def aclose(self) -> None:
        """Close the script lane's own connections (the shared client is the store's)."""
        await self._lane.aclose()
