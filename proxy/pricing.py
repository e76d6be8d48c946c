"""Model prices from OpenRouter's catalog, and what a generation costs by them.

Source: openrouter-api.md §6.1. ``pricing`` values are decimal strings in USD per token,
except ``request`` (USD per request) and ``web_search`` (USD per search); 2026 catalogs
omit keys that would be zero, and router models report ``"-1"`` (no fixed price: such a
model has no ``Price``). The keys used:

=====================  ==================================================================
``prompt``             per prompt token not read from the cache
``input_cache_read``   per cached prompt token (``prompt`` when absent)
``completion``         per completion token that is not reasoning
``internal_reasoning`` per reasoning token (``completion`` when absent)
``request``            per request
``web_search``         per web-search request (``server_tool_use_details``)
=====================  ==================================================================

``discount`` and conditional ``overrides`` are not applied, so a cost from prices is an
estimate; OpenRouter's own figure (``usage.cost`` or ``/generation``) always wins.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from proxy.types import Usage

__all__ = ["Price", "PriceBook", "cost_of", "nano", "price_of"]

log = logging.getLogger("proxy.pricing")

_ZERO = Decimal(0)

LoadModels = Callable[[], Awaitable[list[dict[str, Any]]]]


@dataclass(frozen=True, slots=True)
class Price:
    """One model's prices in USD (per token, per request, per search; see module doc)."""

    prompt: Decimal
    completion: Decimal
    input_cache_read: Decimal | None = None
    internal_reasoning: Decimal | None = None
    request: Decimal = _ZERO
    web_search: Decimal = _ZERO


def nano(cost_usd: Any) -> int:
    """USD (``Decimal``, float or decimal string) as integer nano-USD, rounded half to even
    from the float's shortest decimal form (so the ledger and the budgets agree); else 0."""
    if isinstance(cost_usd, Decimal):
        return int((cost_usd * 1_000_000_000).to_integral_value())
    if isinstance(cost_usd, float):
        return int((Decimal(repr(cost_usd)) * 1_000_000_000).to_integral_value())
    if isinstance(cost_usd, int | str) and not isinstance(cost_usd, bool):
        return int((Decimal(cost_usd) * 1_000_000_000).to_integral_value())
    return 0


def _decimal(value: Any) -> Decimal | None:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    try:
        number = Decimal(value) if isinstance(value, str | int) else Decimal(repr(value))
    except InvalidOperation:
        return None
    return number if number.is_finite() else None


def price_of(pricing: Any) -> Price | None:
    """``Price`` from a catalog ``pricing`` object; ``None`` if absent, invalid or negative."""
    if not isinstance(pricing, dict):
        return None
    values = {name: _decimal(pricing.get(name)) for name in Price.__slots__}
    if values["prompt"] is None or values["completion"] is None:
        return None
    if any(v is not None and v < 0 for v in values.values()):
        return None
    return Price(
        prompt=values["prompt"],
        completion=values["completion"],
        input_cache_read=values["input_cache_read"],
        internal_reasoning=values["internal_reasoning"],
        request=values["request"] or _ZERO,
        web_search=values["web_search"] or _ZERO,
    )


def cost_of(price: Price, usage: Usage) -> Decimal:
    """USD cost of ``usage`` at ``price``, exact (``Decimal``).

    Cached tokens are part of ``prompt_tokens`` and reasoning tokens part of
    ``completion_tokens`` (openrouter-api.md §2.3); each part is priced once.
    """
    cached = min(max(usage.cached_tokens, 0), usage.prompt_tokens)
    reasoning = min(max(usage.reasoning_tokens, 0), usage.completion_tokens)
    cache_price = price.prompt if price.input_cache_read is None else price.input_cache_read
    reasoning_price = price.completion if price.internal_reasoning is None else price.internal_reasoning
    return (
        (usage.prompt_tokens - cached) * price.prompt
        + cached * cache_price
        + (usage.completion_tokens - reasoning) * price.completion
        + reasoning * reasoning_price
        + price.request
        + usage.web_search_requests * price.web_search
    )


class PriceBook:
    """Synchronous price lookups for the hot path, refreshed from the catalog in the background.

    ``get`` never waits: it answers from the last loaded table and, when the table is older
    than ``refresh_s`` (or never loaded), starts one background refresh. A failed refresh
    keeps the old table and is retried after ``retry_s`` seconds.
    """

    def __init__(
        self,
        load: LoadModels,
        refresh_s: float = 300.0,
        retry_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._load = load
        self._refresh_s = refresh_s
        self._retry_s = retry_s
        self._clock = clock
        self._prices: dict[str, Price] = {}
        self._next_at = 0.0
        self._task: asyncio.Task[None] | None = None

    def get(self, model_id: str | None) -> Price | None:
        """The price of ``model_id`` (variant suffixes such as ``:nitro`` fall back to the base)."""
        if self._task is None and self._clock() >= self._next_at:
            self._task = asyncio.get_running_loop().create_task(self._refresh(), name="price-book-refresh")
        if model_id is None:
            return None
        found = self._prices.get(model_id)
        if found is None and ":" in model_id:
            found = self._prices.get(model_id.split(":", 1)[0])
        return found

    async def refresh(self) -> None:
        """Load the table now (awaits a refresh already under way)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._refresh(), name="price-book-refresh")
        await asyncio.shield(self._task)

    async def _refresh(self) -> None:
        try:
            models = await self._load()
            prices = {}
            for model in models:
                price = price_of(model.get("pricing"))
                if price is not None and isinstance(model.get("id"), str):
                    prices[model["id"]] = price
            self._prices = prices
            self._next_at = self._clock() + self._refresh_s
        except Exception as exc:  # a failed refresh must never break metering
            log.warning("model prices not refreshed (%s); keeping %d known prices", exc, len(self._prices))
            self._next_at = self._clock() + self._retry_s
        finally:
            self._task = None

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
