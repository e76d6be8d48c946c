"""Bare pass-through proxy: the CPU floor for ``POST /v1/chat/completions``.

A raw ASGI callable that reads the request body, forwards it to
``{UPSTREAM}/chat/completions`` with an ``Authorization`` header and streams the
upstream status, content type and body chunks back unchanged.  ``--client``
selects the upstream HTTP client; exactly one client is created per process at
lifespan startup and closed at shutdown::

    python loadtests/passthrough.py --client aiohttp --port 18000 \\
        --upstream http://127.0.0.1:18001/api/v1

``--app starlette`` serves the same aiohttp pass-through as an ordinary starlette route
(``Request.body()`` in, ``StreamingResponse`` out): the "bare starlette pass-through with
aiohttp as the upstream client" that issue #7 measured at ~660 µs per request and states
its CPU target against. The raw ASGI callable (``--app asgi``, the default) is the stricter
floor: the same stack as the proxy's hot path.

Client variants (see ``CLIENTS``):

``aiohttp``
    ``aiohttp.ClientSession`` used directly.
``httpx-aiohttp``
    Idiomatic ``httpx.AsyncClient.stream()`` over ``httpx_aiohttp.AiohttpTransport``.
``httpx``
    Idiomatic ``httpx.AsyncClient.stream()`` over httpx's default (httpcore) transport.
``httpx-aiohttp-send``
    ``client.build_request()`` + ``client.send(stream=True)`` with a pre-built
    ``httpx.Headers`` over ``AiohttpTransport``.
``httpx-aiohttp-tuned``
    ``httpx.Request`` built directly (no per-request header/URL/cookie merging,
    pre-built URL, headers and timeout extension) + ``client.send(stream=True)``
    on a client whose cookie jar ignores ``Set-Cookie``, over ``AiohttpTransport``.
``httpx-tuned``
    The same tricks over httpx's default transport.
``httpx-thin``
    The same tricks over ``ThinAiohttpTransport``, a ~40-line
    ``httpx.AsyncBaseTransport`` that calls aiohttp directly.
``httpx-thin-direct``
    ``ThinAiohttpTransport.handle_async_request()`` called directly, bypassing
    ``AsyncClient.send`` (still httpx ``Request``/``Response`` objects).
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any, Protocol

import aiohttp
import httpx
import uvicorn
from httpx_aiohttp import AiohttpTransport
from yarl import URL

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

CHAT_PATH = "/v1/chat/completions"
DEFAULT_UPSTREAM = "http://127.0.0.1:18001/api/v1"

_CONNECT_TIMEOUT = 10.0
_READ_TIMEOUT = 300.0
_MAX_CONNECTIONS = 100
_FALLBACK_CONTENT_TYPE = b"application/octet-stream"
_END_BODY: Message = {"type": "http.response.body", "body": b"", "more_body": False}


class UpstreamUnavailableError(Exception):
    """The upstream could not be reached before any response byte was sent."""


class Upstream(Protocol):
    """One upstream client: forwards a request body and relays the answer to ``send``."""

    async def forward(self, body: bytes, send: Send) -> None: ...

    async def aclose(self) -> None: ...


def _start_message(status: int, content_type: bytes) -> Message:
    return {
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", content_type)],
    }


def _body_message(chunk: bytes) -> Message:
    return {"type": "http.response.body", "body": chunk, "more_body": True}


def _request_headers(api_key: str) -> dict[str, str]:
    # Identity encoding: the floor relays bytes unchanged and forwards no content-encoding.
    return {
        "Authorization": f"Bearer {api_key}",
        "Content-Type": "application/json",
        "Accept-Encoding": "identity",
    }


def _aiohttp_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=_MAX_CONNECTIONS),
        timeout=aiohttp.ClientTimeout(sock_connect=_CONNECT_TIMEOUT, sock_read=_READ_TIMEOUT),
        auto_decompress=False,
    )


def _httpx_timeout() -> httpx.Timeout:
    return httpx.Timeout(_READ_TIMEOUT, connect=_CONNECT_TIMEOUT, pool=_CONNECT_TIMEOUT)


def _httpx_limits() -> httpx.Limits:
    return httpx.Limits(max_connections=_MAX_CONNECTIONS, max_keepalive_connections=_MAX_CONNECTIONS)


# --------------------------------------------------------------------------- aiohttp


class AiohttpUpstream:
    """``aiohttp.ClientSession`` used directly."""

    def __init__(self, base_url: str, api_key: str) -> None:
        self._url = URL(f"{base_url}/chat/completions")
        self._headers = _request_headers(api_key)
        self._session = _aiohttp_session()

    async def forward(self, body: bytes, send: Send) -> None:
        try:
            response = await self._session.post(self._url, data=body, headers=self._headers)
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamUnavailableError(str(exc)) from exc
        try:
            content_type = response.headers.get("Content-Type")
            await send(
                _start_message(
                    response.status,
                    content_type.encode("latin-1") if content_type else _FALLBACK_CONTENT_TYPE,
                )
            )
            async for chunk in response.content.iter_any():
                await send(_body_message(chunk))
        finally:
            response.release()
        await send(_END_BODY)

    async def aclose(self) -> None:
        await self._session.close()


# --------------------------------------------------------------------------- httpx


async def _relay_httpx(response: httpx.Response, send: Send) -> None:
    try:
        content_type = response.headers.get("content-type")
        await send(
            _start_message(
                response.status_code,
                content_type.encode("latin-1") if content_type else _FALLBACK_CONTENT_TYPE,
            )
        )
        async for chunk in response.aiter_raw():
            await send(_body_message(chunk))
    finally:
        await response.aclose()
    await send(_END_BODY)


def _httpx_client(transport: httpx.AsyncBaseTransport | None, *, ignore_cookies: bool = False) -> httpx.AsyncClient:
    client = httpx.AsyncClient(transport=transport, timeout=_httpx_timeout(), limits=_httpx_limits())
    if ignore_cookies:
        client._cookies = _NoCookies()
    return client


class HttpxUpstream:
    """Idiomatic httpx as most code writes it: ``async with client.stream(...)``."""

    def __init__(self, base_url: str, api_key: str, client: httpx.AsyncClient) -> None:
        self._url = f"{base_url}/chat/completions"
        self._headers = _request_headers(api_key)
        self._client = client

    async def forward(self, body: bytes, send: Send) -> None:
        try:
            async with self._client.stream("POST", self._url, content=body, headers=self._headers) as response:
                content_type = response.headers.get("content-type")
                await send(
                    _start_message(
                        response.status_code,
                        content_type.encode("latin-1") if content_type else _FALLBACK_CONTENT_TYPE,
                    )
                )
                async for chunk in response.aiter_raw():
                    await send(_body_message(chunk))
        except httpx.ConnectError as exc:
            raise UpstreamUnavailableError(str(exc)) from exc
        await send(_END_BODY)

    async def aclose(self) -> None:
        await self._client.aclose()


class HttpxSendUpstream(HttpxUpstream):
    """``build_request`` + ``send(stream=True)`` with a pre-built ``httpx.Headers``."""

    def __init__(self, base_url: str, api_key: str, client: httpx.AsyncClient) -> None:
        super().__init__(base_url, api_key, client)
        self._prebuilt_headers = httpx.Headers(self._headers)

    async def forward(self, body: bytes, send: Send) -> None:
        try:
            request = self._client.build_request("POST", self._url, content=body, headers=self._prebuilt_headers)
            response = await self._client.send(request, stream=True)
        except httpx.TransportError as exc:
            raise UpstreamUnavailableError(str(exc)) from exc
        await _relay_httpx(response, send)


class _NoCookies(httpx.Cookies):
    """Never parses ``Set-Cookie``: skips httpx's per-response urllib compatibility wrappers.

    An API proxy must not keep upstream cookies anyway.
    """

    def extract_cookies(self, response: httpx.Response) -> None:
        return None


class BodyStream(httpx.AsyncByteStream):
    """An in-memory request body whose bytes a transport can take without iterating."""

    __slots__ = ("body",)

    def __init__(self, body: bytes) -> None:
        self.body = body

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.body


class HttpxTunedUpstream(HttpxUpstream):
    """``httpx.Request`` built directly from pre-built parts + ``client.send(stream=True)``.

    Skips ``build_request`` (URL/header/cookie/params merging, timeout conversion);
    with ``body_stream`` also ``Request``'s content encoding (the transport must
    understand ``BodyStream``).  Pair with ``_httpx_client(ignore_cookies=True)``.
    """

    def __init__(self, base_url: str, api_key: str, client: httpx.AsyncClient, *, body_stream: bool = False) -> None:
        super().__init__(base_url, api_key, client)
        self._url_obj = httpx.URL(self._url)
        headers = httpx.Headers(client.headers)
        headers.update(self._headers)
        headers["Host"] = self._url_obj.netloc.decode("ascii")
        self._full_headers = headers
        self._extensions = {"timeout": client.timeout.as_dict()}
        self._body_stream = body_stream

    def _request(self, body: bytes) -> httpx.Request:
        if self._body_stream:
            return httpx.Request(
                "POST",
                self._url_obj,
                headers=self._full_headers,
                stream=BodyStream(body),
                extensions=self._extensions,
            )
        return httpx.Request(
            "POST", self._url_obj, headers=self._full_headers, content=body, extensions=self._extensions
        )

    async def forward(self, body: bytes, send: Send) -> None:
        try:
            response = await self._client.send(self._request(body), stream=True)
        except httpx.TransportError as exc:
            raise UpstreamUnavailableError(str(exc)) from exc
        await _relay_httpx(response, send)


# --------------------------------------------------------------------------- thin transport


class _AiohttpResponseStream(httpx.AsyncByteStream):
    __slots__ = ("_response",)

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except aiohttp.ClientError as exc:
            raise httpx.ReadError(str(exc)) from exc

    async def aclose(self) -> None:
        self._response.release()


class ThinAiohttpTransport(httpx.AsyncBaseTransport):
    """Minimal httpx transport on an ``aiohttp.ClientSession``.

    No proxy/SSL/timeout-extension plumbing: the session's own settings apply.
    Request bodies given as ``BodyStream`` (or read ``content``) are sent as bytes.
    """

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session
        self._urls: dict[str, URL] = {}

    def _url(self, url: httpx.URL) -> URL:
        key = str(url)
        parsed = self._urls.get(key)
        if parsed is None:
            if len(self._urls) > 1024:
                self._urls.clear()
            parsed = self._urls[key] = URL(key)
        return parsed

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        stream = request.stream
        data = stream.body if isinstance(stream, BodyStream) else request.content
        try:
            response = await self._session.request(
                request.method,
                self._url(request.url),
                headers=request.headers.multi_items(),
                data=data or None,
                allow_redirects=False,
            )
        except aiohttp.ClientConnectionError as exc:
            raise httpx.ConnectError(str(exc), request=request) from exc
        except aiohttp.ClientError as exc:
            raise httpx.TransportError(str(exc)) from exc
        return httpx.Response(
            response.status,
            headers=response.raw_headers,
            stream=_AiohttpResponseStream(response),
            request=request,
        )

    async def aclose(self) -> None:
        await self._session.close()


class HttpxThinDirectUpstream(HttpxTunedUpstream):
    """httpx ``Request``/``Response`` objects, but no ``AsyncClient.send``."""

    def __init__(self, base_url: str, api_key: str, transport: httpx.AsyncBaseTransport) -> None:
        super().__init__(base_url, api_key, _httpx_client(transport, ignore_cookies=True), body_stream=True)
        self._transport = transport

    async def forward(self, body: bytes, send: Send) -> None:
        try:
            response = await self._transport.handle_async_request(self._request(body))
        except httpx.TransportError as exc:
            raise UpstreamUnavailableError(str(exc)) from exc
        await _relay_httpx(response, send)


# --------------------------------------------------------------------------- selection

UpstreamFactory = Callable[[str, str], Upstream]


def _aiohttp_transport() -> AiohttpTransport:
    return AiohttpTransport(client=_aiohttp_session())


def _thin_transport() -> ThinAiohttpTransport:
    return ThinAiohttpTransport(_aiohttp_session())


CLIENTS: dict[str, UpstreamFactory] = {
    "aiohttp": AiohttpUpstream,
    "httpx-aiohttp": lambda url, key: HttpxUpstream(url, key, _httpx_client(_aiohttp_transport())),
    "httpx": lambda url, key: HttpxUpstream(url, key, _httpx_client(None)),
    "httpx-aiohttp-send": lambda url, key: HttpxSendUpstream(url, key, _httpx_client(_aiohttp_transport())),
    "httpx-aiohttp-tuned": lambda url, key: HttpxTunedUpstream(
        url, key, _httpx_client(_aiohttp_transport(), ignore_cookies=True)
    ),
    "httpx-tuned": lambda url, key: HttpxTunedUpstream(url, key, _httpx_client(None, ignore_cookies=True)),
    "httpx-thin": lambda url, key: HttpxTunedUpstream(
        url, key, _httpx_client(_thin_transport(), ignore_cookies=True), body_stream=True
    ),
    "httpx-thin-direct": lambda url, key: HttpxThinDirectUpstream(url, key, _thin_transport()),
}


# --------------------------------------------------------------------------- ASGI app


class PassThrough:
    """Raw ASGI app; the upstream client lives from lifespan startup to shutdown."""

    def __init__(self, client: str, upstream: str, api_key: str) -> None:
        self._factory = CLIENTS[client]
        self._base_url = upstream.rstrip("/")
        self._api_key = api_key
        self._upstream: Upstream | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        body: bytes = message.get("body", b"")
        while message.get("more_body", False):
            message = await receive()
            body += message.get("body", b"")
        upstream = self._upstream
        if scope["method"] != "POST" or scope["path"] != CHAT_PATH or upstream is None:
            await _plain(send, 404, b"not found")
            return
        try:
            await upstream.forward(body, send)
        except UpstreamUnavailableError:
            await _plain(send, 502, b"upstream unavailable")

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._upstream = self._factory(self._base_url, self._api_key)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._upstream is not None:
                    await self._upstream.aclose()
                    self._upstream = None
                await send({"type": "lifespan.shutdown.complete"})
                return


def starlette_app(upstream: str, api_key: str) -> Any:
    """The aiohttp pass-through as a starlette route, written the way most code writes it."""
    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Route

    url = URL(f"{upstream.rstrip('/')}/chat/completions")
    headers = _request_headers(api_key)
    sessions: list[aiohttp.ClientSession] = []

    async def chat(request: Request) -> Response:
        body = await request.body()
        try:
            response = await sessions[0].post(url, data=body, headers=headers)
        except (aiohttp.ClientError, OSError):
            return PlainTextResponse("upstream unavailable", status_code=502)
        return StreamingResponse(
            response.content.iter_any(),
            status_code=response.status,
            media_type=response.headers.get("Content-Type", _FALLBACK_CONTENT_TYPE.decode()),
            background=BackgroundTask(response.release),
        )

    async def healthz(_: Request) -> Response:
        return PlainTextResponse("ok")

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        sessions.append(_aiohttp_session())
        try:
            yield
        finally:
            await sessions.pop().close()

    routes = [Route(CHAT_PATH, chat, methods=["POST"]), Route("/healthz", healthz)]
    return Starlette(routes=routes, lifespan=lifespan)


async def _plain(send: Send, status: int, text: bytes) -> None:
    await send(_start_message(status, b"text/plain"))
    await send({"type": "http.response.body", "body": text})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--client", choices=sorted(CLIENTS), default="aiohttp")
    parser.add_argument("--app", choices=("asgi", "starlette"), default="asgi", help="starlette: aiohttp client only")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=18000)
    parser.add_argument("--upstream", default=DEFAULT_UPSTREAM, help="base URL, '/chat/completions' is appended")
    parser.add_argument("--api-key", default=os.environ.get("OPENROUTER_API_KEY", "sk-or-loadtest"))
    return parser


def run(app: Any, host: str, port: int) -> None:
    uvicorn.run(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        workers=1,
        log_level="warning",
        access_log=False,
        lifespan="on",
    )


def main() -> None:
    args = build_parser().parse_args()
    if args.app == "starlette":
        if args.client != "aiohttp":
            raise SystemExit("--app starlette uses the aiohttp client only")
        run(starlette_app(args.upstream, args.api_key), args.host, args.port)
    else:
        run(PassThrough(args.client, args.upstream, args.api_key), args.host, args.port)


if __name__ == "__main__":
    main()
