"""Where the proxy is assembled: settings in, one ASGI application out.

``ProxyApp`` sends ``POST /v1/chat/completions`` straight to the raw-ASGI hot path
(``proxy.pipeline.ChatCompletions``) and everything else to a small Starlette app
(``GET /v1/models``, ``GET /healthz``, OpenAI-shaped 404/405). The lifespan builds, per
worker and in this order: the in-process emulator (``--upstream emulator`` only), the
pooled upstream client, the store, the usage log, the model catalog, the observability side
(``proxy.observability``: ledger, metrics, request log, reconciliation, export, ``/metrics``,
``/readyz``, ``/health/upstream``, ``/admin/usage``, ``/v1/usage``) and the endpoint; it
closes them in reverse order at shutdown.

``/api/v1/...`` paths are accepted as aliases of ``/v1/...``, so clients configured with
OpenRouter's base-URL shape work unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy import gc_tuning
from proxy.admin import AdminAPI, admin_routes
from proxy.admission import Admission
from proxy.asgi import Receive, Scope, Send, send_error
from proxy.auth import Keyring, authorization_of
from proxy.background import BackgroundServer
from proxy.breaker import Breakers
from proxy.cache import ResponseCache
from proxy.catalog import ModelCatalog, openai_model_list
from proxy.config import Settings, load_settings
from proxy.errors import InternalError, MethodNotAllowed, NotFound, ProxyError, StoreDown, Unavailable, render_error
from proxy.keystore import KeySync, open_keystore
from proxy.limits import LimitsPolicy, check_key_tiers, load_limits_policy, open_limiter
from proxy.observability import Observability, observability_routes
from proxy.pacing import Pacer
from proxy.pipeline import ChatCompletions
from proxy.routing import ContextGuard, ReloadingRouter, Router
from proxy.sinks import Activity
from proxy.store import Store, StoreUnavailable, open_store
from proxy.upstream import OpenRouterClient
from proxy.usagelog import UsageLog
from proxy.yamlsrc import ConfigError

__all__ = ["ProxyApp", "app_from_env", "create_app"]

log = logging.getLogger("proxy.app")

CHAT_PATHS = frozenset({"/v1/chat/completions", "/api/v1/chat/completions", "/chat/completions"})
# Response headers a browser app may read (CORS): the proxy's own and OpenRouter's relayed ones.
CORS_EXPOSED = (
    "x-request-id",
    "x-proxy-model",
    "x-proxy-route",
    "x-proxy-policy",
    "x-proxy-cache",
    "x-proxy-degraded",
    "x-generation-id",
    "x-provider-name",
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
    "retry-after",
    "retry-after-ms",
    "x-should-retry",
)
ENV_DEV_KEY = "PROXY_DEV_KEY_SHA256"
ENV_UPSTREAM = "PROXY_UPSTREAM"
EMULATOR_KEY = "sk-or-emulator-local"


@dataclass(slots=True)
class Runtime:
    """The per-worker objects that live from startup to shutdown."""

    client: OpenRouterClient
    store: Store
    usage_log: UsageLog
    obs: Observability
    admission: Admission
    activity: Activity
    catalog: ModelCatalog
    chat: ChatCompletions
    emulator: BackgroundServer | None
    breakers: Breakers
    admin: AdminAPI | None = None


class ProxyApp:
    """The ASGI application. ``runtime`` is set during lifespan startup."""

    def __init__(
        self,
        settings: Settings,
        keyring: Keyring,
        router: Router,
        *,
        emulator: bool = False,
        limits: LimitsPolicy | None = None,
        tune_gc: bool = False,
    ) -> None:
        self.settings = settings
        self.tune_gc = tune_gc
        self.keyring = keyring
        self.router = router
        self.limits = limits or LimitsPolicy()
        self.use_emulator = emulator
        self.runtime: Runtime | None = None
        routes = [
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/api/v1/models", self.list_models, methods=["GET"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            *admin_routes(self._admin),
            *observability_routes(lambda: self._runtime().obs),
        ]
        self.starlette = Starlette(
            routes=routes,
            lifespan=self._lifespan,
            exception_handlers={
                HTTPException: _http_exception,
                ProxyError: _proxy_error,
                StoreUnavailable: _store_down,
                Exception: _unexpected,
            },
        )

        origins = settings.server.cors_allow_origins
        self._cors = (
            CORSMiddleware(
                self._serve,
                allow_origins=list(origins),
                allow_methods=["GET", "POST", "PATCH", "DELETE"],
                allow_headers=["*"],
                expose_headers=list(CORS_EXPOSED),
                max_age=600,
            )
            if origins
            else None
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._cors is not None:  # browsers' preflights and response headers (server.cors_allow_origins)
            await self._cors(scope, receive, send)
        else:
            await self._serve(scope, receive, send)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in CHAT_PATHS:
            runtime = self.runtime
            if runtime is not None:
                await runtime.chat(scope, receive, send)
            else:
                await send_error(send, Unavailable("The gateway is starting or stopping; retry shortly."), None)
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
        client = OpenRouterClient(upstream, Pacer(settings.limits.pacing))
        await client.start()
        store = open_store(settings.store.redis_url)
        usage_log = UsageLog(settings.usage.log_path, settings.usage.flush_interval_s)
        await usage_log.start()
        catalog = ModelCatalog(lambda: client.get_json("/models"), upstream.models_ttl_s)
        keys = KeySync(open_keystore(store), self.keyring)
        await keys.start()
        limiter = open_limiter(settings.limits, self.limits, store, catalog, budgets_of=keys.budgets_of)
        await limiter.start()
        admission: Admission = limiter
        activity = Activity()
        breakers = Breakers(settings.breaker)
        obs = Observability(
            settings, store, client, catalog, self.keyring, activity, breakers.snapshot, limiter.state, usage_log
        )
        if obs.reconciler is not None:
            obs.reconciler.on_correction = _budget_correction(limiter)
        if obs.metrics is not None:
            breakers.listeners.append(obs.metrics.breaker_state)
            obs.metrics.watch_limits(limiter.failover)
        await obs.start()
        chat = ChatCompletions(
            keyring=self.keyring,
            router=self.router,
            client=client,
            admission=admission,
            sinks=[obs.sink],
            server=settings.server,
            retries=settings.retries,
            breakers=breakers,
            activity=activity,
            context_guard=ContextGuard(catalog),
            cache=ResponseCache(store, retry_s=settings.limits.store_retry_s),
            metrics=obs.metrics,
            capture_content=settings.logging.include_content and obs.request_log is not None,
        )
        await breakers.start(store)
        await self.router.start()
        admin = AdminAPI(settings.admin.key_sha256, self.keyring, keys.store, keys, limiter)
        self.runtime = Runtime(
            client, store, usage_log, obs, admission, activity, catalog, chat, emulator, breakers, admin
        )
        if self.tune_gc:
            log.debug("garbage collector tuned: %d startup objects frozen", gc_tuning.tune_gc())
        try:
            yield
        finally:
            await _until_idle(activity, settings.server.drain_timeout_s)
            await self.router.stop()
            await breakers.stop()
            self.runtime = None
            await obs.close()
            await usage_log.close()
            await limiter.aclose()
            await keys.aclose()
            await store.aclose()
            await client.aclose()
            if emulator is not None:
                await emulator.stop()

    async def list_models(self, request: Request) -> Response:
        """``GET /v1/models``: OpenRouter's catalog in OpenAI's list shape, plus aliases."""
        self.keyring.authenticate(authorization_of(request.headers))
        runtime = self._runtime()
        models = await runtime.catalog.models()
        return JSONResponse(openai_model_list(models, self.router.model_aliases()))

    async def healthz(self, request: Request) -> Response:
        """Liveness: the process serves requests."""
        return JSONResponse({"status": "ok"})

    def _admin(self) -> AdminAPI:
        admin = self._runtime().admin
        if admin is None:
            raise Unavailable("The gateway is starting or stopping; retry shortly.")
        return admin

    def _runtime(self) -> Runtime:
        if self.runtime is None:
            raise Unavailable("The gateway is starting or stopping; retry shortly.")
        return self.runtime


async def _proxy_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProxyError)
    status, headers, body = render_error(exc, request.headers.get("x-request-id"))
    return Response(body, status_code=status, headers={k.decode(): v.decode() for k, v in headers})


async def _until_idle(activity: Activity, timeout_s: float) -> None:
    """Let requests uvicorn is still finishing (or just cancelled) settle and record first."""
    deadline = asyncio.get_running_loop().time() + min(timeout_s, 10.0)
    while activity.requests and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110 (a counter, polled briefly)
        await asyncio.sleep(0.02)


def _budget_correction(admission: Admission) -> Callable[[dict[str, Any], int], Awaitable[bool]]:
    """The reconciler's ``on_correction``: the budgets a settled ticket's request charged
    (its ``budget``: keys and the amount charged) move to OpenRouter's cost."""

    async def correct(ticket: dict[str, Any], delta_nusd: int) -> bool:
        budget = ticket.get("budget")
        if not isinstance(budget, dict) or not isinstance(budget.get("keys"), list):
            return False  # nothing was charged through the shared store (no budget, or degraded)
        final = int(ticket.get("cost_nusd") or 0) + delta_nusd  # OpenRouter's cost, nano-USD
        delta = final - int(budget.get("nusd") or 0)
        alerts = budget.get("alerts")
        return await admission.correct_budgets(budget["keys"], delta, alerts if isinstance(alerts, list) else None)

    return correct


async def _store_down(request: Request, exc: Exception) -> Response:
    """The store failed (an expected condition, logged in one line): 503 in OpenAI's envelope.
    Its own handler, so Starlette does not re-raise it to the server as it does for
    ``Exception`` (which printed a second, full traceback)."""
    log.warning("store unavailable on %s: %s", request.url.path, exc)
    return await _proxy_error(request, StoreDown("The gateway's store is unavailable; try again shortly."))


async def _unexpected(request: Request, exc: Exception) -> Response:
    """Anything else still reaches the client in OpenAI's envelope, never as a traceback."""
    log.error("internal error on %s", request.url.path, exc_info=exc)
    return await _proxy_error(request, InternalError("The gateway hit an internal error."))


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error: ProxyError
    if exc.status_code == 405:
        error = MethodNotAllowed(f"Method {request.method} is not allowed on {request.url.path}.")
    else:
        error = NotFound(f"Unknown path {request.url.path}.")
    return await _proxy_error(request, error)


def create_app(
    settings: Settings, *, dev_key_sha256: str | None = None, emulator: bool = False, tune_gc: bool = False
) -> ProxyApp:
    """Build the app from validated settings (policies are loaded and compiled here, and
    reloaded on change while the app runs: ``proxy.routing.ReloadingRouter``).

    ``dev_key_sha256`` adds the one-time development key printed by ``serve`` when no
    keys are configured. ``tune_gc``: at the end of startup, freeze the startup heap and
    raise the collector's young threshold (``proxy.gc_tuning``; for a served worker, which
    owns its process). Raises ``ConfigError`` for an invalid policy file.
    """
    entries = [(k.sha256, k.name, k.team, k.tier) for k in settings.keys]
    if dev_key_sha256:
        entries.append((dev_key_sha256, "dev", "dev", None))
    limits = load_limits_policy(settings.policies_dir / settings.limits.policy_file)
    problems = check_key_tiers(limits, [(k.name, k.tier) for k in settings.keys])
    if problems:
        raise ConfigError(problems)
    router = ReloadingRouter(settings.policies_dir)
    keyring = Keyring(entries, limits.spec.default_tier)
    return ProxyApp(settings, keyring, router, emulator=emulator, limits=limits, tune_gc=tune_gc)


def app_from_env() -> ProxyApp:
    """uvicorn factory for worker processes: everything comes from the environment."""
    path = Path(os.environ.get("PROXY_CONFIG", "config.yaml"))
    settings = load_settings(path, os.environ)
    return create_app(
        settings,
        dev_key_sha256=os.environ.get(ENV_DEV_KEY) or None,
        emulator=os.environ.get(ENV_UPSTREAM) == "emulator",
        tune_gc=True,
    )
