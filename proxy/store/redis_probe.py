"""Is the Redis behind the store answering? Every primary of a cluster, on connections of its own.

``NodeProbe.ping_nodes`` sends one ``PING`` to the endpoint, or reads a cluster's slot map
(``CLUSTER SLOTS``) from the first node that answers and pings each primary in it: a dead
primary leaves its slots' counters unreachable, so one answering node is not enough. The
map is read afresh on every probe, so a primary replaced by a failover stops counting as
unreachable once the cluster has promoted its replica.

A refused password or a host name that does not resolve marks the answer
``misconfigured``: that is a deployment to stop, not an outage to ride out.

The probe never touches the store's shared client: cancelling redis-py's cluster client in
the middle of a command or of a slot-map read closes every connection it has, including
those of live requests, and may send their commands again. Its own clients (one per node,
at most one connection each) are bounded by redis-py's socket timeouts instead; callers
that must answer sooner wait on the probe without cancelling it (``proxy.health``), and
``PROBE_TIMEOUT_S`` keeps one node's silence shorter than their wait.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError

from proxy.store.base import Reachability
from proxy.store.redis_errors import REDIS_ERRORS

__all__ = ["PROBE_TIMEOUT_S", "NodeProbe"]

PROBE_TIMEOUT_S = 0.4  # at most, per connect and per reply (seconds)
_OWN_OPTIONS = frozenset(  # the probe's own bounds: a URL's options must not override them
    ("socket_timeout", "socket_connect_timeout", "max_connections", "retry_on_timeout", "health_check_interval")
)


class NodeProbe:
    """Probes ``url`` (``redis://``/``rediss://``; ``cluster``: the URL names one node of a
    cluster) with ``timeout_s`` per connect and reply (seconds)."""

    def __init__(self, url: str, *, cluster: bool, timeout_s: float) -> None:
        self.url = url
        self.cluster = cluster
        self.timeout_s = timeout_s
        parts = urlsplit(url)
        unix = parts.scheme == "unix"
        self._default = parts.path if unix else f"{parts.hostname or 'localhost'}:{parts.port or 6379}"
        self._clients: dict[str, aioredis.Redis] = {}
        self._answered_map: str | None = None  # the node whose slot map came last
        self._misconfigured = False  # set by a failure that points at the configuration
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False

    async def ping_nodes(self, known: Iterable[str] = ()) -> Reachability:
        """Every node's answer. ``known``: nodes to ask for a cluster's map besides the
        URL's (e.g. the shared client's map); the one that answered last is asked first."""
        self._misconfigured = False
        if not self.cluster:
            ok = await self._ping(self._default)
            return Reachability(1, [] if ok else [self._default], self._misconfigured)
        asked = list(dict.fromkeys([n for n in (self._answered_map, self._default, *known) if n]))
        primaries = None
        for name in asked:
            primaries = await self._primaries(name)
            if primaries is not None:
                self._answered_map = name
                break
        if not primaries:  # no node answered (or none has slots): nothing is reachable
            return Reachability(len(asked), asked, self._misconfigured)
        answers = await asyncio.gather(*(self._ping(name) for name in primaries))
        unreachable = [name for name, ok in zip(primaries, answers, strict=True) if not ok]
        return Reachability(len(primaries), unreachable, self._misconfigured)

    async def _primaries(self, name: str) -> list[str] | None:
        """The primaries in ``name``'s slot map (``None``: it did not answer)."""
        host = name.rsplit(":", 1)[0]
        try:
            ranges = await self._client(name).execute_command("CLUSTER SLOTS")  # type: ignore[no-untyped-call]
        except REDIS_ERRORS as exc:
            self._note(exc)
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
        except REDIS_ERRORS as exc:  # TimeoutError is an OSError
            self._note(exc)
            return False

    def _note(self, exc: BaseException) -> None:
        """Remember a failure that no outage explains: a refused password, an unknown host."""
        if isinstance(exc, AuthenticationError) or isinstance(exc.__context__, socket.gaierror):
            self._misconfigured = True

    def _client(self, name: str) -> aioredis.Redis:
        if self._closed:  # a probe still running at shutdown opens nothing new
            raise aioredis.ConnectionError("the store is closed")
        client = self._clients.get(name)
        if client is None:
            client = aioredis.Redis.from_url(
                _probe_url(self.url, name if self.cluster else None),
                socket_timeout=self.timeout_s,
                socket_connect_timeout=self.timeout_s,
                max_connections=1,
                retry_on_timeout=False,
            )
            if len(self._clients) > 64:  # a cluster reshaped many times: start afresh
                stale, self._clients = list(self._clients.values()), {}
                for old in stale:
                    task = asyncio.get_running_loop().create_task(old.aclose())
                    self._closing.add(task)
                    task.add_done_callback(self._closing.discard)
            self._clients[name] = client
        return client

    async def aclose(self) -> None:
        self._closed = True
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


def _probe_url(url: str, node: str | None) -> str:
    """``url`` pointed at ``node`` (``host:port``; ``None``: as it is), credentials and TLS
    options kept, without the options that would override the probe's own bounds (redis-py
    lets a URL's options win over its arguments)."""
    base, _, query = url.partition("?")
    if node is not None:
        parts = urlsplit(base)
        userinfo = parts.netloc.rpartition("@")[0]
        host, _, port = node.rpartition(":")
        address = f"[{host}]:{port}" if ":" in host else node
        netloc = f"{userinfo}@{address}" if userinfo else address
        base = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    kept = urlencode([(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k not in _OWN_OPTIONS])
    return f"{base}?{kept}" if kept else base
