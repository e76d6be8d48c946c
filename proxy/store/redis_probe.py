"""Is the Redis behind the store answering? Every primary of a cluster, on connections of its own.

``NodeProbe.ping_nodes`` sends one ``PING`` to the endpoint, or reads a cluster's slot map
(``CLUSTER SLOTS``) from the first node that answers and pings each primary in it: a dead
primary leaves its slots' counters unreachable, so one answering node is not enough. The
map is read afresh on every probe, so a primary replaced by a failover stops counting as
unreachable once the cluster has promoted its replica.

The probe never touches the store's shared client: cancelling redis-py's cluster client in
the middle of a command or of a slot-map read closes every connection it has, including
those of live requests, and may send their commands again. Its own clients (one per node,
at most one connection each) are bounded by redis-py's socket timeouts instead; callers
that must answer sooner wait on the probe without cancelling it (``proxy.health``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis

from proxy.store.redis_errors import REDIS_ERRORS

__all__ = ["NodeProbe"]


class NodeProbe:
    """Probes ``url`` (``redis://``/``rediss://``; ``cluster``: the URL names one node of a
    cluster) with ``timeout_s`` per connect and reply (seconds)."""

    def __init__(self, url: str, *, cluster: bool, timeout_s: float) -> None:
        self.url = url
        self.cluster = cluster
        self.timeout_s = timeout_s
        parts = urlsplit(url)
        self._default = f"{parts.hostname or 'localhost'}:{parts.port or 6379}"
        self._clients: dict[str, aioredis.Redis] = {}

    async def ping_nodes(self, known: Iterable[str] = ()) -> tuple[int, list[str]]:
        """``(nodes, unreachable)``: how many nodes serve the store (1, or the cluster's
        primaries) and the ``host:port`` of each that did not answer. ``known``: nodes to
        ask for a cluster's map besides the URL's (e.g. the shared client's map)."""
        if not self.cluster:
            return 1, [] if await self._ping(self._default) else [self._default]
        asked = list(dict.fromkeys([self._default, *known]))
        primaries = None
        for name in asked:
            primaries = await self._primaries(name)
            if primaries is not None:
                break
        if not primaries:  # no node answered (or none has slots): nothing is reachable
            return len(asked), asked
        answers = await asyncio.gather(*(self._ping(name) for name in primaries))
        return len(primaries), [name for name, ok in zip(primaries, answers, strict=True) if not ok]

    async def _primaries(self, name: str) -> list[str] | None:
        """The primaries in ``name``'s slot map (``None``: it did not answer)."""
        host = name.rsplit(":", 1)[0]
        try:
            ranges = await self._client(name).execute_command("CLUSTER SLOTS")  # type: ignore[no-untyped-call]
        except REDIS_ERRORS:
            return None
        found: dict[str, None] = {}
        try:
            for entry in ranges:  # [first slot, last slot, [host, port, id, ...] of the primary, replicas...]
                node_host, node_port = entry[2][0], int(entry[2][1])
                if isinstance(node_host, bytes):
                    node_host = node_host.decode()
                found[f"{node_host if node_host not in ('', '?') else host}:{node_port}"] = None
        except (IndexError, TypeError, ValueError):  # not a cluster node's reply
            return None
        return list(found)

    async def _ping(self, name: str) -> bool:
        try:
            return bool(await self._client(name).ping())
        except REDIS_ERRORS:  # TimeoutError is an OSError
            return False

    def _client(self, name: str) -> aioredis.Redis:
        client = self._clients.get(name)
        if client is None:
            client = aioredis.Redis.from_url(
                _with_node(self.url, name),
                socket_timeout=self.timeout_s,
                socket_connect_timeout=self.timeout_s,
                max_connections=1,
                retry_on_timeout=False,
            )
            if len(self._clients) > 64:  # a cluster reshaped many times: start afresh
                stale, self._clients = list(self._clients.values()), {}
                for old in stale:
                    asyncio.get_running_loop().create_task(old.aclose())
            self._clients[name] = client
        return client

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()


def _with_node(url: str, name: str) -> str:
    """``url`` pointed at node ``name`` (``host:port``), credentials and options kept."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    host, _, port = name.rpartition(":")
    address = f"[{host}]:{port}" if ":" in host else name
    netloc = f"{userinfo}@{address}" if userinfo else address
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
