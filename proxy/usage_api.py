"""Usage over HTTP, from the store's per-day rollups (read-only).

``GET /admin/usage?since=7d&by=key,model`` (admin key): every key's usage, the JSON of
``openrouter-proxy usage --format json`` (``proxy.report.report_dict``) plus ``since``.
``GET /v1/usage?since=30d&by=day`` (a virtual key): that key's own usage, same shape plus
``key`` and ``team``. ``by`` takes ``key, team, model, rule, day``; ``since`` a duration
(``30m``, ``12h``, ``7d``, ``2w``) or a date (``YYYY-MM-DD``), rounded down to its UTC day.

Errors: 400 ``invalid_request`` (bad ``since``/``by``), 401/403 (keys), 503
``usage_unavailable`` (store down).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.auth import Keyring, authorization_of, check_admin
from proxy.errors import InvalidRequest, UsageUnavailable
from proxy.report import AGGREGATE_GROUPS, build, parse_since, report_dict
from proxy.report_sources import facts_from_store
from proxy.store import StoreUnavailable, UsageLedger

__all__ = ["UsageAPI", "usage_routes"]


def _query(request: Request, default_since: str, default_by: str) -> tuple[float, tuple[str, ...]]:
    try:
        since = parse_since(request.query_params.get("since") or default_since)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="since") from None
    by = tuple(b.strip() for b in (request.query_params.get("by") or default_by).split(",") if b.strip())
    if not by or any(b not in AGGREGATE_GROUPS for b in by) or len(set(by)) < len(by):
        raise InvalidRequest(f"'by' takes a comma list of: {', '.join(AGGREGATE_GROUPS)} (each once)", param="by")
    return since, by


class UsageAPI:
    """The two endpoints over ``usage`` (the store's ledger)."""

    def __init__(self, usage: UsageLedger, keyring: Keyring, admin_sha256: str | None, *, max_days: int) -> None:
        self.usage = usage
        self.keyring = keyring
        self.admin_sha256 = admin_sha256
        self.max_days = max_days  # rollups live this many days (``ledger.rollup_ttl_days``)

    async def _report(self, since: float, by: tuple[str, ...], key: str | None = None) -> dict[str, Any]:
        try:
            facts = await facts_from_store(self.usage, since, key=key, max_days=self.max_days)
        except StoreUnavailable as exc:
            raise UsageUnavailable(f"Usage data is unavailable right now ({exc}).") from None
        body = {"since": datetime.fromtimestamp(since, UTC).date().isoformat()}
        body.update(report_dict(build(facts, by)))
        return body

    async def admin_usage(self, request: Request) -> Response:
        """``GET /admin/usage``: all keys (admin key required)."""
        check_admin(authorization_of(request.headers), self.admin_sha256)
        since, by = _query(request, "7d", "key,model")
        return JSONResponse(await self._report(since, by))

    async def own_usage(self, request: Request) -> Response:
        """``GET /v1/usage``: the calling virtual key's own usage."""
        principal = self.keyring.authenticate(authorization_of(request.headers))
        since, by = _query(request, "30d", "day")
        body: dict[str, Any] = {"key": principal.name, "team": principal.team}
        body.update(await self._report(since, by, key=principal.name))
        return JSONResponse(body)


def usage_routes(api: Callable[[], UsageAPI]) -> list[Route]:
    """Starlette routes; ``api()`` returns the running worker's ``UsageAPI``."""

    async def admin_usage(request: Request) -> Response:
        return await api().admin_usage(request)

    async def own_usage(request: Request) -> Response:
        return await api().own_usage(request)

    return [
        Route("/admin/usage", admin_usage, methods=["GET"]),
        Route("/v1/usage", own_usage, methods=["GET"]),
        Route("/api/v1/usage", own_usage, methods=["GET"]),
    ]
