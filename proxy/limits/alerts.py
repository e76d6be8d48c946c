"""Soft budget thresholds: a log event and an optional webhook POST, once per period.

``crossed`` is called with a budget's spend before and after one settlement. Spend only
grows, and each settlement adds to it atomically (``HINCRBY`` in Redis), so exactly one
settlement (on exactly one replica) sees each threshold crossed: no extra bookkeeping is
needed for "once per period". The webhook POST runs as a background task with a bounded
timeout and never delays or fails a request; its body::

    {"event": "budget_threshold", "scope": "key"|"team", "subject": str, "budget": str,
     "period": str, "threshold": float, "limit_usd": float, "spent_usd": float}
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx

__all__ = ["BudgetAlerts"]

log = logging.getLogger("proxy.limits.alerts")

NANO = 1e9


class BudgetAlerts:
    """Fires threshold events; ``start``/``aclose`` manage the webhook client (if any)."""

    def __init__(self, thresholds: tuple[float, ...], webhook_url: str | None, timeout_s: float) -> None:
        self.thresholds = tuple(sorted(set(thresholds)))
        self.webhook_url = webhook_url
        self.timeout_s = timeout_s
        self.fired_total = 0
        self._client: httpx.AsyncClient | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        if self.webhook_url:
            self._client = httpx.AsyncClient(timeout=self.timeout_s)

    async def aclose(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def crossed(
        self, *, scope: str, subject: str, budget: str, period: str, limit: int, before: int, after: int
    ) -> list[float]:
        """Fire every threshold with ``before < threshold x limit <= after`` (nano-USD)."""
        fired = [t for t in self.thresholds if before < t * limit <= after]
        for threshold in fired:
            self.fired_total += 1
            event: dict[str, Any] = {
                "event": "budget_threshold",
                "scope": scope,
                "subject": subject,
                "budget": budget,
                "period": period,
                "threshold": threshold,
                "limit_usd": limit / NANO,
                "spent_usd": after / NANO,
            }
            log.warning(
                "budget alert: %s %r spent %.6f of %.2f USD (%s, %s): crossed %d%%",
                scope,
                subject,
                after / NANO,
                limit / NANO,
                budget,
                period,
                round(threshold * 100),
            )
            if self._client is not None and self.webhook_url:
                task = asyncio.get_running_loop().create_task(self._post(self._client, self.webhook_url, event))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        return fired

    async def _post(self, client: httpx.AsyncClient, url: str, event: dict[str, Any]) -> None:
        try:
            response = await client.post(url, json=event)
            if response.status_code >= 400:
                log.warning("budget alert webhook answered HTTP %d", response.status_code)
        except httpx.HTTPError as exc:
            log.warning("budget alert webhook failed: %s", type(exc).__name__)
