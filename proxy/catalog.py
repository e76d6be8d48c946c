"""OpenRouter's model catalog (``GET /models``), cached per worker with a TTL.

One refresh at a time (concurrent callers await the same fetch); when a refresh fails
and an older copy exists, the older copy is served and the failure logged. The OpenAI
list shape for ``GET /v1/models`` is built here too: each OpenRouter model becomes
``{"id", "object": "model", "created", "owned_by"}`` plus OpenRouter's ``name``,
``context_length``, ``pricing`` (USD per token, decimal strings; §6.1); each configured
alias is listed with ``owned_by: "openrouter-proxy"`` and the model it maps to in
``alias_of``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from proxy.errors import ProxyError

__all__ = ["ModelCatalog", "openai_model_list"]

log = logging.getLogger("proxy.catalog")

Fetch = Callable[[], Awaitable[Any]]


class ModelCatalog:
    """Cached ``/models`` data. ``fetch`` returns OpenRouter's decoded response."""

    def __init__(self, fetch: Fetch, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._fetch = fetch
        self._ttl_s = ttl_s
        self._clock = clock
        self._models: list[dict[str, Any]] | None = None
        self._by_id: dict[str, dict[str, Any]] = {}
        self._fetched_at = 0.0
        self._refresh: asyncio.Task[None] | None = None

    async def models(self) -> list[dict[str, Any]]:
        """The model objects; raises ``ProxyError`` only when no copy exists at all."""
        if self._models is None or self._clock() - self._fetched_at >= self._ttl_s:
            if self._refresh is None:
                self._refresh = asyncio.ensure_future(self._load())
            refresh = self._refresh
            try:
                await asyncio.shield(refresh)
            except ProxyError:
                if self._models is None:
                    raise
                log.warning(
                    "model catalog refresh failed; serving the copy from %.0f s ago", self._clock() - self._fetched_at
                )
        return self._models or []

    async def get(self, model_id: str) -> dict[str, Any] | None:
        """One model object by id (variant suffixes such as ``:nitro`` map to the base)."""
        await self.models()
        found = self._by_id.get(model_id)
        if found is None and ":" in model_id:
            found = self._by_id.get(model_id.split(":", 1)[0])
        return found

    async def _load(self) -> None:
        try:
            data = await self._fetch()
            models = data.get("data") if isinstance(data, dict) else None
            if not isinstance(models, list):
                raise ProxyError("OpenRouter's /models response has no 'data' list.")
            self._models = [m for m in models if isinstance(m, dict) and isinstance(m.get("id"), str)]
            self._by_id = {m["id"]: m for m in self._models}
            self._fetched_at = self._clock()
        finally:
            self._refresh = None


def openai_model_list(models: list[dict[str, Any]], aliases: dict[str, str]) -> dict[str, Any]:
    """``GET /v1/models`` body in OpenAI's list shape (see module docstring)."""
    data: list[dict[str, Any]] = []
    created_of: dict[str, int] = {}
    for model in models:
        model_id = model["id"]
        created_raw = model.get("created")
        created = created_raw if isinstance(created_raw, int) else 0
        created_of[model_id] = created
        if model_id in aliases:  # an alias by this name wins: requests for it go to its target
            continue
        entry: dict[str, Any] = {
            "id": model_id,
            "object": "model",
            "created": created,
            "owned_by": model_id.split("/", 1)[0] if "/" in model_id else "openrouter",
        }
        for extra in ("name", "context_length", "pricing"):
            if extra in model:
                entry[extra] = model[extra]
        data.append(entry)
    for alias, target in sorted(aliases.items()):
        data.append(
            {
                "id": alias,
                "object": "model",
                "created": created_of.get(target, 0),
                "owned_by": "openrouter-proxy",
                "alias_of": target,
            }
        )
    return {"object": "list", "data": data}
