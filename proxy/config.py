"""Proxy settings: ``config.yaml`` validated into value objects, once, at startup.

Secrets and endpoints come from the environment and override the file:

==========================  ===========================================================
``OPENROUTER_API_KEY``      the upstream key (never in the file, never logged)
``OPENROUTER_BASE_URL``     upstream base URL, default ``https://openrouter.ai/api/v1``
``REDIS_URL``               the shared store; absent means the embedded in-memory store
``PROXY_CONFIG``            path of the config file (the CLI's ``--config`` wins)
``PROXY_ADMIN_KEY``         the admin API key (hashed at load; never stored)
==========================  ===========================================================

Relative paths in the file are resolved against the file's folder. Unknown keys are
errors, reported with file and line (``proxy.yamlsrc``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from proxy.yamlsrc import ConfigError, Problem, Source, load_yaml, problems_from_validation

__all__ = [
    "DEFAULT_BASE_URL",
    "AdminSettings",
    "KeyEntry",
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
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Model):
    """The listening side. ``max_body_bytes`` bounds a request body (larger: 413)."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    workers: Annotated[int, Field(ge=1, le=64)] = 1
    max_body_bytes: Annotated[int, Field(ge=1024)] = 4 * 1024 * 1024
    log_level: Literal["debug", "info", "warning", "error"] = "info"


class UpstreamSettings(_Model):
    """OpenRouter (or the emulator). Times are seconds.

    ``read_timeout_s`` is the longest silence allowed between upstream bytes;
    ``app_url``/``app_title`` are sent as OpenRouter's attribution headers ``HTTP-Referer``
    and ``X-Title`` (openrouter-api.md §5). ``forward_headers`` lists the client request
    headers passed on to OpenRouter (all others stay at the proxy).
    """

    base_url: str = DEFAULT_BASE_URL
    api_key: SecretStr | None = Field(default=None, exclude=True)
    app_url: str | None = None
    app_title: str | None = "openrouter-proxy"
    connect_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    read_timeout_s: Annotated[float, Field(gt=0)] = 300.0
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
        blocked = {"authorization", "host", "content-length", "cookie"}
        bad = [h for h in value if h.lower() in blocked]
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
        if not _HEX64.match(value):
            raise ValueError("must be 64 hex characters (openrouter-proxy keys new prints one)")
        return value


class StoreSettings(_Model):
    redis_url: str | None = None


class AdminSettings(_Model):
    """The admin API key (``/admin/...``): only its SHA-256; env ``PROXY_ADMIN_KEY`` sets it."""

    key_sha256: str | None = None

    @field_validator("key_sha256")
    @classmethod
    def _hex(cls, value: str | None) -> str | None:
        if value is not None and not _HEX64.match(value.lower()):
            raise ValueError("must be 64 hex characters")
        return value.lower() if value else None


class UsageSettings(_Model):
    """The usage log: one JSON line per request, flushed every ``flush_interval_s``."""

    log_path: Path | None = Path("usage.jsonl")
    flush_interval_s: Annotated[float, Field(gt=0, le=60)] = 0.5


class Settings(_Model):
    server: ServerSettings = ServerSettings()
    upstream: UpstreamSettings = UpstreamSettings()
    store: StoreSettings = StoreSettings()
    usage: UsageSettings = UsageSettings()
    admin: AdminSettings = AdminSettings()
    policies_dir: Path = Path("policies")
    keys: tuple[KeyEntry, ...] = ()


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


def _with_environment(settings: Settings, base: Path, environ: Mapping[str, str]) -> Settings:
    upstream = settings.upstream
    updates: dict[str, object] = {}
    if environ.get("OPENROUTER_BASE_URL"):
        updates["base_url"] = environ["OPENROUTER_BASE_URL"].rstrip("/")
    if environ.get("OPENROUTER_API_KEY"):
        updates["api_key"] = SecretStr(environ["OPENROUTER_API_KEY"])
    if updates:
        upstream = upstream.model_copy(update=updates)
    store = settings.store
    if environ.get("REDIS_URL"):
        store = store.model_copy(update={"redis_url": environ["REDIS_URL"]})
    admin = settings.admin
    if environ.get("PROXY_ADMIN_KEY"):
        admin = AdminSettings(key_sha256=hashlib.sha256(environ["PROXY_ADMIN_KEY"].encode()).hexdigest())
    usage = settings.usage
    if usage.log_path is not None and not usage.log_path.is_absolute():
        usage = usage.model_copy(update={"log_path": base / usage.log_path})
    policies = settings.policies_dir if settings.policies_dir.is_absolute() else base / settings.policies_dir
    return settings.model_copy(
        update={"upstream": upstream, "store": store, "usage": usage, "admin": admin, "policies_dir": policies}
    )
