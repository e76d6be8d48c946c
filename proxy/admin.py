"""The admin API for virtual keys, and ``GET /v1/limits`` for a key's own limits.

Admin endpoints need the admin key (``Authorization: Bearer $PROXY_ADMIN_KEY``; 403 while
none is configured). Bodies and answers are JSON; money is USD, times Unix seconds:

=======================  ==============================================================
``GET /admin/keys``       every key: runtime keys and, read-only, the config file's
``POST /admin/keys``      create ``{"name", "team"?, "tier"?, "budget_usd_per_day"?,
                          "budget_usd_per_month"?, "budget_usd_total"?}`` -> 201 with the
                          new secret in ``key`` (shown once; only its hash is stored)
``GET /admin/keys/{n}``   one key, with its limits and spend (``proxy.limits.status``)
``PATCH /admin/keys/{n}`` change ``team``, ``tier`` or a budget (``null`` clears a budget)
``DELETE /admin/keys/{n}`` revoke: every replica refuses the key within about a second
``GET /v1/limits``        the calling key's own limits and spend (its own key as bearer)
=======================  ==============================================================

Keys from ``config.yaml`` cannot be changed here (400): edit the file instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Annotated, Any, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.auth import Keyring, authorization_of, check_admin, hash_key, new_key
from proxy.errors import InvalidRequest, NotFound, StoreDown
from proxy.keystore import KeyChanged, KeyExists, KeyMissing, KeyRecord, KeyStore, KeySync, now
from proxy.limits import KeyBudgets, Limiter
from proxy.limits.policy import PositiveUSD
from proxy.limits.status import limits_status
from proxy.types import Principal

__all__ = ["AdminAPI", "admin_routes"]

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$"
_M = TypeVar("_M", bound=BaseModel)


class _KeyChange(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # no true -> 1.0, no "5" -> 5.0

    team: Annotated[str, Field(min_length=1, max_length=128, pattern=r"\S")] | None = None
    tier: Annotated[str, Field(min_length=1, max_length=128, pattern=r"\S")] | None = None
    budget_usd_per_day: PositiveUSD | None = None
    budget_usd_per_month: PositiveUSD | None = None
    budget_usd_total: PositiveUSD | None = None


class _KeyCreate(_KeyChange):
    name: Annotated[str, Field(pattern=_NAME)]


@dataclass(slots=True)
class AdminAPI:
    """The runtime objects the endpoints work on (built per worker in the app's lifespan)."""

    admin_sha256: str | None
    keyring: Keyring
    keystore: KeyStore
    keysync: KeySync
    limiter: Limiter

    def _config_keys(self) -> dict[str, Principal]:
        return {p.name: p for p in self.keyring.config_principals()}

    def _view(self, record: KeyRecord | Principal, source: str) -> dict[str, Any]:
        budgets = record.budgets if isinstance(record, KeyRecord) else KeyBudgets()
        view: dict[str, Any] = {
            "name": record.name,
            "key_id": record.key_id,
            "team": record.team,
            "tier": record.tier,
            "effective_tier": self.limiter.policy.key_tier(record.tier),
            "budget_usd_per_day": budgets.usd_per_day,
            "budget_usd_per_month": budgets.usd_per_month,
            "budget_usd_total": budgets.usd_total,
            "source": source,
        }
        if isinstance(record, KeyRecord):
            view["created_at"], view["updated_at"] = record.created_at, record.updated_at
        return view

    def _check_tier(self, tier: str | None) -> None:
        if tier is not None and not self.limiter.policy.has_tier(tier):
            known = ", ".join(self.limiter.policy.tiers) or "none"
            raise InvalidRequest(f"Unknown tier {tier!r} (tiers: {known}).", param="tier")

    async def list_keys(self) -> dict[str, Any]:
        await self.keysync.refresh()
        data = [self._view(p, "config") for p in self._config_keys().values()]
        data += [self._view(r, "runtime") for r in sorted(self.keysync.records.values(), key=lambda r: r.name)]
        return {"object": "list", "data": data}

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        spec = _parse(_KeyCreate, body)
        self._check_tier(spec.tier)
        if spec.name in self._config_keys():
            raise InvalidRequest(f"A key named {spec.name!r} is defined in the config file.", param="name")
        secret = new_key()
        t = now()
        record = KeyRecord(spec.name, hash_key(secret), spec.team, spec.tier, _budgets(spec), t, t)
        try:
            await self.keystore.change("create", record)
        except KeyExists:
            raise InvalidRequest(f"A key named {spec.name!r} already exists.", param="name") from None
        await self.keysync.refresh()
        return {"key": secret, **self._view(record, "runtime")}

    async def show(self, name: str) -> dict[str, Any]:
        principal = self._config_keys().get(name)
        view: dict[str, Any]
        if principal is not None:
            view = self._view(principal, "config")
        else:
            record = await self._record(name)
            view = self._view(record, "runtime")
            principal = Principal(record.key_id, record.name, record.team, record.tier)
        view["limits"] = await limits_status(self.limiter, principal)
        return view

    async def update(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        self._refuse_config(name)
        change = _parse(_KeyChange, body)
        self._check_tier(change.tier)
        record = await self._record(name)
        raw: bytes | None = None
        for _ in range(_UPDATE_TRIES):  # another update may land between the read and the write
            updated = _changed(record, change)
            try:
                await self.keystore.change("put", updated, expected=record, expected_raw=raw)
                break
            except KeyChanged as exc:
                record, raw = exc.current, exc.raw  # apply this change to what is stored now
            except KeyMissing:
                raise NotFound(f"No key named {name!r}.") from None
        else:
            raise StoreDown(f"Key {name!r} kept changing under this update; try again.")
        await self.keysync.refresh()
        return self._view(updated, "runtime")

    async def revoke(self, name: str) -> dict[str, Any]:
        self._refuse_config(name)
        try:
            await self.keystore.change("delete", KeyRecord(name, ""))
        except KeyMissing:
            raise NotFound(f"No key named {name!r}.") from None
        await self.keysync.refresh()
        return {"name": name, "revoked": True}

    def _refuse_config(self, name: str) -> None:
        if name in self._config_keys():
            raise InvalidRequest(f"Key {name!r} is defined in the config file; change it there.", param="name")

    async def _record(self, name: str) -> KeyRecord:
        await self.keysync.refresh()
        record = self.keysync.records.get(name)
        if record is None:
            raise NotFound(f"No key named {name!r}.")
        return record


_UPDATE_TRIES = 8


def _changed(record: KeyRecord, change: _KeyChange) -> KeyRecord:
    """``record`` with the fields ``change`` sets (and nothing else) changed."""
    fields = change.model_fields_set
    budgets = record.budgets
    for field, attr in _BUDGET_FIELDS.items():
        if field in fields:
            budgets = replace(budgets, **{attr: getattr(change, field)})
    return replace(
        record,
        team=change.team if "team" in fields else record.team,
        tier=change.tier if "tier" in fields else record.tier,
        budgets=budgets,
        updated_at=now(),
    )


_BUDGET_FIELDS = {
    "budget_usd_per_day": "usd_per_day",
    "budget_usd_per_month": "usd_per_month",
    "budget_usd_total": "usd_total",
}


def _budgets(spec: _KeyChange) -> KeyBudgets:
    return KeyBudgets(spec.budget_usd_per_day, spec.budget_usd_per_month, spec.budget_usd_total)


def _parse(model: type[_M], body: dict[str, Any]) -> _M:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        message = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        raise InvalidRequest(f"{param}: {message}" if param else message, param=param) from None


async def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        raise InvalidRequest("The body must be a JSON object.") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The body must be a JSON object.")
    return body


def admin_routes(resolve: Callable[[], AdminAPI]) -> list[Route]:
    """The routes; ``resolve`` returns the running worker's ``AdminAPI`` (raises if none)."""

    def admin(request: Request) -> AdminAPI:
        api = resolve()
        check_admin(authorization_of(request.headers), api.admin_sha256)
        return api

    async def keys(request: Request) -> Response:
        api = admin(request)
        if request.method == "POST":
            return JSONResponse(await api.create(await _json_body(request)), status_code=201)
        return JSONResponse(await api.list_keys())

    async def key(request: Request) -> Response:
        api = admin(request)
        name = request.path_params["name"]
        if request.method == "PATCH":
            return JSONResponse(await api.update(name, await _json_body(request)))
        if request.method == "DELETE":
            return JSONResponse(await api.revoke(name))
        return JSONResponse(await api.show(name))

    async def own_limits(request: Request) -> Response:
        api = resolve()
        principal = api.keyring.authenticate(authorization_of(request.headers))
        return JSONResponse(await limits_status(api.limiter, principal))

    return [
        Route("/admin/keys", keys, methods=["GET", "POST"]),
        Route("/admin/keys/{name}", key, methods=["GET", "PATCH", "DELETE"]),
        Route("/v1/limits", own_limits, methods=["GET"]),
        Route("/api/v1/limits", own_limits, methods=["GET"]),
    ]
