"""Client hang-ups seen at every point of a request, over raw sockets to a real server.

``serve`` is the HTTP protocol ``openrouter-proxy serve`` runs (``HeadGuardProtocol``: its
``DisconnectHook`` tells the endpoint); ``httptools`` is uvicorn's own, where a task
watching ``receive`` does. Each test checks the two outcomes that matter: the usage record
says the client left (``cancelled``, 499 when no answer had started), and the upstream call
was cancelled rather than run (and billed) to its end.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from .conftest import ALICE_KEY, ProxyUnderTest, ServerThread
from .factories import UpstreamLog

SLOW_ANSWER = {"first_byte_delay_ms": 3000}


def _request(content: str, emulator: dict[str, Any]) -> bytes:
    body = orjson.dumps(
        {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": content}], "emulator": emulator}
    )
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer %s\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % (ALICE_KEY.encode(), len(body))
    )
    return head + body


def _hang_up(sock: socket.socket, reset: bool) -> None:
    if reset:  # an RST instead of a FIN
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _assert_cancelled(proxy: ProxyUnderTest, upstream: UpstreamLog) -> None:
    (record,) = proxy.records(1, timeout=8)
    assert (record["cancelled"], record["status"]) == (True, 499)
    (sent,) = upstream.wait(1, timeout=8)  # recorded when the emulator's handler ends
    assert sent.cancelled is True


@pytest.mark.parametrize("http", ["serve", "httptools"])
def test_a_hang_up_before_the_upstream_call_began_is_seen(
    proxy_server: Callable[..., ProxyUnderTest],
    serve: Callable[..., ServerThread],
    emulator_app: Any,
    http: str,
) -> None:
    """The client leaves while the context guard waits for a slow model catalog, before the
    endpoint watches for hang-ups: the watch starts knowing the client is gone."""
    slow = False

    async def upstream_app(scope: Any, receive: Any, send: Any) -> None:
        if slow and scope["type"] == "http" and scope["path"].endswith("/models"):
            await asyncio.sleep(1.5)
        await emulator_app(scope, receive, send)

    upstream_server = serve(upstream_app, lifespan="off")
    proxy = proxy_server(
        upstream_url=f"{upstream_server.url}/api/v1",
        upstream_extra="  models_ttl_s: 0.5",
        http=None if http == "serve" else http,
    )
    upstream = UpstreamLog(emulator_app)
    slow = True
    time.sleep(1.0)  # the catalog copy is stale: a long prompt makes the guard fetch it again
    sock = socket.create_connection(("127.0.0.1", proxy.server.port))
    sock.sendall(_request("word " * 6000, SLOW_ANSWER))
    time.sleep(0.5)
    _hang_up(sock, reset=False)
    _assert_cancelled(proxy, upstream)


@pytest.mark.parametrize(("http", "reset"), [("serve", False), ("serve", True), ("httptools", False)])
def test_a_hang_up_after_a_body_over_64_kib_is_seen(
    proxy_server: Callable[..., ProxyUnderTest], emulator_app: Any, http: str, reset: bool
) -> None:
    """uvicorn stops reading the socket when more than 64 KiB of body waits to be read;
    only ``receive`` resumes it. With nothing calling ``receive`` after the body, the
    protocol itself must go on reading, or it never sees the client go."""
    proxy = proxy_server(extra="server: {max_body_bytes: 4194304}", http=None if http == "serve" else http)
    upstream = UpstreamLog(emulator_app)
    request = _request("word " * 20000, SLOW_ANSWER)
    head, body = request.split(b"\r\n\r\n", 1)
    sock = socket.create_connection(("127.0.0.1", proxy.server.port))
    sock.sendall(head + b"\r\n\r\n")
    time.sleep(0.3)  # the endpoint waits in receive() for the body
    (connection,) = proxy.server.server.server_state.connections
    connection.loop.call_soon_threadsafe(time.sleep, 0.3)  # a busy loop: the body arrives in one read
    time.sleep(0.05)
    sock.sendall(body)
    time.sleep(0.7)
    _hang_up(sock, reset)
    _assert_cancelled(proxy, upstream)


def test_a_hang_up_is_seen_by_the_request_answered_while_a_pipelined_one_waits(
    proxy_server: Callable[..., ProxyUnderTest], emulator_app: Any
) -> None:
    """uvicorn marks only the newest request on a connection as disconnected; the one being
    answered is older when the client pipelined another behind it."""
    proxy = proxy_server()
    upstream = UpstreamLog(emulator_app)
    sock = socket.create_connection(("127.0.0.1", proxy.server.port))
    sock.sendall(_request("hello", SLOW_ANSWER) + _request("hello again", {}))
    time.sleep(0.5)
    _hang_up(sock, reset=False)
    _assert_cancelled(proxy, upstream)
