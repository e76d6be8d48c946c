"""What a request may cost (reserved at admission) and what it did cost (settled after).

Prices come from OpenRouter's ``/models`` through the cached ``ModelCatalog`` and are
parsed by ``proxy.pricing`` (USD per token as decimal strings, openrouter-api.md §6.1).
Amounts here are integer nano-USD (1e-9 USD), rounded up when reserving.

Worst case = ``ceil(prompt_estimate x prompt_margin) x prompt price + max_output x
completion price + request price``, where ``max_output`` is the request's
``max_completion_tokens`` or ``max_tokens``, else the model's
``top_provider.max_completion_tokens``, else the configured default. With fallback models
the dearest counts. A model with no usable price (not in the catalog, catalog unreachable,
negative "router" prices) reserves the configured ``unknown_price_usd`` instead. The
prompt estimate is not an upper bound (``prompt_margin`` covers its usual error), so a
budget can be overshot by at most that error of the requests in flight.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from proxy.errors import ProxyError
from proxy.pricing import Price, cost_of, nano, price_of
from proxy.types import Usage

__all__ = ["Pricer", "Quote", "actual_cost_nusd", "max_output_tokens"]

log = logging.getLogger("proxy.limits")

NANO = 1_000_000_000
GetModel = Callable[[str], Awaitable[dict[str, Any] | None]]


@dataclass(frozen=True, slots=True)
class Quote:
    """A model's ``Price`` and its ``max_output`` tokens (``top_provider``), if known."""

    price: Price
    max_output: int | None


def quote_of(model: dict[str, Any] | None) -> Quote | None:
    """The ``Quote`` of an OpenRouter model object (``None``: no usable price)."""
    price = price_of(model.get("pricing")) if model is not None else None
    if model is None or price is None:
        return None
    top = model.get("top_provider")
    max_out = top.get("max_completion_tokens") if isinstance(top, dict) else None
    return Quote(price, max_out if isinstance(max_out, int) and max_out > 0 else None)


def max_output_tokens(body: dict[str, Any]) -> int | None:
    """The request's own output cap: ``max_completion_tokens`` or ``max_tokens`` (tokens)."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


class Pricer:
    """Worst-case reservations from the catalog's prices (see module docstring)."""

    def __init__(
        self, get_model: GetModel, *, prompt_margin: float, default_max_output: int, unknown_price_usd: float
    ) -> None:
        self._get_model = get_model
        self.prompt_margin = prompt_margin
        self.default_max_output = default_max_output
        self.unknown_nusd = round(unknown_price_usd * NANO)
        self._quotes: dict[str, tuple[dict[str, Any], Quote | None]] = {}

    async def quote(self, model: str) -> Quote | None:
        """The model's quote, parsed once per catalog object (the catalog reuses its dicts)."""
        try:
            found = await self._get_model(model)
        except ProxyError as exc:
            log.warning("no price for %s (model catalog unavailable: %s)", model, exc.message)
            return None
        if found is None:
            return None
        cached = self._quotes.get(model)
        if cached is not None and cached[0] is found:
            return cached[1]
        quote = quote_of(found)
        if len(self._quotes) > 4096:
            self._quotes.clear()
        self._quotes[model] = (found, quote)
        return quote

    async def worst_case(
        self, models: tuple[str, ...], prompt_tokens: int, body: dict[str, Any]
    ) -> tuple[int, Price | None]:
        """``(nano-USD to reserve, price of the dearest model, or None when one is unknown)``."""
        requested = max_output_tokens(body)
        prompt = math.ceil(prompt_tokens * self.prompt_margin)
        worst, chosen = 0, None
        for model in dict.fromkeys(models):
            quote = await self.quote(model)
            if quote is None:
                return self.unknown_nusd, None
            price = quote.price
            output = requested if requested is not None else quote.max_output or self.default_max_output
            usd = prompt * price.prompt + output * price.completion + price.request
            cost = math.ceil(usd * NANO)
            if chosen is None or cost > worst:
                worst, chosen = cost, price
        return worst, chosen


def actual_cost_nusd(usage: Usage | None, price: Price | None, reserved: int) -> int:
    """What a finished request cost, in nano-USD.

    OpenRouter's ``usage.cost`` when present; else priced from the token counts; else (no
    price known) the reservation itself, so an unknown cost is never counted as free. No
    usage at all (the request failed before generating) costs nothing.
    """
    if usage is None:
        return 0
    if usage.cost_usd is not None:
        return max(0, nano(usage.cost_usd))
    if price is None:
        return reserved
    return max(0, int((cost_of(price, usage) * NANO).to_integral_value()))
