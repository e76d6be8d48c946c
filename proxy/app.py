"""Where the proxy is assembled: settings in, one ASGI application out.

``ProxyApp`` sends ``POST /v1/chat/completions`` straight to the raw-ASGI hot path
(``proxy.pipeline.ChatCompletions``) and everything else to a small Starlette app
(``GET /v1/models``, ``GET /healthz``, OpenAI-shaped 404/405). The lifespan builds, per
worker and in this order: the in-process emulator (``--upstream emulator`` only), the
pooled upstream client, the store, the usage log, the model catalog and the endpoint; it
closes them in reverse order at shutdown.

``/api/v1/...`` paths are accepted as aliases of ``/v1/...``, so clients configured with
OpenRouter's base-URL shape work unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.admission import Admission, NoLimits
from proxy.asgi import Receive, Scope, Send
from proxy.auth import Keyring
from proxy.background import BackgroundServer
from proxy.catalog import ModelCatalog, openai_model_list
from proxy.config import Settings, load_settings
from proxy.errors import MethodNotAllowed, NotFound, ProxyError, render_error
from proxy.ledger import UsageLog
from proxy.pipeline import ChatCompletions
from proxy.routing import Router, load_router
from proxy.sinks import Activity, StoreTotalsSink
from proxy.store import Store, open_store
from proxy.upstream import OpenRouterClient

__all__ = ["ProxyApp", "app_from_env", "create_app"]

log = logging.getLogger("proxy.app")

CHAT_PATHS = frozenset({"/v1/chat/completions", "/api/v1/chat/completions", "/chat/completions"})
ENV_DEV_KEY = "PROXY_DEV_KEY_SHA256"
ENV_UPSTREAM = "PROXY_UPSTREAM"
EMULATOR_KEY = "sk-or-emulator-local"


@dataclass(slots=True)
class Runtime:
    """The per-worker objects that live from startup to shutdown."""

    client: OpenRouterClient
    store: Store
    usage_log: UsageLog
    totals: StoreTotalsSink
    admission: Admission
    activity: Activity
    catalog: ModelCatalog
    chat: ChatCompletions
    emulator: BackgroundServer | None


class ProxyApp:
    """The ASGI application. ``runtime`` is set during lifespan startup."""

    def __init__(self, settings: Settings, keyring: Keyring, router: Router, *, emulator: bool = False) -> None:
        self.settings = settings
        self.keyring = keyring
        self.router = router
        self.use_emulator = emulator
        self.runtime: Runtime | None = None
        routes = [
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/api/v1/models", self.list_models, methods=["GET"]),
            Route("/healthz", self.healthz, methods=["GET"]),
        ]
        self.starlette = Starlette(
            routes=routes,
            lifespan=self._lifespan,
            exception_handlers={HTTPException: _http_exception, ProxyError: _proxy_error},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        runtime = self.runtime
        if scope["type"] == "http" and runtime is not None and scope["path"] in CHAT_PATHS:
            await runtime.chat(scope, receive, send)
            return
        await self.starlette(scope, receive, send)

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        settings = self.settings
        upstream = settings.upstream
        emulator = None
        if self.use_emulator:
            from proxy.emulator import create_app as create_emulator

            emulator = BackgroundServer(create_emulator(api_key=EMULATOR_KEY))
            await emulator.start()
            upstream = upstream.model_copy(
                update={"base_url": f"{emulator.url}/api/v1", "api_key": SecretStr(EMULATOR_KEY)}
            )
            log.info("upstream: built-in OpenRouter emulator at %s/api/v1", emulator.url)
        client = OpenRouterClient(upstream)
        await client.start()
        store = open_store(settings.store.redis_url)
        usage_log = UsageLog(settings.usage.log_path, settings.usage.flush_interval_s)
        await usage_log.start()
        totals = StoreTotalsSink(store)
        catalog = ModelCatalog(lambda: client.get_json("/models"), upstream.models_ttl_s)
        admission: Admission = NoLimits()
        activity = Activity()
        chat = ChatCompletions(
            keyring=self.keyring,
            router=self.router,
            client=client,
            admission=admission,
            sinks=[usage_log, totals],
            max_body_bytes=settings.server.max_body_bytes,
            activity=activity,
        )
        self.runtime = Runtime(client, store, usage_log, totals, admission, activity, catalog, chat, emulator)
        try:
            yield
        finally:
            self.runtime = None
            await totals.drain()
            await usage_log.close()
            await store.aclose()
            await client.aclose()
            if emulator is not None:
                await emulator.stop()

    async def list_models(self, request: Request) -> Response:
        """``GET /v1/models``: OpenRouter's catalog in OpenAI's list shape, plus aliases."""
        self.keyring.authenticate(_authorization(request))
        runtime = self._runtime()
        models = await runtime.catalog.models()
        return JSONResponse(openai_model_list(models, self.router.model_aliases()))

    async def healthz(self, request: Request) -> Response:
        """Liveness: the process serves requests."""
        return JSONResponse({"status": "ok"})

    def _runtime(self) -> Runtime:
        if self.runtime is None:
            raise ProxyError("The gateway is starting or stopping.")
        return self.runtime


def _authorization(request: Request) -> bytes | None:
    value = request.headers.get("authorization")
    return value.encode("latin-1") if value is not None else None


async def _proxy_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProxyError)
    status, headers, body = render_error(exc, request.headers.get("x-request-id"))
    return Response(body, status_code=status, headers={k.decode(): v.decode() for k, v in headers})


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error: ProxyError
    if exc.status_code == 405:
        error = MethodNotAllowed(f"Method {request.method} is not allowed on {request.url.path}.")
    else:
        error = NotFound(f"Unknown path {request.url.path}.")
    return await _proxy_error(request, error)


def create_app(settings: Settings, *, dev_key_sha256: str | None = None, emulator: bool = False) -> ProxyApp:
    """Build the app from validated settings (policies are loaded and compiled here).

    ``dev_key_sha256`` adds the one-time development key printed by ``serve`` when no
    keys are configured. Raises ``ConfigError`` for an invalid policy file.
    """
    entries = [(k.sha256, k.name, k.team, k.tier) for k in settings.keys]
    if dev_key_sha256:
        entries.append((dev_key_sha256, "dev", "dev", None))
    return ProxyApp(settings, Keyring(entries), load_router(settings.policies_dir), emulator=emulator)


def app_from_env() -> ProxyApp:
    """uvicorn factory for worker processes: everything comes from the environment."""
    path = Path(os.environ.get("PROXY_CONFIG", "config.yaml"))
    settings = load_settings(path, os.environ)
    return create_app(
        settings,
        dev_key_sha256=os.environ.get(ENV_DEV_KEY) or None,
        emulator=os.environ.get(ENV_UPSTREAM) == "emulator",
    )
