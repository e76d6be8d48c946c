"""The admission seam: rate limits and budgets decide whether a request may go upstream.

The pipeline calls ``admit`` after routing (it knows the key, the model and the request),
``admit_fallback`` before each fallback model it moves on to, and ``settle`` exactly once
per ticket afterwards, in ``finally``, with the request's usage record,
whatever happened (success, upstream error, client gone). ``admit`` raises a
``ProxyError`` (429 for a limit or budget, 503 when the store is down and the policy is
``fail_closed``); everything it reserved is then already released.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from proxy.types import ChatCall, Principal, RoutePlan, Ticket, Usage, UsageRecord

__all__ = ["Admission", "NoLimits"]


class Admission(Protocol):
    async def admit(self, principal: Principal, call: ChatCall, plan: RoutePlan) -> Ticket:
        """Check and reserve every applicable limit and budget (one store round trip)."""

    async def admit_fallback(
        self, principal: Principal, call: ChatCall, plan: RoutePlan, model: str, held: Sequence[Ticket] = ()
    ) -> Ticket:
        """Before trying fallback ``model``: reserve its own per-model limits that the
        request's tickets ``held`` do not hold already (none: no store call). Raises as
        ``admit``; the pipeline then moves on to the next model."""

    async def settle(self, ticket: Ticket, record: UsageRecord) -> None:
        """Correct reservations to actual usage and release concurrency slots."""

    def budget_charge(self, ticket: Ticket, usage: Usage | None) -> dict[str, Any] | None:
        """What settling ``ticket`` with ``usage`` charges its budgets: ``{"keys": [budget
        hold keys], "nusd": cost, "alerts": [[scope, subject, budget, period, limit], ...]}``,
        or ``None`` (no budget, or decided without the shared store). A later correction of
        the request's cost adjusts exactly these keys."""

    async def correct_budgets(
        self, keys: Sequence[str], delta_nusd: int, alerts: Sequence[Sequence[Any]] | None = None
    ) -> bool:
        """Add ``delta_nusd`` to the budgets ``keys`` (from ``budget_charge``, with its
        ``alerts``); False if the store did not take it."""


_EMPTY = Ticket()


class NoLimits:
    """Admits everything; the default when no limits are configured."""

    async def admit(self, principal: Principal, call: ChatCall, plan: RoutePlan) -> Ticket:
        return _EMPTY

    async def admit_fallback(
        self, principal: Principal, call: ChatCall, plan: RoutePlan, model: str, held: Sequence[Ticket] = ()
    ) -> Ticket:
        return _EMPTY

    async def settle(self, ticket: Ticket, record: UsageRecord) -> None:
        return None

    def budget_charge(self, ticket: Ticket, usage: Usage | None) -> dict[str, Any] | None:
        return None

    async def correct_budgets(
        self, keys: Sequence[str], delta_nusd: int, alerts: Sequence[Sequence[Any]] | None = None
    ) -> bool:
        return True
