"""A lean path for the limiter's two scripts: pre-encoded ``EVALSHA`` pipelined on one connection.

redis-py's generic command path costs the admission hot path a lot of CPU per call
(measured with ``loadtests/lane_bench.py``: argument encoding in ``pack_command``, a pool
lock, a task and an ``asyncio.timeout`` per call, a ``StreamReader`` between socket and
parser). The limiter sends the same two scripts with the same key lists again and again,
so this lane:

* encodes each distinct key list once (kept in a bounded cache) and only the few dynamic
  arguments per call, into one RESP ``EVALSHA`` command;
* keeps **one** connection per worker, opened and authenticated by redis-py from the store
  client's settings (host or unix socket, password, TLS, database ...), whose transport it
  then takes over with an ``asyncio.Protocol`` that feeds bytes straight to ``hiredis``;
  replies are matched to calls in order (Redis answers a connection's commands in order);
* pipelines: every command queued in one event-loop iteration goes out in one ``write``;
  *deferred* commands (settlements, see ``evalsha(defer=True)``) wait up to ``defer_s`` for
  the next write, so at low concurrency a request's settlement shares the next request's
  admission round trip instead of costing one of its own;
* bounds each call by its own ``timeout_s`` (a timer on the call's future, no task): a
  reply that comes later is read and dropped, so replies never get out of step. When the
  oldest unanswered command is older than ``stall_s`` the connection is dropped, every
  waiting call fails, and the next call opens a new connection;
* answers ``NOSCRIPT`` (Redis restarted or flushed) by sending the script itself once (``EVAL``,
  which also caches it again), on the same connection.

Errors: ``TimeoutError`` (no reply in time), ``ConnectionError``/``OSError`` (connection
lost or refused; ``NotSent``, a ``ConnectionError``, when the command was certainly never
written: the connection could not be opened, the lane was closed, or Redis had stalled),
``redis.exceptions.ResponseError`` (an error reply, e.g. a script error).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode
from redis.exceptions import ResponseError

__all__ = ["EncodedKeys", "NotSent", "ScriptLane", "encode_keys"]

_MAX_CACHED_KEY_LISTS = 4096
_STALL_S = 5.0
_DEFER_S = 0.005
_HANDSHAKE_S = 1.0

Waiter = Callable[[Any], None]  # called once with the reply, or with the exception


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(value), value)


class NotSent(ConnectionError):
    """The command was never written to Redis (so sending it elsewhere cannot apply it twice)."""


class EncodedKeys(NamedTuple):
    """A key list as RESP: ``numkeys`` and then each key (``encode_keys``), and the keys."""

    numkeys: int
    block: bytes
    keys: tuple[str, ...]


def encode_keys(keys: Sequence[str]) -> EncodedKeys:
    """``keys`` encoded once, for callers that send the same key list many times."""
    block = _bulk(str(len(keys)).encode()) + b"".join(_bulk(k.encode()) for k in keys)
    return EncodedKeys(len(keys), block, tuple(keys))


class _Replies(asyncio.Protocol):
    """The read side of the lane's connection: replies go to ``waiters`` in order."""

    def __init__(self, on_lost: Callable[[_Replies], None]) -> None:
        self.reader = hiredis.Reader()
        self.waiters: deque[tuple[Waiter, float]] = deque()
        self.transport: asyncio.Transport | None = None
        self.owner: Any = None  # the StreamWriter that opened the transport: it closes it when collected
        self.closed = False
        self._on_lost = on_lost

    def data_received(self, data: bytes) -> None:
        reader, waiters = self.reader, self.waiters
        reader.feed(data)
        while True:
            reply = reader.gets()
            if reply is False:
                return
            if waiters:
                waiters.popleft()[0](reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(ConnectionError(f"Redis connection lost: {exc}" if exc else "Redis connection closed"))

    def fail(self, exc: Exception) -> None:
        """Drop the connection and fail every waiting call with ``exc``."""
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.abort()
            self._on_lost(self)
        waiters, self.waiters = self.waiters, deque()
        for waiter, _ in waiters:
            waiter(exc)


def _resolve(future: asyncio.Future[Any], timer: asyncio.TimerHandle | None = None) -> Waiter:
    def waiter(reply: Any) -> None:
        if timer is not None:
            timer.cancel()
        if not future.done():
            if isinstance(reply, Exception):
                future.set_exception(ResponseError(str(reply)) if isinstance(reply, hiredis.ReplyError) else reply)
            else:
                future.set_result(reply)

    return waiter


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


class ScriptLane:
    """``evalsha(script, keys, args)`` over one dedicated, pipelined connection."""

    def __init__(
        self,
        client: aioredis.Redis | ClusterNode,
        *,
        defer_s: float = _DEFER_S,
        stall_s: float = _STALL_S,
    ) -> None:
        """``client``: a redis-py client (its pool's settings) or one node of a cluster client."""
        connection_class: type[Any]
        if isinstance(client, ClusterNode):
            connection_class, kwargs = client.connection_class, client.connection_kwargs
        else:
            connection_class, kwargs = client.connection_pool.connection_class, client.connection_pool.connection_kwargs
        self._connection_class = connection_class
        # bounds the handshake only (a paused Redis accepts the TCP connection and never
        # answers it); once the transport is taken over, the lane times calls itself
        handshake_s = kwargs.get("socket_timeout") or _HANDSHAKE_S
        self._connection_kwargs = {
            **kwargs,
            "socket_timeout": handshake_s,
            "socket_connect_timeout": kwargs.get("socket_connect_timeout") or handshake_s,
        }
        self._defer_s = defer_s
        self._stall_s = stall_s
        self._keys_cache: dict[tuple[str, ...], EncodedKeys] = {}
        self._now: list[tuple[bytes, Waiter, asyncio.Future[Any]]] = []
        self._deferred: list[tuple[bytes, Waiter, asyncio.Future[Any]]] = []
        self._scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._conn: _Replies | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._closed = False

    # -- encoding ------------------------------------------------------------------

    def _encoded_keys(self, keys: Sequence[str] | EncodedKeys) -> EncodedKeys:
        if isinstance(keys, EncodedKeys):
            return keys
        cache_key = tuple(keys)
        found = self._keys_cache.get(cache_key)
        if found is None:
            if len(self._keys_cache) >= _MAX_CACHED_KEY_LISTS:
                self._keys_cache.clear()
            found = self._keys_cache[cache_key] = encode_keys(keys)
        return found

    def command(
        self,
        sha: str,
        keys: Sequence[str] | EncodedKeys,
        args: Sequence[Any],
        *,
        verb: bytes = b"EVALSHA",
    ) -> bytes:
        """The RESP bytes of ``EVALSHA sha len(keys) *keys *args`` (``verb=b"EVAL"``: ``sha`` is the script)."""
        encoded = self._encoded_keys(keys)
        head = b"*%d\r\n%b%b" % (3 + encoded.numkeys + len(args), _bulk(verb), _bulk(sha.encode()))
        tail = b"".join([_bulk(a if isinstance(a, bytes) else str(a).encode()) for a in args])
        return b"".join((head, encoded.block, tail))

    # -- calls ---------------------------------------------------------------------

    async def evalsha(
        self,
        script: Any,
        keys: Sequence[str] | EncodedKeys,
        args: Sequence[Any],
        timeout_s: float,
        *,
        defer: bool = False,
    ) -> Any:
        """Run a redis-py ``Script`` (its ``sha`` and ``script``) with ``keys`` and ``args``;
        its reply (bytes, int, list ...). ``defer``: the command may wait up to ``defer_s``
        to share a write with the next command. Raises as the module docstring says."""
        deadline = time.monotonic() + timeout_s
        try:
            return await self._call(self.command(script.sha, keys, args), timeout_s, defer)
        except ResponseError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        # Redis restarted or flushed its scripts: EVAL sends the script itself (and caches it again)
        text = script.script if isinstance(script.script, str) else script.script.decode()
        remaining = max(0.001, deadline - time.monotonic())
        return await self._call(self.command(text, keys, args, verb=b"EVAL"), remaining, False)

    def _call(self, command: bytes, timeout_s: float, defer: bool) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if self._closed:
            future.set_exception(NotSent("the script lane is closed"))
            return future
        entry = (command, _resolve(future, loop.call_later(timeout_s, _expire, future)), future)
        if defer:
            self._deferred.append(entry)
            if self._timer is None and not self._scheduled:
                self._timer = loop.call_later(self._defer_s, self._flush)
        else:
            self._now.append(entry)
            if not self._scheduled:
                self._scheduled = True
                loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        """Write everything queued (deferred commands first, so they keep their order).

        An immediate command whose caller stopped waiting (it timed out while the
        connection was being opened) is not written: its caller decided without it, and a
        reservation made now would be held by nobody. Deferred ones (settlements: releasing
        what may be held is always right) are written all the same."""
        self._scheduled = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        conn = self._conn
        if conn is None or conn.closed:
            if self._connecting is None and (self._now or self._deferred):
                self._connecting = asyncio.get_running_loop().create_task(self._connect())
            return
        now_batch = [entry for entry in self._now if not entry[2].done()]
        batch = self._deferred + now_batch if self._deferred else now_batch
        self._deferred, self._now = [], []
        if not batch:
            return
        waiters = conn.waiters
        now = time.monotonic()
        if waiters and now - waiters[0][1] > self._stall_s:
            conn.fail(ConnectionError(f"Redis did not answer for {self._stall_s:.0f} s; connection dropped"))
            for _, waiter, _ in batch:
                waiter(NotSent("Redis is not answering"))
            return
        waiters.extend((waiter, now) for _, waiter, _ in batch)
        assert conn.transport is not None
        conn.transport.write(b"".join(command for command, _, _ in batch))

    async def _connect(self) -> None:
        """Open the connection (redis-py does the handshake), take its transport, then flush."""
        try:
            conn = self._connection_class(**self._connection_kwargs)
            await conn.connect()  # type: ignore[no-untyped-call]
            writer = conn._writer  # the transport redis-py opened and authenticated
            if writer is None:
                raise ConnectionError("redis-py returned an unconnected connection")
            conn._writer = conn._reader = None  # detached: redis-py must not close it when collected
            replies = _Replies(self._lost)
            transport: Any = writer.transport
            transport.set_protocol(replies)
            replies.transport, replies.owner = transport, writer
            self._conn = replies
        except (Exception, asyncio.CancelledError) as exc:
            failure = NotSent(f"{type(exc).__name__}: {exc}" if isinstance(exc, Exception) else "script lane closed")
            failure.__cause__ = exc
            queued = self._deferred + self._now
            self._deferred, self._now = [], []
            for _, waiter, _ in queued:
                waiter(failure)
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            self._connecting = None
        self._flush()

    @property
    def connected(self) -> bool:
        """The lane's connection is open (as far as it knows)."""
        return self._conn is not None and not self._conn.closed

    async def connect(self) -> None:
        """Open the connection now, not on the first call (never raises: a failure is left
        to the next call to find)."""
        if self._closed or (self._conn is not None and not self._conn.closed):
            return
        if self._connecting is None:
            self._connecting = asyncio.get_running_loop().create_task(self._connect())
        await asyncio.gather(self._connecting, return_exceptions=True)

    def _lost(self, conn: _Replies) -> None:
        if self._conn is conn:
            self._conn = None

    async def aclose(self) -> None:
        """Write what is queued, wait briefly for the replies, close the connection."""
        if self._now or self._deferred:
            self._flush()
        if self._connecting is not None:
            await asyncio.gather(self._connecting, return_exceptions=True)
        conn = self._conn
        if conn is not None and conn.waiters and not conn.closed:
            last: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            conn.waiters.append((_resolve(last), time.monotonic()))
            assert conn.transport is not None
            conn.transport.write(b"*1\r\n$4\r\nPING\r\n")  # answered after everything before it
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(last, 1.0)
        self._closed = True
        if conn is not None:
            conn.fail(ConnectionError("script lane closed"))
        self._conn = None
