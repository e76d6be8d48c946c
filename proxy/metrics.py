"""Prometheus metrics, served at ``GET /metrics``.

One ``Metrics`` per worker, with its own registry (no module-level state). It is an
``EntrySink`` (``proxy.accounting``): each accounted request updates the request, latency,
token, cost, rejection and upstream-error series; label children are cached, so a request
costs a few dict lookups and increments. ``activity`` is an ``Activity`` listener
(in-flight gauges). The pipeline reports what only it sees through ``retry``,
``fallback`` and ``breaker_state``.

Series (all prefixed ``openrouter_proxy_``):

===========================================  =======================================  ============
name                                         labels                                   type
===========================================  =======================================  ============
``requests_total``                           status, model, key, rule                 counter
``request_duration_seconds``                 model, stream                            histogram
``time_to_first_token_seconds``              model                                    histogram
``tokens_total``                             model, key, kind (prompt, completion,    counter
                                             cached, reasoning)
``cost_usd_total``                           model, key, source (upstream, pricing)   counter
``rejections_total``                         key, reason (the 429's error code)       counter
``upstream_errors_total``                    model, code                              counter
``retries_total``                            model, reason                            counter
``fallbacks_total``                          from_model, to_model                     counter
``breaker_state``                            target (0 closed, 1 half-open, 2 open)   gauge
``in_flight_requests`` / ``in_flight_streams``                                        gauge
``ledger_dropped_entries_total``                                                      counter
``reconciliations_total``                    outcome (settled, retry, expired)        counter
``limits_degraded_total``                                                             counter
``limits_settle_failures_total``                                                      counter
``limits_local_admissions_total``                                                     counter
===========================================  =======================================  ============

``limits_degraded_total``: admissions decided without the shared store (``fail_open``'s
local limits, or ``fail_closed``'s 503s); ``limits_settle_failures_total``: settlements the
store did not take (with leased admission, each failed try of a batch);
``limits_local_admissions_total``: admissions decided from the worker's allotments without
a store round trip (``limits.admission: leased``) (``watch_limits``).

``model`` is the model sent upstream (``routed_model``, else the requested one). Costs are
as known when the request ended; reconciled costs are in the ledger, not here. Label
values that come from outside (models, error codes) are capped at ``max_label_values``
distinct values each; later ones are counted as ``other``.

**Several uvicorn workers.** prometheus-client's multiprocess mode: ``serve`` sets
``PROMETHEUS_MULTIPROC_DIR`` (a fresh directory) before the workers start when
``workers > 1``; each worker then writes its values to files there and ``/metrics``
in any worker aggregates all of them. Gauges: in-flight as ``livesum``, breaker state as
``livemax``. A worker marks itself dead at shutdown.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess as prom_multiprocess

from proxy.accounting import LedgerEntry
from proxy.limits.leased import LeasedBackend
from proxy.sinks import Activity

if TYPE_CHECKING:
    from proxy.limits.failover import Failover as LimitsFailover

__all__ = ["BREAKER_STATES", "Metrics", "mark_worker_dead", "multiprocess_dir", "prepare_multiprocess_dir"]

PREFIX = "openrouter_proxy_"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
BREAKER_STATES = {"closed": 0, "half_open": 1, "half-open": 1, "open": 2}
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
_TOKEN_KINDS = ("prompt", "completion", "cached", "reasoning")


def mark_worker_dead(pid: int) -> None:
    """Drop worker ``pid``'s ``live*`` gauges (in flight, breaker states) in multiprocess mode."""
    if multiprocess_dir() is not None:
        prom_multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def prepare_multiprocess_dir(environ: MutableMapping[str, str]) -> str:
    """Set ``PROMETHEUS_MULTIPROC_DIR`` in ``environ`` for several workers (before they start).

    An operator's directory is kept but emptied of the previous run's ``*.db`` files; else a
    fresh temporary directory is made. Returns the directory.
    """
    path = environ.get(MULTIPROC_ENV)
    if path:
        for stale in Path(path).glob("*.db"):
            stale.unlink()
    else:
        path = environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="openrouter-proxy-metrics-")
    return path


def multiprocess_dir() -> str | None:
    """The multiprocess directory when prometheus-client runs in multiprocess mode."""
    return os.environ.get(MULTIPROC_ENV) or None


_MAX_LABEL_CHARS = 128


class _Bounded:
    """Label values from outside the config: at most ``cap`` distinct, then ``other``, each at
    most ``_MAX_LABEL_CHARS`` characters (a longer one is cut and marked with ``...``)."""

    __slots__ = ("cap", "seen")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self.seen:
            return value
        if len(value) > _MAX_LABEL_CHARS:
            value = value[: _MAX_LABEL_CHARS - 3] + "..."
            if value in self.seen:
                return value
        if len(self.seen) >= self.cap:
            return "other"
        self.seen.add(value)
        return value


class Metrics:
    """The worker's metrics. ``key_labels=False`` replaces key names by ``-`` (cardinality)."""

    def __init__(self, *, key_labels: bool = True, max_label_values: int = 500) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.key_labels = key_labels
        self._model = _Bounded(max_label_values)
        self._code = _Bounded(max_label_values)
        self._target = _Bounded(max_label_values)
        self._children: dict[tuple[Any, ...], Any] = {}
        r = self.registry
        self.requests = Counter(
            PREFIX + "requests",
            "Chat completion requests by final status.",
            ["status", "model", "key", "rule"],
            registry=r,
        )
        self.latency = Histogram(
            PREFIX + "request_duration_seconds",
            "Time from request arrival to the last byte sent.",
            ["model", "stream"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Time from request arrival to the first streamed data event.",
            ["model"],
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(PREFIX + "tokens", "Tokens by kind.", ["model", "key", "kind"], registry=r)
        self.cost = Counter(
            PREFIX + "cost_usd", "Cost in USD as known at request end.", ["model", "key", "source"], registry=r
        )
        self.rejections = Counter(
            PREFIX + "rejections",
            "Requests refused by the proxy's rate limits or budgets (429).",
            ["key", "reason"],
            registry=r,
        )
        self.upstream_errors = Counter(
            PREFIX + "upstream_errors", "Errors from OpenRouter or on the way to it.", ["model", "code"], registry=r
        )
        self.retries = Counter(PREFIX + "retries", "Upstream attempts retried.", ["model", "reason"], registry=r)
        self.fallbacks = Counter(
            PREFIX + "fallbacks", "Fallbacks to the next model.", ["from_model", "to_model"], registry=r
        )
        self.breaker = Gauge(
            PREFIX + "breaker_state",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
            ["target"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.in_flight = Gauge(
            PREFIX + "in_flight_requests", "Requests in flight.", registry=r, multiprocess_mode="livesum"
        )
        self.streams = Gauge(
            PREFIX + "in_flight_streams", "Streams being relayed.", registry=r, multiprocess_mode="livesum"
        )
        self.ledger_dropped = Counter(
            PREFIX + "ledger_dropped_entries", "Ledger entries dropped because the buffer overflowed.", registry=r
        )
        self.reconciliations = Counter(
            PREFIX + "reconciliations", "Reconciliation attempts by outcome.", ["outcome"], registry=r
        )
        self.limits_degraded = Counter(
            PREFIX + "limits_degraded",
            "Admissions decided without the shared limits store (fail_open local limits or fail_closed 503s).",
            registry=r,
        )
        self.limits_settle_failures = Counter(
            PREFIX + "limits_settle_failures", "Settlements the shared limits store did not take.", registry=r
        )
        self.limits_local_admissions = Counter(
            PREFIX + "limits_local_admissions",
            "Admissions decided from this worker's allotments, without a limits store round trip.",
            registry=r,
        )

    def _child(self, metric: Any, labels: tuple[str, ...]) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def emit_entry(self, entry: LedgerEntry) -> None:
        """Count one accounted request (an ``EntrySink``)."""
        rec = entry.record
        model = self._model(rec.routed_model or rec.requested_model or "-")
        key = (rec.key_name or "-") if self.key_labels else "-"
        self._child(self.requests, (str(rec.status), model, key, rec.rule or "-")).inc()
        self._child(self.latency, (model, "true" if rec.stream else "false")).observe(rec.latency_s)
        if rec.ttft_s is not None:
            self._child(self.ttft, (model,)).observe(rec.ttft_s)
        usage = rec.usage
        if usage is not None:
            counts = (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens, usage.reasoning_tokens)
            for kind, count in zip(_TOKEN_KINDS, counts, strict=True):
                if count:
                    self._child(self.tokens, (model, key, kind)).inc(count)
        if entry.cost_usd:
            self._child(self.cost, (model, key, entry.cost_source)).inc(float(entry.cost_usd))
        code = rec.error_code
        if code:
            if code.isdigit() or code.startswith("upstream_"):
                self._child(self.upstream_errors, (model, self._code(code))).inc()
            elif rec.status == 429:
                self._child(self.rejections, (key, self._code(code))).inc()

    def activity(self, requests: int, streams: int) -> None:
        """``Activity`` listener: requests and streams in flight in this worker."""
        self.in_flight.set(requests)
        self.streams.set(streams)

    def watch(self, activity: Activity) -> None:
        """Report ``activity``'s requests and streams in flight: read when scraped in one
        process (nothing per request), written on every change in multiprocess mode (each
        worker's value must be in its file for the ``livesum``)."""
        if multiprocess_dir() is None:
            self.in_flight.set_function(lambda: activity.requests)
            self.streams.set_function(lambda: activity.streams)
        else:
            activity.listeners.append(self.activity)

    def watch_limits(self, failover: LimitsFailover) -> None:
        """Count ``failover``'s degraded admissions and failed settlements as they happen."""
        failover.on_degraded = self.limits_degraded.inc
        failover.on_settle_failure = self.limits_settle_failures.inc
        backend = failover.backend
        if isinstance(backend, LeasedBackend):
            backend.on_local_admission = self.limits_local_admissions.inc
            backend.on_settle_failure = self.limits_settle_failures.inc

    def retry(self, model: str, reason: str) -> None:
        """The pipeline retries an attempt on ``model`` because of ``reason`` (an error code)."""
        self._child(self.retries, (self._model(model), self._code(reason))).inc()

    def fallback(self, from_model: str, to_model: str) -> None:
        """The pipeline moves from ``from_model`` to the next model of the plan."""
        self._child(self.fallbacks, (self._model(from_model), self._model(to_model))).inc()

    def breaker_state(self, target: str, state: str) -> None:
        """A breaker changed state: ``closed``, ``half_open`` or ``open``."""
        self._child(self.breaker, (self._target(target),)).set(BREAKER_STATES.get(state, 2))

    def on_ledger_drop(self, count: int) -> None:
        self.ledger_dropped.inc(count)

    def on_reconcile(self, outcome: str) -> None:
        self._child(self.reconciliations, (outcome,)).inc()

    def render(self) -> tuple[bytes, str]:
        """``(body, content type)`` of the exposition; every worker's values in multiprocess mode."""
        if multiprocess_dir() is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        registry = CollectorRegistry()
        prom_multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST

    def close(self) -> None:
        """Mark this worker dead for the ``live*`` gauges (multiprocess mode only)."""
        mark_worker_dead(os.getpid())
