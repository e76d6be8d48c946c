"""Send a response event by event, with pacing, stalls, cuts, resets and disconnect detection.

Uvicorn's ``send`` silently drops messages once the client is gone, so a disconnect is only
learnt from ``receive()`` returning ``http.disconnect``.  ``ClientWatch`` runs that
``receive()`` as a task, started lazily: the first time the response has to wait, or once
an unpaced stream has sent ``WATCH_AFTER`` events; from then on the stream yields to the
loop every ``WATCH_AFTER`` events so the watcher can run.  A short unpaced stream (the
default answer is 16 events) is written in one loop turn and costs no task: there is
nothing to cancel.  Every SSE event is its own ``http.response.body`` message with
``more_body=True``; an empty final message closes the body.

``tail="cut"`` raises ``EmulatedCut`` after the events: under uvicorn (httptools or h11)
the exception is logged as "Exception in ASGI application" and, the response having
started, the transport is closed without the terminating chunk, so clients see an
incomplete chunked body (httpx: ``RemoteProtocolError: peer closed connection without
sending complete message body``).  httpx's ``ASGITransport`` re-raises it to the caller.

``send_reset`` closes the connection before any response byte.  An ASGI app cannot touch
the socket, and uvicorn answers an app that raises (or returns) before
``http.response.start`` with its own ``500 Internal Server Error`` (text/plain,
``connection: close``).  But both uvicorn protocols mark the response started *before*
validating the head, so a head with an invalid header value makes ``send`` raise before a
byte is written, and the exception that follows makes uvicorn close the transport (a FIN,
not an RST): the client reads EOF with no response (httpx: ``RemoteProtocolError: Server
disconnected without sending a response``).  This relies on uvicorn internals (0.3x-0.5x);
``tests/faultnet.py`` is the reliable way to get a real TCP reset.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Final, NoReturn

from proxy.emulator.faults import Tail
from proxy.emulator.render import KEEPALIVE
from proxy.emulator.types import Headers, Message, Receive, Send

__all__ = [
    "STALL_LIMIT_S",
    "WATCH_AFTER",
    "ClientWatch",
    "EmulatedCut",
    "EmulatedReset",
    "Pacing",
    "send_events",
    "send_reset",
    "send_whole",
]

STALL_LIMIT_S: Final = 300.0
"""A ``stall`` or ``black-hole`` ends after this long if the client is still there."""
WATCH_AFTER: Final = 32
"""An unpaced stream starts watching for a disconnect after this many events, and then
yields to the loop once per this many events."""
_POISONED_HEAD: Final = [(b"x-emulator-reset", b"\r\n")]
"""A header value uvicorn refuses to write (see the module docstring)."""


class EmulatedCut(RuntimeError):
    """Raised on purpose by the ``cut`` fault to make the server abort the response."""


class EmulatedReset(RuntimeError):
    """Raised on purpose by the ``reset`` fault: the connection closes without a response."""


class ClientWatch:
    """Learns of the client's disconnect while the response waits."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._task: asyncio.Future[Message] | None = None

    @property
    def gone(self) -> bool:
        """The client disconnected (only known once watching has started)."""
        return self._task is not None and self._task.done()

    def start(self) -> None:
        """Start watching (idempotent); the watcher runs whenever the response yields."""
        if self._task is None:
            self._task = asyncio.ensure_future(self._receive())

    async def sleep(self, seconds: float) -> bool:
        """Wait ``seconds``; True (early) if the client disconnects meanwhile."""
        if seconds <= 0:
            return self.gone
        self.start()
        assert self._task is not None
        if not self._task.done():
            await asyncio.wait((self._task,), timeout=seconds)
        return self._task.done()

    def close(self) -> None:
        """Stop watching (call before returning from the app)."""
        if self._task is None:
            return
        if self._task.done():
            if not self._task.cancelled():
                self._task.exception()  # mark retrieved
        else:
            self._task.cancel()


@dataclass(frozen=True, slots=True)
class Pacing:
    """Timing of one response, in seconds."""

    chunk_delay: float = 0.0
    """Between consecutive body messages."""
    pause_at: int = -1
    """Index of the event preceded by ``pause`` (``slow-first-token``); -1 = none."""
    pause: float = 0.0
    keepalive_every: float = 0.0
    """During ``pause``, send a keep-alive comment this often; 0 = never."""


async def send_events(
    send: Send,
    watch: ClientWatch,
    status: int,
    headers: Headers,
    events: list[bytes],
    pacing: Pacing,
    tail: Tail = "end",
) -> bool:
    """Send head, ``events`` one message each, then end as ``tail`` says.

    Returns False when the client left before the end (nothing more is sent), True when
    the body was completed.  Raises ``EmulatedCut`` for ``tail="cut"``.
    """
    try:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        for index, event in enumerate(events):
            if index and pacing.chunk_delay and await watch.sleep(pacing.chunk_delay):
                return False
            if index == pacing.pause_at and not await _pause(send, watch, pacing):
                return False
            if index and not index % WATCH_AFTER:
                watch.start()
                await asyncio.sleep(0)  # let the watcher see a disconnect
            if watch.gone:
                return False
            await send({"type": "http.response.body", "body": event, "more_body": True})
        if tail == "cut":
            raise EmulatedCut("emulated connection cut (fault 'cut')")
        if tail == "stall" and await watch.sleep(STALL_LIMIT_S):
            return False
        if watch.gone:
            return False
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    except OSError:  # servers other than uvicorn may raise on a closed connection
        return False
    return True


async def _pause(send: Send, watch: ClientWatch, pacing: Pacing) -> bool:
    remaining = pacing.pause
    while remaining > 0:
        step = min(remaining, pacing.keepalive_every) if pacing.keepalive_every > 0 else remaining
        if await watch.sleep(step):
            return False
        remaining -= step
        if remaining > 0:
            await send({"type": "http.response.body", "body": KEEPALIVE, "more_body": True})
    return True


async def send_reset(send: Send) -> NoReturn:
    """Close the connection without a response (uvicorn; see the module docstring)."""
    with contextlib.suppress(Exception):
        await send({"type": "http.response.start", "status": 502, "headers": _POISONED_HEAD})
    raise EmulatedReset("emulated connection reset (fault 'reset')")


async def send_whole(send: Send, status: int, headers: Headers, body: bytes) -> None:
    """Send a complete response in one body message, with ``content-length``."""
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
