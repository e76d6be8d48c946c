"""uvicorn's httptools protocol with a deadline for each request head (slow-header defence).

uvicorn closes a connection that stays idle after a response (``timeout_keep_alive``), but
not one that sends nothing after connecting, nor one that sends a request head a byte at a
time: each holds a socket and its buffers for as long as the client likes, so a few
thousand such connections ("slowloris") exhaust a worker's file descriptors while costing
the client nothing. ``HeadDeadlineProtocol`` closes a connection that holds neither a
request the proxy is answering nor an idle keep-alive wait for ``header_timeout_s``
seconds (``server.header_timeout_s``, 30 s; nginx's ``client_header_timeout`` plays this
part at the edge):

* a new connection that has not completed a request head;
* a request head that arrives a byte at a time (the deadline runs from its first byte
  and is not moved by later bytes);
* bytes that start no request after a response: ``\r\n`` (which the parser skips, and
  which stops uvicorn's keep-alive timer), or the rest of a body nobody reads.

While a response is in progress the deadline does not run, even if the client has sent
(part of) its next, pipelined request: uvicorn stops reading then, and cutting a stream
for it would punish the wrong side. The body of the request being answered has its own
deadline in the endpoint (``server.body_timeout_s``). In the common case (a whole request
in one read) no timer is set at all beyond one per connection.

``serve`` passes ``head_deadline_protocol(header_timeout_s)`` as uvicorn's ``http``: a
``functools.partial`` of the class, so it pickles into spawned workers.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["HeadDeadlineProtocol", "head_deadline_protocol"]


class HeadDeadlineProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` that closes the connection when a request head is late."""

    def __init__(self, *args: Any, header_timeout_s: float = 30.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self._head_deadline: asyncio.TimerHandle | None = None
        self._in_head = False  # a request began and its head is not complete yet

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._answering():
            self._disarm()
        elif self._in_head or self.timeout_keep_alive_task is None:
            self._arm()  # a head in progress, or bytes that started none (keep-alive stopped)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._in_head and not self._answering():
            self._arm()  # a pipelined head the client has not finished

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

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


def head_deadline_protocol(header_timeout_s: float) -> functools.partial[HeadDeadlineProtocol]:
    """uvicorn's ``http`` argument: the protocol with ``header_timeout_s`` (seconds)."""
    return functools.partial(HeadDeadlineProtocol, header_timeout_s=header_timeout_s)
