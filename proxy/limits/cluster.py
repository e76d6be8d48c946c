"""The limiter's two scripts on a Redis Cluster, with ``ScriptLane``'s interface.

Every key of one request shares a hash tag (``{t:<team>}`` or ``{k:<key id>}``), so each
script runs on the one node that owns that slot. redis-py's ``RedisCluster`` finds that
node, follows ``MOVED``/``ASK`` redirects (re-reading the slot map when slots move or a
replica is promoted) and retries on a dropped connection; its ``Script`` answers
``NOSCRIPT`` by loading the script on that node. Each call is one round trip on the
cluster client's pooled connections: unlike ``ScriptLane`` there is no pre-encoding,
pipelining across requests or deferred settlement, so a request costs the proxy more CPU
(two round trips, each through redis-py's generic command path).

Errors, as ``ScriptLane``'s: ``TimeoutError`` (no reply within ``timeout_s``),
``ConnectionError``/``OSError`` and ``redis.exceptions.RedisError`` (a script error, or the
cluster unreachable or without an owner for the slot).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis

from proxy.limits.lane import EncodedKeys

__all__ = ["ClusterScripts"]


_MAX_IN_FLIGHT = 128


class ClusterScripts:
    """``evalsha(script, keys, args)`` through a ``RedisCluster`` client, at most
    ``max_in_flight`` calls at once (redis-py's cluster client opens a connection per
    concurrent command and fails, rather than waits, past its per-node maximum; a call
    waiting here for its turn counts against its ``timeout_s``)."""

    def __init__(self, client: aioredis.RedisCluster, max_in_flight: int = _MAX_IN_FLIGHT) -> None:
        self._client = client
        self._turns = asyncio.Semaphore(max_in_flight)

    async def evalsha(
        self,
        script: Any,
        keys: Sequence[str] | EncodedKeys,
        args: Sequence[Any],
        timeout_s: float,
        *,
        defer: bool = False,
    ) -> Any:
        """Run a redis-py ``Script`` with ``keys`` and ``args``; its reply, with a string
        reply as bytes (the client decodes replies; ``ScriptLane`` returns bytes).
        ``defer`` is accepted for ``ScriptLane``'s interface and ignored."""
        names = list(keys.keys) if isinstance(keys, EncodedKeys) else list(keys)
        async with asyncio.timeout(timeout_s), self._turns:
            reply = await script(keys=names, args=list(args), client=self._client)
        return reply.encode() if isinstance(reply, str) else reply

    async def aclose(self) -> None:
        """Nothing of its own to close: the connections are the store client's."""
