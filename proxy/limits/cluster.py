"""The limiter's two scripts on a Redis Cluster, with ``ScriptLane``'s interface.

Every key of one request shares a hash tag (``{t:<team>}`` or ``{k:<key id>}``), so each
script runs on the one node that owns that slot. ``ClusterScripts`` keeps one
``ScriptLane`` per primary (pre-encoded ``EVALSHA``, pipelined, settlements deferred to share
the next write, exactly as with one Redis endpoint) and sends each call to the lane of the
node that owns its slot in the slot map of the store's ``RedisCluster`` client.

A call goes through redis-py's own cluster path instead when its lane could not have run
it: the node answered ``MOVED``, ``ASK``, ``TRYAGAIN`` or ``CLUSTERDOWN`` (slots moving, a
failover), the lane could not connect (``NotSent``: a dead node), or the map has no owner
for the slot (not read yet). That path reads the map if needed, follows redirects
(``ASKING`` included), reconnects, and patches the map, so the calls after it use the new
owner's lane. A call whose connection broke after it was written may have run: it is not
sent again (``ConnectionError``, as with one endpoint), and the map is read again in the
background. At most ``max_in_flight`` calls take redis-py's path at once (it opens a
connection per concurrent command and fails, rather than waits, past its per-node maximum).
redis-py itself retries a command whose connection broke; with ``store_timeout_ms`` above
the store client's 1 s socket timeout, a fallback call could so run twice (a window
counts one request twice until it ages out).

Errors, as ``ScriptLane``'s: ``TimeoutError`` (no reply within ``timeout_s``; such a call
is not sent again), ``ConnectionError``/``OSError`` and ``redis.exceptions.RedisError`` (a
script error), and ``RedisClusterException`` (no reachable node, or no owner for the slot).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.crc import key_slot
from redis.exceptions import RedisClusterException, ResponseError

from proxy.limits.lane import EncodedKeys, NotSent, ScriptLane

__all__ = ["ClusterScripts"]

_MAX_IN_FLIGHT = 128
_MAX_CACHED_SLOTS = 4096
_REDIRECTS = ("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN")


class ClusterScripts:
    """``evalsha(script, keys, args)`` on the node owning the keys' slot (see module docstring)."""

    def __init__(self, client: aioredis.RedisCluster, *, max_in_flight: int = _MAX_IN_FLIGHT) -> None:
        self._client = client
        self._turns = asyncio.Semaphore(max_in_flight)
        self._lanes: dict[str, ScriptLane] = {}
        self._slots: dict[str, int] = {}
        self._rereading: asyncio.Task[None] | None = None

    async def evalsha(
        self,
        script: Any,
        keys: Sequence[str] | EncodedKeys,
        args: Sequence[Any],
        timeout_s: float,
        *,
        defer: bool = False,
    ) -> Any:
        """Run a redis-py ``Script`` with ``keys`` and ``args`` on the owner of the keys'
        slot; its reply (a string reply as bytes). ``defer`` as ``ScriptLane.evalsha``."""
        names = keys.keys if isinstance(keys, EncodedKeys) else tuple(keys)
        deadline = time.monotonic() + timeout_s
        lane = self._lane(names[0]) if names else None
        if lane is not None:
            try:
                return await lane.evalsha(script, keys, args, timeout_s, defer=defer)
            except ResponseError as exc:
                if not str(exc).startswith(_REDIRECTS):
                    raise
            except NotSent:
                pass
            except (ConnectionError, OSError):  # it may have run: never send it twice
                self._reread_map()
                raise
        async with asyncio.timeout(max(0.001, deadline - time.monotonic())), self._turns:
            reply = await script(keys=list(names), args=list(args), client=self._client)
        return reply.encode() if isinstance(reply, str) else reply

    def _lane(self, key: str) -> ScriptLane | None:
        """The lane to the owner of ``key``'s slot in the client's map (None: no owner known)."""
        slot = self._slots.get(key)
        if slot is None:
            if len(self._slots) >= _MAX_CACHED_SLOTS:
                self._slots.clear()
            slot = self._slots[key] = key_slot(key.encode())
        try:
            node = self._client.nodes_manager.get_node_from_slot(slot)
        except (RedisClusterException, KeyError):  # KeyError: the map was never read
            return None
        lane = self._lanes.get(node.name)
        if lane is None:
            lane = self._lanes[node.name] = ScriptLane(node)
        return lane

    def _reread_map(self) -> None:
        """Read the slot map again in the background (one reading at a time; its failure is
        left to the next call that needs the map to report)."""
        if self._rereading is None:
            self._rereading = asyncio.get_running_loop().create_task(self._client.nodes_manager.initialize())
            self._rereading.add_done_callback(self._reread)

    def _reread(self, task: asyncio.Task[None]) -> None:
        self._rereading = None
        if not task.cancelled():
            task.exception()  # retrieved, not raised: see _reread_map

    async def connect(self) -> None:
        """Open a lane to every primary in the client's slot map now (never raises)."""
        try:
            primaries = self._client.get_primaries()
        except Exception:  # the map was never read: the first calls open lanes as needed
            return
        for node in primaries:
            if node.name not in self._lanes:
                self._lanes[node.name] = ScriptLane(node)
        await asyncio.gather(*(self._lanes[node.name].connect() for node in primaries), return_exceptions=True)

    def nodes(self) -> set[str]:
        """The nodes (``host:port``) this process has a lane to."""
        return set(self._lanes)

    async def aclose(self) -> None:
        """Close every node's lane (the cluster client is the store's)."""
        lanes, self._lanes = list(self._lanes.values()), {}
        if self._rereading is not None:
            self._rereading.cancel()
        await asyncio.gather(*(lane.aclose() for lane in lanes), return_exceptions=True)
