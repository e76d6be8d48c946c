"""Minimal, fast mock of OpenRouter's ``POST /api/v1/chat/completions``.

Raw ASGI on uvicorn (uvloop + httptools, no access log).  Answers with the fixed
bytes of ``completion_basic.json``; when the request body asks for
``"stream": true`` it answers with ``stream_basic.sse`` sent as one ASGI body
message per SSE event.  Anything else gets a 404.  Meant for loopback load tests
only::

    python loadtests/mock_upstream.py --port 18001
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import uvicorn

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DEFAULT_FIXTURES = Path("/work/shared/openrouter/fixtures")
CHAT_PATH = "/api/v1/chat/completions"
_STREAM_MARKERS = (b'"stream":true', b'"stream": true')


def _is_stream(body: bytes) -> bool:
    return any(marker in body for marker in _STREAM_MARKERS)


class MockUpstream:
    """ASGI app serving pre-rendered chat completion fixtures."""

    def __init__(self, fixtures: Path) -> None:
        completion = (fixtures / "completion_basic.json").read_bytes()
        sse = (fixtures / "stream_basic.sse").read_bytes()
        self._json_start: Message = {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(completion)).encode()),
            ],
        }
        self._json_body: Message = {"type": "http.response.body", "body": completion}
        self._sse_start: Message = {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/event-stream"),
                (b"cache-control", b"no-cache"),
            ],
        }
        events = [event + b"\n\n" for event in sse.split(b"\n\n") if event]
        self._sse_bodies: list[Message] = [
            {"type": "http.response.body", "body": event, "more_body": True} for event in events
        ]
        self._sse_bodies.append({"type": "http.response.body", "body": b""})
        self._not_found_start: Message = {
            "type": "http.response.start",
            "status": 404,
            "headers": [(b"content-type", b"text/plain")],
        }
        self._not_found_body: Message = {"type": "http.response.body", "body": b"not found"}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        body = b""
        more_body = True
        while more_body:
            message = await receive()
            body += message.get("body", b"")
            more_body = message.get("more_body", False)
        if scope["method"] != "POST" or scope["path"] != CHAT_PATH:
            await send(self._not_found_start)
            await send(self._not_found_body)
        elif _is_stream(body):
            await send(self._sse_start)
            for message in self._sse_bodies:
                await send(message)
        else:
            await send(self._json_start)
            await send(self._json_body)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=18001)
    parser.add_argument("--fixtures", type=Path, default=DEFAULT_FIXTURES)
    args = parser.parse_args()
    uvicorn.run(
        MockUpstream(args.fixtures),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        lifespan="on",
    )


if __name__ == "__main__":
    main()
