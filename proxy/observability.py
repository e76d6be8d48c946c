"""The observability side of one worker, assembled from settings in one place.

What ``proxy.app``'s lifespan gets from here::

    pipeline sinks ──► AccountingSink (cost, cost source, estimate flag; PriceBook prices)
                          ├─► UsageLog ───────► the usage log (JSON lines; app-owned)
                          ├─► Ledger ─────────► store.usage (stream + per-day rollups + tickets)
                          ├─► Metrics ────────► GET /metrics
                          ├─► RequestLog ─────► one JSON line per request (stderr or a file)
                          └─► SpanSink ───────► OpenTelemetry (only if installed)
    background:  Reconciler (/generation costs) · Exporter (stream -> JSON-lines files)
    routes:      /metrics · /readyz · /health/upstream · /admin/usage · /v1/usage

``start`` starts the background parts; ``close`` flushes the ledger, stops the jobs, runs
a last export pass and closes the request log (in that order), so nothing accounted is
lost at shutdown while the store is reachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.accounting import AccountingSink, EntrySink
from proxy.auth import Keyring, authorization_of, bearer_matches
from proxy.catalog import ModelCatalog
from proxy.config import Settings
from proxy.errors import AuthenticationFailed
from proxy.exporter import Exporter, ExportLocked
from proxy.health import BreakerSnapshot, Health, LimitsState, health_routes
from proxy.ledger import Ledger
from proxy.metrics import Metrics
from proxy.pricing import PriceBook
from proxy.reconcile import Reconciler
from proxy.reqlog import RequestLog
from proxy.sinks import Activity
from proxy.store import Retention, Store
from proxy.tracing import tracing_sink
from proxy.upstream import OpenRouterClient
from proxy.usage_api import UsageAPI, usage_routes

__all__ = ["Observability", "observability_routes"]

log = logging.getLogger("proxy.observability")

_LOCK_RETRY_S = 30.0
PRICES_WAIT_S = 1.0


class Observability:
    """Ledger, metrics, logs, traces, reconciliation, export, health and usage API."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        client: OpenRouterClient,
        catalog: ModelCatalog,
        keyring: Keyring,
        activity: Activity,
        breakers: BreakerSnapshot | None = None,
        limits: LimitsState | None = None,
        usage_log: EntrySink | None = None,
    ) -> None:
        conf = settings.ledger
        max_entries = conf.stream_max_entries
        if store.name == "memory":  # the embedded store keeps its stream in this process's RAM
            max_entries = min(max_entries or conf.memory_stream_max_entries, conf.memory_stream_max_entries)
        self.retention = Retention(max_entries, conf.stream_max_age_s, conf.rollup_ttl_days * 86400)
        self.prices = PriceBook(catalog.models, refresh_s=max(settings.upstream.models_ttl_s, 60.0))
        self.metrics = (
            Metrics(key_labels=settings.metrics.key_labels, max_label_values=settings.metrics.max_label_values)
            if settings.metrics.enabled
            else None
        )
        self.metrics_token_sha256 = settings.metrics.token_sha256
        self.ledger = (
            Ledger(
                store.usage,
                self.retention,
                flush_interval_s=conf.flush_interval_s,
                batch_size=conf.batch_size,
                max_buffer=conf.max_buffer,
                tickets=conf.reconcile,
                on_drop=self.metrics.on_ledger_drop if self.metrics else None,
            )
            if conf.enabled
            else None
        )
        target = settings.logging.request_log
        self.request_log = (
            RequestLog(None if target == "stderr" else Path(target), include_content=settings.logging.include_content)
            if target
            else None
        )
        outputs: list[EntrySink | None] = [usage_log, self.ledger, self.metrics, self.request_log]
        if settings.logging.traces:
            outputs.append(tracing_sink())
        self.sink = AccountingSink(self.prices.get, [o for o in outputs if o is not None])
        self.reconciler = (
            Reconciler(
                store.usage,
                lambda generation_id: client.get_json("/generation", {"id": generation_id}),
                self.retention,
                interval_s=conf.reconcile_interval_s,
                first_delay_s=conf.reconcile_first_delay_s,
                max_age_s=conf.reconcile_max_age_s,
                on_outcome=self.metrics.on_reconcile if self.metrics else None,
            )
            if self.ledger is not None and conf.reconcile
            else None
        )
        self.exporter = (
            Exporter(store.usage, conf.export_dir, max_file_bytes=int(conf.export_max_file_mb * 1024 * 1024))
            if self.ledger is not None and conf.export_dir is not None
            else None
        )
        self.export_interval_s = conf.export_interval_s
        self.health = Health(store, lambda: client.get_json("/key"), breakers, limits=limits)
        self.usage_api = UsageAPI(
            store.usage, keyring, settings.admin.key_sha256, max_days=settings.ledger.rollup_ttl_days
        )
        if self.metrics is not None:
            self.metrics.watch(activity)
        if self.exporter is not None and store.name == "memory" and settings.server.workers > 1:
            log.warning("ledger.export_dir with the in-memory store and several workers: only one worker exports")
        self._stop = asyncio.Event()
        self._export_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the background parts; load model prices first (waiting at most
        ``PRICES_WAIT_S``, then in the background) so early estimates have prices."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.prices.refresh()), PRICES_WAIT_S)
        if self.request_log is not None:
            self.request_log.start()
        if self.ledger is not None:
            await self.ledger.start()
        if self.reconciler is not None:
            await self.reconciler.start()
        if self.exporter is not None:
            self._export_task = asyncio.get_running_loop().create_task(self._export(), name="ledger-export")

    async def _export(self) -> None:
        exporter = self.exporter
        assert exporter is not None
        while not self._stop.is_set():
            try:
                exporter.open()
                break
            except ExportLocked:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), _LOCK_RETRY_S)
        else:
            return
        await exporter.run(self.export_interval_s, self._stop)

    async def close(self) -> None:
        self._stop.set()
        if self.ledger is not None:
            await self.ledger.close()
        if self.reconciler is not None:
            await self.reconciler.close()
        if self._export_task is not None:
            await asyncio.gather(self._export_task, return_exceptions=True)
            exporter = self.exporter
            assert exporter is not None
            if exporter.is_open:
                try:
                    await exporter.drain()
                except Exception as exc:
                    log.warning("last export pass failed: %s", exc)
                exporter.close()
        await self.prices.aclose()
        if self.request_log is not None:
            self.request_log.close()
        if self.metrics is not None:
            self.metrics.close()


def observability_routes(obs: Callable[[], Observability]) -> list[Route]:
    """``/metrics``, health and usage routes; ``obs()`` returns the running worker's instance."""

    async def metrics(request: Request) -> Response:
        running = obs()
        token = running.metrics_token_sha256
        if token is not None and not bearer_matches(authorization_of(request.headers), token):
            raise AuthenticationFailed("A valid metrics token is required (Authorization: Bearer <token>).")
        current = running.metrics
        if current is None:
            return Response("metrics are disabled (metrics.enabled: false)\n", status_code=404)
        body, content_type = current.render()
        return Response(body, media_type=content_type)

    return [
        Route("/metrics", metrics, methods=["GET"]),
        *health_routes(lambda: obs().health),
        *usage_routes(lambda: obs().usage_api),
    ]
