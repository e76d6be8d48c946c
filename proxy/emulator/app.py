"""The emulator as a raw ASGI application: lifespan, auth, routing, request records.

Routes (base path ``/api/v1``, openrouter-api.md §1, §6):

==========  ======================================  ===========================
method      path                                    auth
==========  ======================================  ===========================
POST        /api/v1/chat/completions                yes (``chat.py``)
GET         /api/v1/models                          no (public on OpenRouter)
GET         /api/v1/models/{author}/{slug}/endpoints no
GET         /api/v1/generation?id=gen-…             yes
GET         /api/v1/key  (alias /api/v1/auth/key)   yes
GET         /api/v1/credits                         yes
GET         /_emulator/requests                     no; JSON list of ``EmulatedRequest``
GET         /_emulator/attempts                     no; ``{fault key: attempts counted}``
POST        /_emulator/reset                        no; clears records and counters
==========  ======================================  ===========================

Anything else gets a 404 OpenRouter error envelope.  Every request except ``/_emulator/*``
is recorded in ``Emulator.requests`` (last 1000), also when the app raises on purpose
(``cut``, ``reset``).
"""

from __future__ import annotations

import random
import time
from collections import deque
from pathlib import Path
from typing import Final
from urllib.parse import parse_qs

import orjson

from proxy.emulator.catalog import Catalog
from proxy.emulator.chat import ChatEndpoint
from proxy.emulator.faults import ErrorBook
from proxy.emulator.fixtures import FixtureStore
from proxy.emulator.records import (
    EmulatedRequest,
    Exchange,
    GenerationStore,
    redact_headers,
    render_generation,
)
from proxy.emulator.route import Router
from proxy.emulator.schedule import FaultSchedule
from proxy.emulator.sender import send_whole
from proxy.emulator.types import Message, Receive, Scope, Send
from proxy.emulator.wire import JSON_HEADERS, error_body

__all__ = ["DATA_DIR", "FIXTURES_DIR", "Emulator", "create_app"]

DATA_DIR: Final = Path(__file__).with_name("data")
FIXTURES_DIR: Final = DATA_DIR / "fixtures"
"""Bundled copy of the shared OpenRouter fixtures; pass as ``fixtures_dir`` to replay them."""

API: Final = "/api/v1"
_MISSING_AUTH: Final = error_body("No cookie auth credentials found", 401)
_BAD_AUTH: Final = error_body("User not found.", 401)
_NOT_FOUND: Final = error_body("Not Found", 404)
_NO_GENERATION: Final = error_body("Generation not found", 404)
_NO_MODEL: Final = error_body("Model not found", 404)
_PUBLIC: Final = frozenset({f"{API}/models"})


class Emulator:
    """OpenRouter stand-in; one instance holds all state (records, counters, generations)."""

    def __init__(self, *, fixtures_dir: Path | None = None, api_key: str | None = None) -> None:
        self.api_key = api_key
        self.requests: deque[EmulatedRequest] = deque(maxlen=1000)
        """The last 1000 requests, oldest first."""
        self.generations = GenerationStore()
        self.schedule = FaultSchedule()
        """Attempt counters and time windows of scripted faults."""
        self.catalog = Catalog.load(DATA_DIR)
        self._key_body = _compact(FIXTURES_DIR / "key.json")
        self._credits_body = _compact(FIXTURES_DIR / "credits.json")
        self._chat = ChatEndpoint(
            Router(self.catalog, ErrorBook(FIXTURES_DIR / "errors"), self.schedule),
            FixtureStore(fixtures_dir),
            self.generations,
            random.Random(),
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await _lifespan(receive, send)
        else:
            raise RuntimeError(f"unsupported ASGI scope type {kind!r}")

    def reset(self) -> None:
        """Forget recorded requests, generations and fault schedules."""
        self.requests.clear()
        self.generations.clear()
        self.schedule.clear()

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        if path.startswith("/_emulator/"):
            return await self._control(scope["method"], path, send)
        ex = Exchange(path=path, headers=redact_headers(scope["headers"]), started=time.monotonic())

        async def recording_send(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("body", b"")[:5] == b"data:":
                    ex.data_events += 1
            elif message["type"] == "http.response.start":
                ex.status = message["status"]
            await send(message)

        try:
            await self._route(scope, receive, recording_send, ex)
        finally:
            self.requests.append(ex.freeze(time.monotonic()))
        return None

    async def _route(self, scope: Scope, receive: Receive, send: Send, ex: Exchange) -> None:
        method: str = scope["method"]
        path = ex.path
        if not path.startswith(API + "/"):
            return await _json(send, 404, _NOT_FOUND)
        if path not in _PUBLIC and not path.startswith(f"{API}/models/"):
            denied = self._auth_error(scope)
            if denied is not None:
                return await _json(send, 401, denied)
        if method == "POST" and path == f"{API}/chat/completions":
            body = await _read_body(receive)
            if body is None:
                ex.cancelled = True
                return None
            return await self._chat.handle(body, ex.headers, receive, send, ex)
        if method != "GET":
            return await _json(send, 404, _NOT_FOUND)
        if path == f"{API}/models":
            return await _json(send, 200, self.catalog.models_body)
        if path.startswith(f"{API}/models/") and path.endswith("/endpoints"):
            model_id = path[len(f"{API}/models/") : -len("/endpoints")]
            body = self.catalog.endpoints_body(model_id)
            return await _json(send, 200 if body else 404, body or _NO_MODEL)
        if path == f"{API}/generation":
            return await self._generation(scope, send)
        if path in (f"{API}/key", f"{API}/auth/key"):
            return await _json(send, 200, self._key_body)
        if path == f"{API}/credits":
            return await _json(send, 200, self._credits_body)
        return await _json(send, 404, _NOT_FOUND)

    def _auth_error(self, scope: Scope) -> bytes | None:
        """401 body for a missing or wrong bearer token, else None."""
        value = next((v for k, v in scope["headers"] if k.lower() == b"authorization"), b"")
        scheme, _, token = value.decode("latin-1").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return _MISSING_AUTH
        if self.api_key is not None and token != self.api_key:
            return _BAD_AUTH
        return None

    async def _generation(self, scope: Scope, send: Send) -> None:
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        ids = query.get("id")
        if not ids:
            return await _json(send, 400, error_body("Missing required query parameter: id", 400))
        record = self.generations.get(ids[0])
        if record is None:
            return await _json(send, 404, _NO_GENERATION)
        return await _json(send, 200, render_generation(record))

    async def _control(self, method: str, path: str, send: Send) -> None:
        if method == "GET" and path == "/_emulator/requests":
            return await _json(send, 200, orjson.dumps(list(self.requests)))
        if method == "GET" and path == "/_emulator/attempts":
            return await _json(send, 200, orjson.dumps(self.schedule.attempts()))
        if method == "POST" and path == "/_emulator/reset":
            self.reset()
            return await _json(send, 200, b'{"ok":true}')
        return await _json(send, 404, _NOT_FOUND)


def create_app(*, fixtures_dir: Path | None = None, api_key: str | None = None) -> Emulator:
    """Build an emulator.

    ``fixtures_dir``: directory for the ``fixture`` control (e.g. ``FIXTURES_DIR``); None
    disables replay.  ``api_key``: the only accepted bearer token; None accepts any
    non-empty one.
    """
    return Emulator(fixtures_dir=fixtures_dir, api_key=api_key)


def _compact(path: Path) -> bytes:
    return orjson.dumps(orjson.loads(path.read_bytes()))


async def _json(send: Send, status: int, body: bytes) -> None:
    await send_whole(send, status, JSON_HEADERS, body)


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None if the client disconnected first."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
