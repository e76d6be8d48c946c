"""Proxy settings: ``config.yaml`` validated into value objects, once, at startup.

Secrets and endpoints come from the environment and override the file:

==========================  ===========================================================
``OPENROUTER_API_KEY``      the upstream key (never in the file, never logged)
``OPENROUTER_BASE_URL``     upstream base URL, default ``https://openrouter.ai/api/v1``
``REDIS_URL``               the shared store (``redis[s]://``, or ``redis[s]+cluster://`` naming any
                            node of a Redis Cluster); absent means the embedded in-memory store
``PROXY_CONFIG``            path of the config file (the CLI's ``--config`` wins)
``PROXY_ADMIN_KEY``         the admin API key (hashed at load; never stored)
``PROXY_METRICS_TOKEN``     the bearer token ``/metrics`` requires (hashed at load; unset: open)
==========================  ===========================================================

Relative paths in the file are resolved against the file's folder. Unknown keys are
errors, reported with file and line (``proxy.yamlsrc``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from proxy.yamlsrc import ConfigError, Problem, Source, load_yaml, problems_from_validation

__all__ = [
    "DEFAULT_BASE_URL",
    "AdminSettings",
    "BreakerSettings",
    "KeyEntry",
    "LedgerSettings",
    "LimitsSettings",
    "LoggingSettings",
    "MetricsSettings",
    "PacingSettings",
    "RetrySettings",
    "ServerSettings",
    "Settings",
    "StoreSettings",
    "UpstreamSettings",
    "UsageSettings",
    "load_settings",
]

DEFAULT_BASE_URL = "https://openrouter.ai/api/v1"
DEFAULT_FORWARD_HEADERS = (
    "x-session-id",
    "x-anthropic-beta",
    "x-openrouter-metadata",
    "x-openrouter-cache",
    "x-openrouter-cache-ttl",
    "x-openrouter-cache-clear",
)
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")  # a SHA-256 digest, as stored
LEASE_MARGIN_S = 60.0


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Model):
    """The listening side.

    ``max_body_bytes`` bounds a request body (larger: 413) and ``body_timeout_s`` the time to
    receive it (slower: 408). ``drain_timeout_s``: on SIGTERM, how long in-flight requests
    may finish. ``keep_alive_timeout_s``: how long an idle client connection stays open; it
    must exceed the idle timeout of the load balancer in front (nginx's upstream
    ``keepalive_timeout`` and AWS ALB's are 60 s), or the balancer may send a request on a
    connection the proxy is closing, and a POST that meets the close is a 502 no balancer
    retries. ``header_timeout_s``: a connection that sends no complete request head for this
    long, while no response is in progress on it, is closed (``proxy.http_protocol``:
    slow-header defence); one whose request head passes ``max_header_bytes`` gets 431 and is
    closed. ``max_n`` / ``max_output_tokens`` cap ``n`` and ``max_tokens`` (larger: 400);
    ``max_models`` caps the length of a client's ``models`` fallback list (longer: 400).
    ``cors_allow_origins``: the browser origins (``https://app.example.com``, or ``*``) whose
    pages may call the proxy (CORS preflights answered, headers exposed); empty: none.
    """

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    workers: Annotated[int, Field(ge=1, le=64)] = 1
    max_body_bytes: Annotated[int, Field(ge=1024)] = 4 * 1024 * 1024
    body_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    drain_timeout_s: Annotated[float, Field(ge=0)] = 30.0
    keep_alive_timeout_s: Annotated[float, Field(gt=0)] = 75.0
    header_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    max_header_bytes: Annotated[int, Field(ge=1024)] = 64 * 1024
    max_n: Annotated[int, Field(ge=1)] = 8
    max_output_tokens: Annotated[int, Field(ge=1)] = 1_000_000
    max_models: Annotated[int, Field(ge=1)] = 8
    cors_allow_origins: tuple[str, ...] = ()
    log_level: Literal["debug", "info", "warning", "error"] = "info"


class UpstreamSettings(_Model):
    """OpenRouter (or the emulator). Times are seconds.

    ``read_timeout_s`` is the longest silence allowed between upstream bytes (a stream that
    goes quiet longer is cut); ``first_byte_timeout_s`` bounds the wait for the response head
    (a silent provider: the next model is tried); ``first_token_timeout_s`` the wait for a
    stream's first data event (then the next model); ``total_timeout_s`` the whole request;
    ``app_url``/``app_title`` are sent as OpenRouter's attribution headers ``HTTP-Referer``
    and ``X-Title`` (openrouter-api.md §5). ``forward_headers`` lists the client request
    headers passed on to OpenRouter (all others stay at the proxy); a name ending in ``*``
    is a prefix (``x-openrouter-*``).
    """

    base_url: str = DEFAULT_BASE_URL
    api_key: SecretStr | None = Field(default=None, exclude=True)
    app_url: str | None = None
    app_title: str | None = "openrouter-proxy"
    connect_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    read_timeout_s: Annotated[float, Field(gt=0)] = 300.0
    first_byte_timeout_s: Annotated[float, Field(gt=0)] = 60.0
    first_token_timeout_s: Annotated[float, Field(gt=0)] = 120.0
    total_timeout_s: Annotated[float, Field(gt=0)] = 900.0
    max_connections: Annotated[int, Field(ge=1)] = 1024
    models_ttl_s: Annotated[float, Field(ge=0)] = 300.0
    forward_headers: tuple[str, ...] = DEFAULT_FORWARD_HEADERS

    @field_validator("base_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("forward_headers")
    @classmethod
    def _lower(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        blocked = ("authorization", "host", "content-length", "cookie")
        globs = [h for h in value if "*" in h and (h.count("*") > 1 or not h.endswith("*") or len(h) < 4)]
        if globs:
            raise ValueError(f"only a trailing '*' after at least 3 characters is a pattern: {', '.join(globs)}")
        bad = [
            h
            for h in value
            if any(b == h.lower() or (h.endswith("*") and b.startswith(h.lower()[:-1])) for b in blocked)
        ]
        if bad:
            raise ValueError(f"these headers can never be forwarded: {', '.join(bad)}")
        return tuple(h.lower() for h in value)


class KeyEntry(_Model):
    """A virtual key: only the SHA-256 (hex) of the secret is stored."""

    name: Annotated[str, Field(min_length=1, max_length=128)]
    sha256: str
    team: str | None = None
    tier: str | None = None

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        value = value.lower()
        if not SHA256_HEX.match(value):
            raise ValueError("must be 64 hex characters (openrouter-proxy keys new prints one)")
        return value


class RetrySettings(_Model):
    """Retries before the stream's commit point (see README, "Resilience"). Seconds.

    ``max_attempts`` per model (1 = no retry); back-off is exponential with full jitter:
    a random wait in ``[0, min(backoff_cap_s, backoff_base_s * 2**retry)]``, or the
    upstream's ``Retry-After`` when given and at most ``max_retry_after_s`` (longer: the
    next model is tried instead).
    """

    max_attempts: Annotated[int, Field(ge=1, le=10)] = 3
    backoff_base_s: Annotated[float, Field(ge=0)] = 1.0
    backoff_cap_s: Annotated[float, Field(ge=0)] = 4.0
    max_retry_after_s: Annotated[float, Field(ge=0)] = 10.0


class BreakerSettings(_Model):
    """Circuit breaker per upstream model and per base URL.

    Opens when, within the last ``window_s`` seconds, at least ``min_requests`` attempts were
    made and at least ``failure_rate`` of them failed (5xx, timeouts, connection errors);
    stays open ``open_s`` seconds, then lets one probe through (half-open): success closes
    it, failure opens it again. Open states are shared across replicas through the store.
    """

    enabled: bool = True
    window_s: Annotated[float, Field(gt=0)] = 30.0
    min_requests: Annotated[int, Field(ge=1)] = 10
    failure_rate: Annotated[float, Field(gt=0, le=1)] = 0.5
    open_s: Annotated[float, Field(gt=0)] = 15.0
    sync_interval_s: Annotated[float, Field(gt=0)] = 1.0


class StoreSettings(_Model):
    """``redis_url`` (env ``REDIS_URL``): ``redis://``, ``rediss://`` (TLS), ``unix://``, or
    ``redis+cluster://``/``rediss+cluster://`` for a Redis Cluster; none: the embedded store."""

    redis_url: str | None = None

    @field_validator("redis_url")
    @classmethod
    def _scheme(cls, value: str | None) -> str | None:
        schemes = ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")
        if value and not value.startswith(schemes):
            raise ValueError(f"must start with one of {', '.join(schemes)}")
        return value or None


class AdminSettings(_Model):
    """The admin API key (``/admin/...``): only its SHA-256; env ``PROXY_ADMIN_KEY`` sets it."""

    key_sha256: str | None = None

    @field_validator("key_sha256")
    @classmethod
    def _hex(cls, value: str | None) -> str | None:
        return _sha256_hex(value)


def _sha256_hex(value: str | None) -> str | None:
    """A SHA-256 digest as 64 lowercase hex characters (``ValueError`` otherwise)."""
    if value is not None and not SHA256_HEX.match(value.lower()):
        raise ValueError("must be 64 hex characters")
    return value.lower() if value else None


class PacingSettings(_Model):
    """Upstream pacing (``proxy.pacing``): a leaky bucket per worker in front of OpenRouter.

    ``requests_per_s`` (``null`` = off) with bursts of up to ``burst`` requests; at most
    ``max_waiters`` requests queue, each at most ``max_wait_s`` seconds (else 503 upstream_busy).
    """

    requests_per_s: Annotated[float, Field(gt=0)] | None = None
    burst: Annotated[int, Field(ge=1)] = 1
    max_waiters: Annotated[int, Field(ge=0)] = 256
    max_wait_s: Annotated[float, Field(gt=0)] = 10.0


class LimitsSettings(_Model):
    """Rate limits and budgets (``proxy.limits``; tiers in ``policies_dir/policy_file``).

    ``failure_policy`` when the shared store is slow or down (``store_timeout_ms``): admit
    on local limits of limit / ``replicas`` (proxy processes sharing the store: replicas x
    workers) (``fail_open``) or answer 503 (``fail_closed``);
    the store is retried after ``store_retry_s``. Reservations of a request that never
    settles expire after ``lease_s``, which must exceed ``upstream.total_timeout_s`` by a
    minute (a request that runs to its timeout must still find its budget hold to spend).
    Budget reservations: prompt estimate x ``prompt_margin`` + max output
    (``default_max_completion_tokens`` when neither request nor catalog gives one); a model
    without a known price reserves ``unknown_price_usd``.
    ``admission``: ``exact`` checks every request in the store (one round trip each);
    ``leased`` (Redis only) admits most requests from allotments each worker holds in the
    store, without a round trip, at the cost of approximate remaining counts and of
    refusals near a limit while other workers hold allotments (``proxy.limits.leased``).
    Spend crossing a fraction in ``alert_thresholds`` logs once per period and POSTs to
    ``alert_webhook_url`` (if set). See README, "Rate limits and budgets".
    """

    policy_file: str = "limits.yaml"
    admission: Literal["exact", "leased"] = "exact"
    failure_policy: Literal["fail_open", "fail_closed"] = "fail_open"
    replicas: Annotated[int, Field(ge=1)] = 1
    store_timeout_ms: Annotated[int, Field(ge=1, le=10_000)] = 50
    store_retry_s: Annotated[float, Field(gt=0)] = 1.0
    lease_s: Annotated[float, Field(gt=0)] = 960.0
    prompt_margin: Annotated[float, Field(ge=1)] = 1.2
    default_max_completion_tokens: Annotated[int, Field(ge=1)] = 4096
    unknown_price_usd: Annotated[float, Field(ge=0)] = 0.05
    alert_thresholds: tuple[Annotated[float, Field(gt=0, le=1)], ...] = (0.5, 0.8, 1.0)
    alert_webhook_url: str | None = None
    alert_timeout_s: Annotated[float, Field(gt=0)] = 2.0
    pacing: PacingSettings = PacingSettings()


class UsageSettings(_Model):
    """The usage log: one JSON line per request, flushed every ``flush_interval_s``."""

    log_path: Path | None = Path("usage.jsonl")
    flush_interval_s: Annotated[float, Field(gt=0, le=60)] = 0.5


class LedgerSettings(_Model):
    """The usage ledger in the store (README, "Observability"). Times in seconds.

    Records go to the store in batches of up to ``batch_size`` every ``flush_interval_s``
    (at most ``max_buffer`` wait while the store is down; older ones are dropped). The stream
    keeps at most ``stream_max_entries`` entries and none older than ``stream_max_age_s``
    (``null``: no such cap); the embedded in-memory store, which holds its stream in the
    process's RAM, keeps at most ``memory_stream_max_entries`` (rollups are not affected);
    per-day rollups live ``rollup_ttl_days``. ``export_dir`` runs
    the exporter in-process (the worker holding the directory's lock) every
    ``export_interval_s``, rotating files at ``export_max_file_mb``. ``reconcile`` fetches
    ``/generation`` costs for estimated records every ``reconcile_interval_s``, first
    ``reconcile_first_delay_s`` after the request, giving up after ``reconcile_max_age_s``.
    """

    enabled: bool = True
    flush_interval_s: Annotated[float, Field(gt=0, le=60)] = 0.2
    batch_size: Annotated[int, Field(ge=1, le=10_000)] = 500
    max_buffer: Annotated[int, Field(ge=1)] = 100_000
    stream_max_entries: Annotated[int, Field(ge=100)] | None = 1_000_000
    memory_stream_max_entries: Annotated[int, Field(ge=100)] = 10_000
    stream_max_age_s: Annotated[float, Field(gt=0)] | None = 7 * 86400.0
    rollup_ttl_days: Annotated[int, Field(ge=1)] = 400
    export_dir: Path | None = None
    export_interval_s: Annotated[float, Field(gt=0)] = 5.0
    export_max_file_mb: Annotated[float, Field(gt=0)] = 64.0
    reconcile: bool = True
    reconcile_interval_s: Annotated[float, Field(gt=0)] = 5.0
    reconcile_first_delay_s: Annotated[float, Field(ge=0)] = 2.0
    reconcile_max_age_s: Annotated[float, Field(gt=0)] = 3600.0


class MetricsSettings(_Model):
    """Prometheus metrics at ``/metrics``. ``key_labels: false`` drops virtual-key names from
    labels (fewer series); outside label values (models, codes) are capped at ``max_label_values``.
    ``token_sha256`` (env ``PROXY_METRICS_TOKEN`` sets it from the token itself): scrapes must
    send ``Authorization: Bearer <token>`` (401 otherwise); unset, ``/metrics`` is open."""

    enabled: bool = True
    key_labels: bool = True
    max_label_values: Annotated[int, Field(ge=1)] = 500
    token_sha256: str | None = None

    @field_validator("token_sha256")
    @classmethod
    def _hex(cls, value: str | None) -> str | None:
        return _sha256_hex(value)


class LoggingSettings(_Model):
    """The request log: one JSON line per request to ``request_log`` (``stderr``, a file path, or
    ``null`` for none). ``include_content`` adds the request's messages and the answer's text
    to it (off: never logged). ``traces``: OpenTelemetry spans when the library is installed."""

    request_log: str | None = "stderr"
    include_content: bool = False
    traces: bool = True


class Settings(_Model):
    server: ServerSettings = ServerSettings()
    upstream: UpstreamSettings = UpstreamSettings()
    store: StoreSettings = StoreSettings()
    usage: UsageSettings = UsageSettings()
    admin: AdminSettings = AdminSettings()
    retries: RetrySettings = RetrySettings()
    breaker: BreakerSettings = BreakerSettings()
    limits: LimitsSettings = LimitsSettings()
    ledger: LedgerSettings = LedgerSettings()
    metrics: MetricsSettings = MetricsSettings()
    logging: LoggingSettings = LoggingSettings()
    policies_dir: Path = Path("policies")
    keys: tuple[KeyEntry, ...] = ()

    @model_validator(mode="after")
    def _lease_outlives_requests(self) -> Settings:
        least = self.upstream.total_timeout_s + LEASE_MARGIN_S
        if self.limits.lease_s < least:
            raise ValueError(
                f"limits.lease_s must be at least upstream.total_timeout_s + {LEASE_MARGIN_S:g} ({least:g}), "
                f"not {self.limits.lease_s:g}: a request still running when its lease ends loses its budget hold"
            )
        return self


def load_settings(path: Path, environ: Mapping[str, str]) -> Settings:
    """Read ``path``, apply environment overrides, resolve relative paths.

    Raises ``ConfigError`` listing every problem (file and line) when the file is invalid.
    A missing file is an error too: the repository ships a working ``config.yaml``.
    """
    data, source = load_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError([Problem(str(path), 1, "the file must hold a mapping")])
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(problems_from_validation(exc, source)) from None
    problems = _duplicate_keys(settings, source)
    if problems:
        raise ConfigError(problems)
    return _with_environment(settings, path.parent, environ)


def _duplicate_keys(settings: Settings, source: Source) -> list[Problem]:
    problems: list[Problem] = []
    names: set[str] = set()
    hashes: set[str] = set()
    for i, key in enumerate(settings.keys):
        line = source.line_of(("keys", i))
        if key.name in names:
            problems.append(Problem(source.file, line, f"keys.{i}: duplicate key name {key.name!r}"))
        if key.sha256 in hashes:
            problems.append(Problem(source.file, line, f"keys.{i}: the same key hash is listed twice"))
        names.add(key.name)
        hashes.add(key.sha256)
    return problems


def _from_environment(environ: Mapping[str, str], name: str, model: type[_Model], field: str) -> Any:
    """Environment variable ``name`` checked as ``model.field`` is (``ConfigError`` if it fails)."""
    try:
        return getattr(model.model_validate({field: environ[name]}), field)
    except ValidationError as exc:
        message = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
        raise ConfigError([Problem("environment", None, f"{name}: {message}")]) from None


def _with_environment(settings: Settings, base: Path, environ: Mapping[str, str]) -> Settings:
    upstream = settings.upstream
    updates: dict[str, object] = {}
    if environ.get("OPENROUTER_BASE_URL"):
        updates["base_url"] = _from_environment(environ, "OPENROUTER_BASE_URL", UpstreamSettings, "base_url")
    if environ.get("OPENROUTER_API_KEY"):
        updates["api_key"] = SecretStr(environ["OPENROUTER_API_KEY"])
    if updates:
        upstream = upstream.model_copy(update=updates)
    store = settings.store
    if environ.get("REDIS_URL"):
        store = store.model_copy(
            update={"redis_url": _from_environment(environ, "REDIS_URL", StoreSettings, "redis_url")}
        )
    admin = settings.admin
    if environ.get("PROXY_ADMIN_KEY"):
        admin = AdminSettings(key_sha256=hashlib.sha256(environ["PROXY_ADMIN_KEY"].encode()).hexdigest())
    metrics = settings.metrics
    if environ.get("PROXY_METRICS_TOKEN"):
        digest = hashlib.sha256(environ["PROXY_METRICS_TOKEN"].encode()).hexdigest()
        metrics = metrics.model_copy(update={"token_sha256": digest})
    limits = settings.limits
    if environ.get("PROXY_LIMITS_REPLICAS"):  # e.g. compose's replica count
        replicas = _from_environment(environ, "PROXY_LIMITS_REPLICAS", LimitsSettings, "replicas")
        limits = limits.model_copy(update={"replicas": replicas})
    usage = settings.usage
    if usage.log_path is not None and not usage.log_path.is_absolute():
        usage = usage.model_copy(update={"log_path": base / usage.log_path})
    policies = settings.policies_dir if settings.policies_dir.is_absolute() else base / settings.policies_dir
    ledger, logs = settings.ledger, settings.logging
    if ledger.export_dir is not None and not ledger.export_dir.is_absolute():
        ledger = ledger.model_copy(update={"export_dir": base / ledger.export_dir})
    if logs.request_log not in (None, "stderr") and not Path(logs.request_log).is_absolute():
        logs = logs.model_copy(update={"request_log": str(base / logs.request_log)})
    return settings.model_copy(
        update={
            "upstream": upstream,
            "store": store,
            "limits": limits,
            "usage": usage,
            "admin": admin,
            "metrics": metrics,
            "policies_dir": policies,
            "ledger": ledger,
            "logging": logs,
        }
    )
