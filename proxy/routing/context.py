"""The context-window guard: a request that cannot fit the routed model never goes upstream.

Need = estimated prompt tokens (``proxy.tokens.estimate_prompt_tokens`` of the upstream
body) + the requested output limit (``max_completion_tokens``, else ``max_tokens``, else
0). A model fits when need <= its ``context_length`` from OpenRouter's ``/models``
(openrouter-api.md §6.1; variant suffixes map to the base model); a model the catalog
does not list is assumed to fit. The plan's model is kept when it fits; otherwise the
first model that fits, in the order plan fallbacks then the body's ``models`` list, takes
its place (with the plan's fallbacks after it; a ``models`` list in the body loses the
models that do not fit); when none fits, ``ContextLengthExceeded``
(400) is raised before any upstream call.

Cheap by design: requests whose need is at most ``floor_tokens`` (default 4096; every
current OpenRouter chat model has at least that) skip the catalog. When the catalog
cannot be fetched within ``timeout_s``, requests go through unchecked and the failure is
logged once (again only after a later success).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

import orjson

from proxy.catalog import ModelCatalog
from proxy.errors import ContextLengthExceeded, ProxyError
from proxy.tokens import estimate_prompt_tokens
from proxy.types import ChatCall, RoutePlan

__all__ = ["ContextGuard", "requested_output_tokens"]

log = logging.getLogger("proxy.routing")


def requested_output_tokens(body: dict[str, Any]) -> int:
    """``max_completion_tokens``, else ``max_tokens``, else 0 (tokens)."""
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return 0


class ContextGuard:
    """Built once per worker with the worker's ``ModelCatalog``; call per request."""

    def __init__(self, catalog: ModelCatalog, *, floor_tokens: int = 4096, timeout_s: float = 2.0) -> None:
        self.catalog = catalog
        self.floor_tokens = floor_tokens
        self.timeout_s = timeout_s
        self._warned = False

    async def __call__(self, plan: RoutePlan, call: ChatCall) -> RoutePlan:
        """``plan`` itself, or a plan on the first fitting fallback (see the module docstring).

        Raises ``ContextLengthExceeded`` when neither the model nor any fallback fits.
        """
        body = plan.request if plan.request is not None else call.body
        prompt = estimate_prompt_tokens(body)
        output = requested_output_tokens(body)
        need = prompt + output
        if need <= self.floor_tokens:
            return plan
        try:
            async with asyncio.timeout(self.timeout_s):
                windows = {m: await self._window(m) for m in _candidates(plan, body)}
        except (ProxyError, TimeoutError) as exc:
            if not self._warned:
                self._warned = True
                log.warning("context guard off: the model catalog is unavailable (%s)", exc)
            return plan
        self._warned = False
        fits = [m for m, window in windows.items() if window is None or need <= window]
        if plan.model in fits:
            return plan
        chain = (plan.model, *plan.fallbacks)
        chosen = next((m for m in windows if m in fits), None)
        if chosen is None:
            window = windows[plan.model]
            raise ContextLengthExceeded(
                f"This request needs about {need} tokens (prompt ~{prompt} + max_tokens {output}), more than "
                f"the {window}-token context window of {plan.model}"
                + (" and of every fallback" if len(windows) > 1 else "")
                + ". Shorten the messages or lower max_tokens.",
                param="messages",
            )
        request = {**body, "model": chosen}
        models = body.get("models")
        if isinstance(models, list):
            request["models"] = [chosen, *(m for m in models if m in fits and m != chosen)]
        rest = chain[chain.index(chosen) + 1 :] if chosen in chain else ()
        return dataclasses.replace(plan, model=chosen, fallbacks=rest, request=request, body=orjson.dumps(request))

    async def _window(self, model: str) -> int | None:
        info = await self.catalog.get(model)
        length = info.get("context_length") if info else None
        return length if isinstance(length, int) and length > 0 else None


def _candidates(plan: RoutePlan, body: dict[str, Any]) -> list[str]:
    models = body.get("models")
    extra = [m for m in models if isinstance(m, str)] if isinstance(models, list) else []
    return list(dict.fromkeys([plan.model, *plan.fallbacks, *extra]))
