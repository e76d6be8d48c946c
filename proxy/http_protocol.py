"""uvicorn's httptools protocol with a deadline for each request head (slow-header defence).

uvicorn closes a connection that stays idle after a response (``timeout_keep_alive``), but
not one that sends nothing after connecting, nor one that sends a request head a byte at a
time: each holds a socket and its buffers for as long as the client likes, so a few
thousand such connections ("slowloris") exhaust a worker's file descriptors while costing
the client nothing. ``HeadDeadlineProtocol`` closes a connection whose request head is not
complete ``header_timeout_s`` seconds after the connection opened or the request began
(``server.header_timeout_s``, 30 s; nginx's ``client_header_timeout`` plays this part at the
edge). The body has its own deadline in the endpoint (``server.body_timeout_s``).

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

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._head_deadline = self.loop.call_later(self.header_timeout_s, self._head_late)

    def _disarm(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_late(self) -> None:
        self._head_deadline = None
        if not self.transport.is_closing():
            self.logger.debug("closing a connection whose request head was late")
            self.transport.close()


def head_deadline_protocol(header_timeout_s: float) -> functools.partial[HeadDeadlineProtocol]:
    """uvicorn's ``http`` argument: the protocol with ``header_timeout_s`` (seconds)."""
    return functools.partial(HeadDeadlineProtocol, header_timeout_s=header_timeout_s)
