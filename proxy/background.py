"""Serve an ASGI app on a loopback port inside the running event loop.

Used by ``serve --upstream emulator`` to run the OpenRouter emulator next to the proxy
in the same worker. It binds ``127.0.0.1`` on a free port and uses uvicorn's
``startup``/``shutdown`` directly, so it never installs signal handlers of its own.
"""

from __future__ import annotations

import socket

import uvicorn

from proxy.asgi import ASGIApp

__all__ = ["BackgroundServer"]


class BackgroundServer:
    """``await start()`` -> port; ``await stop()``."""

    def __init__(self, app: ASGIApp, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self._socket: socket.socket | None = None
        self._server = uvicorn.Server(
            uvicorn.Config(app, host=host, port=0, lifespan="off", log_config=None, log_level=None, access_log=False)
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> int:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        self._socket = sock
        self.port = sock.getsockname()[1]
        config = self._server.config
        if not config.loaded:
            config.load()
        self._server.lifespan = config.lifespan_class(config)
        await self._server.startup(sockets=[sock])
        return self.port

    async def stop(self) -> None:
        if self._socket is None:
            return
        self._server.should_exit = True
        await self._server.shutdown(sockets=[self._socket])
        self._socket = None
