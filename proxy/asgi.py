"""Small raw-ASGI helpers shared by the hot-path endpoint and the app."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from proxy.errors import BodyTooLarge, ProxyError, render_error
from proxy.http_protocol import DISCONNECT_HOOK, DisconnectHook

__all__ = [
    "ASGIApp",
    "ClientDisconnected",
    "DisconnectWatch",
    "Receive",
    "Scope",
    "Send",
    "read_body",
    "send_error",
    "send_response",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class ClientDisconnected(Exception):
    """The client went away before the request body was read."""


async def read_body(receive: Receive, limit: int, content_length: int | None) -> bytes:
    """The whole request body; ``BodyTooLarge`` (413) once it exceeds ``limit`` bytes."""
    if content_length is not None and content_length > limit:
        raise BodyTooLarge(f"The request body is larger than the limit of {limit} bytes.")
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientDisconnected
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > limit:
            raise BodyTooLarge(f"The request body is larger than the limit of {limit} bytes.")
        return body
    parts = [body]
    size = len(body)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"The request body is larger than the limit of {limit} bytes.")
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


async def send_response(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_error(send: Send, error: ProxyError, request_id: str | None) -> int:
    """Send ``error`` in OpenAI's envelope; return the status sent."""
    status, headers, body = render_error(error, request_id)
    await send_response(send, status, headers, body)
    return status


class DisconnectWatch:
    """Cancels ``task`` when the client disconnects, and remembers that it did.

    Start it once the request body has been read (``receive`` then yields only
    ``http.disconnect``). The cancelled task checks ``disconnected`` to tell a client
    hang-up from a shutdown, and calls ``stop`` before its last ``send``.

    Served by ``proxy.http_protocol.HeadGuardProtocol`` (``openrouter-proxy serve``), the
    protocol tells of the hang-up through the scope's ``DisconnectHook``; under another
    server a task waits on ``receive`` and is cancelled by ``stop``.
    """

    __slots__ = ("_hook", "_task", "_watcher", "disconnected")

    def __init__(self, scope: Scope, receive: Receive, task: asyncio.Task[Any]) -> None:
        self.disconnected = False
        self._task = task
        extension = scope.get("extensions", {}).get(DISCONNECT_HOOK)
        hook: DisconnectHook | None = extension["hook"] if extension else None
        self._hook = hook
        self._watcher: asyncio.Task[None] | None = None
        if hook is not None:
            if hook.lost:  # the client left before the watch began (during admission, say)
                self._disconnected()
            else:
                hook.callback = self._disconnected
        else:
            self._watcher = asyncio.get_running_loop().create_task(self._watch(receive))

    def _disconnected(self) -> None:
        self.disconnected = True
        self._task.cancel()

    async def _watch(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self._disconnected()
                return

    def stop(self) -> None:
        if self._hook is not None:
            self._hook.callback = None
        if self._watcher is not None:
            self._watcher.cancel()
