"""uvicorn's httptools protocol with a deadline and a size limit for each request head.

**Deadline (slow-header defence).** uvicorn closes a connection that stays idle after a
response (``timeout_keep_alive``), but not one that sends nothing after connecting, nor one
that sends a request head a byte at a time: each holds a socket and its buffers for as long
as the client likes, so a few thousand such connections ("slowloris") exhaust a worker's
file descriptors while costing the client nothing. ``HeadGuardProtocol`` closes a
connection that holds neither a request the proxy is answering nor an idle keep-alive wait
for ``header_timeout_s`` seconds (``server.header_timeout_s``, 30 s; nginx's
``client_header_timeout`` plays this part at the edge):

* a new connection that has not completed a request head;
* a request head that arrives a byte at a time (the deadline runs from its first byte
  and is not moved by later bytes);
* bytes that start no request after a response: ``\\r\\n`` (which the parser skips, and
  which stops uvicorn's keep-alive timer), or the rest of a body nobody reads.

While a response is in progress the deadline does not run, even if the client has sent
(part of) its next, pipelined request: uvicorn stops reading then, and cutting a stream
for it would punish the wrong side. The body of the request being answered has its own
deadline in the endpoint (``server.body_timeout_s``). In the common case (a whole request
in one read) no timer is set at all beyond one per connection.

**Size.** httptools sets no limit on a request head: it gathers a header (or the request
line) of any length in memory until it ends, and uvicorn keeps every header, so one
connection sending a never-ending header line grows the worker by as much as it sends
(hundreds of MB within the deadline on loopback). A head still incomplete after more than
``max_header_bytes`` (``server.max_header_bytes``, 64 KiB; nginx allows 32 KiB by default)
is answered ``431`` in OpenAI's error envelope (``code: request_header_fields_too_large``)
and the connection closed; if a response is in progress on it (a pipelined head), the
connection is only closed. The count starts with the read after the one where the head
began (the parser does not say where in a read a head begins), so a head is cut somewhere
between ``max_header_bytes`` and that plus one read (at most 256 KiB).

**Hang-ups.** Each request's scope carries a ``DisconnectHook`` under
``scope["extensions"][DISCONNECT_HOOK]["hook"]`` (an ASGI extension is a dict): the
endpoint sets its ``callback``, which the protocol calls when the connection is lost before
that request's response completed, or finds ``lost`` set if it was lost earlier. That
covers the request being answered as well as a pipelined one behind it (uvicorn itself
marks only the newest as disconnected). Once a request's body is complete the protocol
keeps reading the socket (uvicorn pauses at 64 KiB of unread body until the next
``receive``), so that it sees the client go. The endpoint learns of a
hang-up without a task of its own waiting on ``receive`` that it must cancel at the end of
every request (``proxy.asgi.DisconnectWatch``).

``serve`` passes ``head_guard_protocol(header_timeout_s, max_header_bytes)`` as uvicorn's
``http``: a ``functools.partial`` of the class, so it pickles into spawned workers.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from proxy.errors import HeaderTooLarge, render_error

__all__ = ["DISCONNECT_HOOK", "DisconnectHook", "HeadGuardProtocol", "head_guard_protocol"]

_REASONS = {431: b"Request Header Fields Too Large"}

DISCONNECT_HOOK = "openrouter_proxy.disconnect"
"""The key of a request's ``DisconnectHook`` in ``scope["extensions"]``."""


class DisconnectHook:
    """``callback`` (no arguments) is called once if the connection is lost before the
    response of the request it belongs to completed; ``None`` (the default) ignores it.
    ``lost`` tells of a loss that came before any callback was set."""

    __slots__ = ("callback", "lost")

    def __init__(self) -> None:
        self.callback: Callable[[], object] | None = None
        self.lost = False


class HeadGuardProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` that closes the connection when a request head is late or too
    large (see the module docstring)."""

    def __init__(
        self, *args: Any, header_timeout_s: float = 30.0, max_header_bytes: int = 65536, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self.max_header_bytes = max_header_bytes
        self._head_deadline: asyncio.TimerHandle | None = None
        self._in_head = False  # a request began and its head is not complete yet
        self._heads = 0  # request heads begun on this connection
        self._head_bytes = 0  # bytes of the current head, from the read after the one it began in
        self._running: RequestResponseCycle | None = None  # the request being answered (pipelined ones wait)

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        self._running = cycle
        super()._start_asgi_task(cycle, app)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        head = self._heads if self._in_head else -1  # a head in progress before this read
        super().data_received(data)
        if self._in_head and self._heads == head:  # the same head, still incomplete: all of it is head
            self._head_bytes += len(data)
            if self._head_bytes > self.max_header_bytes:
                self._head_too_large()
                return
        if self._answering():
            self._disarm()
        elif self._in_head or self.timeout_keep_alive_task is None:
            self._arm()  # a head in progress, or bytes that started none (keep-alive stopped)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope.setdefault("extensions", {})[DISCONNECT_HOOK] = {"hook": DisconnectHook()}
        self._in_head = True
        self._heads += 1
        self._head_bytes = 0

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if not self.pipeline:  # uvicorn pauses reading at 64 KiB of unread body and only ``receive``
            self.flow.resume_reading()  # resumes it: keep reading, so that a hang-up is seen

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._in_head and not self._answering():
            self._arm()  # a pipelined head the client has not finished

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)
        # uvicorn marks only the newest request as disconnected; the one answered may be older
        cycles: list[RequestResponseCycle | None] = [self.cycle]
        if self._running is not self.cycle:
            cycles.append(self._running)
        for cycle in cycles:
            if cycle is None or cycle.response_complete:
                continue
            cycle.disconnected = True
            hook = cycle.scope.get("extensions", {}).get(DISCONNECT_HOOK, {}).get("hook")
            if isinstance(hook, DisconnectHook):
                hook.lost = True
                if hook.callback is not None:
                    callback, hook.callback = hook.callback, None
                    callback()

    def _answering(self) -> bool:
        """A response is in progress, or requests wait for their turn (reading is paused)."""
        cycle = self.cycle
        return (cycle is not None and not cycle.response_complete) or bool(self.pipeline)

    def _arm(self) -> None:
        if self._head_deadline is None and not self.transport.is_closing():
            self._head_deadline = self.loop.call_later(self.header_timeout_s, self._head_late)

    def _disarm(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_late(self) -> None:
        self._head_deadline = None
        if not self._answering() and not self.transport.is_closing():
            self.logger.debug("closing a connection whose request head was late")
            self.transport.close()

    def _head_too_large(self) -> None:
        self._disarm()
        if self.transport.is_closing():
            return
        self.logger.warning("closing a connection whose request head passed %d bytes", self.max_header_bytes)
        if not self._answering():  # else a response is on the wire: no room for another one
            error = HeaderTooLarge(f"The request head is larger than the limit of {self.max_header_bytes} bytes.")
            status, headers, body = render_error(error)
            head = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS[status])]
            head += [name + b": " + value + b"\r\n" for name, value in headers]
            self.transport.write(b"".join([*head, b"connection: close\r\n\r\n", body]))
        self.transport.close()


def head_guard_protocol(header_timeout_s: float, max_header_bytes: int) -> functools.partial[HeadGuardProtocol]:
    """uvicorn's ``http`` argument: the protocol with ``header_timeout_s`` (seconds) and
    ``max_header_bytes`` (bytes)."""
    return functools.partial(HeadGuardProtocol, header_timeout_s=header_timeout_s, max_header_bytes=max_header_bytes)
