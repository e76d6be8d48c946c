"""FaultNet: a TCP front that forwards HTTP/1.1 to a server, but resets or black-holes
scripted requests — the network failures an ASGI app cannot produce.

::

    with FaultNet("127.0.0.1", emulator_port, reset_first=2) as net:
        url = f"{net.url}/api/v1/chat/completions"   # 1st and 2nd request: reset; then forwarded

Requests are counted in arrival order over all connections (a request is one head; its body
is framed by ``content-length``).  Request number ``k`` (0-based, since start or the last
``script()``):

- ``k < reset_first``: once the request (head and body) has been read, the connection is
  reset — ``SO_LINGER`` 0 then close, so the client, waiting for the response, gets an RST
  (``ECONNRESET``; httpx ``ReadError``) and no byte.  A chunked request body is not waited for.
- ``k < reset_first + black_hole_first``: read and never answered; the connection stays open
  and silent until the client closes it or the FaultNet stops (httpx ``ReadTimeout``).
- otherwise: forwarded over an upstream connection of its own (one per client connection,
  so keep-alive works); response bytes are piped back untouched.  When the server closes, the
  client connection is closed (or reset if the server reset); when the client closes, so is
  the upstream connection, so the server sees the hang-up.

A request with a ``transfer-encoding: chunked`` body makes the rest of its connection a raw
pipe (no more requests are counted on it).  The schedule acts per request, also on reused
keep-alive connections, but an action needs a *new* request: bytes of a response already
being forwarded are never touched.  ``log`` lists ``(action, monotonic time)`` per request.
FaultNet runs its own event loop in a daemon thread, so sync and async tests can use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from types import TracebackType
from typing import Final, Literal

__all__ = ["Action", "FaultNet"]

Action = Literal["reset", "black-hole", "forward"]
_HEAD_END: Final = b"\r\n\r\n"
_PIECE: Final = 65536


class FaultNet:
    """Listens on 127.0.0.1:<free port> once started (``with`` or ``start()``)."""

    def __init__(self, target_host: str, target_port: int, *, reset_first: int = 0, black_hole_first: int = 0) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.log: list[tuple[Action, float]] = []
        """``(action, time.monotonic())`` of every request, in arrival order."""
        self._lock = threading.Lock()
        self._reset_first = reset_first
        self._black_hole_first = black_hole_first
        self._counted = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``; add the target's path (e.g. ``/api/v1``)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def actions(self) -> list[Action]:
        with self._lock:
            return [action for action, _ in self.log]

    def script(self, *, reset_first: int = 0, black_hole_first: int = 0) -> None:
        """Re-arm: the next ``reset_first`` requests are reset, the following ``black_hole_first``
        black-holed, the rest forwarded."""
        with self._lock:
            self._reset_first, self._black_hole_first, self._counted = reset_first, black_hole_first, 0

    def start(self) -> FaultNet:
        loop = self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            self._server = loop.run_until_complete(asyncio.start_server(self._accept, "127.0.0.1", 0))
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()

        self._thread = threading.Thread(target=run, name="faultnet", daemon=True)
        self._thread.start()
        if not ready.wait(5):
            raise RuntimeError("FaultNet did not start")
        return self

    def stop(self) -> None:
        """Close the listener and every connection (black holes included)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> FaultNet:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    # ------------------------------------------------------------ event-loop side

    def _next_action(self) -> Action:
        with self._lock:
            k = self._counted
            self._counted += 1
            if k < self._reset_first:
                action: Action = "reset"
            elif k < self._reset_first + self._black_hole_first:
                action = "black-hole"
            else:
                action = "forward"
            self.log.append((action, time.monotonic()))
            return action

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        upstream: asyncio.StreamWriter | None = None
        pump: asyncio.Task[None] | None = None
        try:
            while True:
                head = await _read_head(reader)
                if head is None:
                    return
                action = self._next_action()
                if action == "black-hole":
                    while await reader.read(_PIECE):
                        pass
                    return
                length, chunked = _framing(head)
                body = b"" if chunked else await reader.readexactly(length)
                if action == "reset":
                    _reset(writer)
                    return
                if upstream is None:
                    up_reader, upstream = await asyncio.open_connection(*self.target)
                    pump = asyncio.create_task(_pump(up_reader, writer))
                upstream.write(head + body)
                if chunked:
                    await _copy(reader, upstream)
                    return
                await upstream.drain()
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            if pump is not None:
                pump.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pump
            if upstream is not None:
                upstream.close()
            writer.close()
            self._tasks.discard(task)


async def _read_head(reader: asyncio.StreamReader) -> bytes | None:
    """The next request head (through the blank line), or None at EOF."""
    try:
        return await reader.readuntil(_HEAD_END)
    except asyncio.IncompleteReadError:
        return None
    except asyncio.LimitOverrunError:
        raise ConnectionError("request head too long") from None


def _framing(head: bytes) -> tuple[int, bool]:
    """(content-length, chunked) of a request head."""
    length, chunked = 0, False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value.strip())
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    return length, chunked


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while piece := await reader.read(_PIECE):
        writer.write(piece)
        await writer.drain()


async def _pump(upstream: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
    """Server → client; mirror the server's close (FIN) or reset (RST) to the client."""
    try:
        await _copy(upstream, client)
    except ConnectionResetError:
        _reset(client)
        return
    except (ConnectionError, OSError):
        pass
    client.close()
