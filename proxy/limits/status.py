"""A principal's limits and spend as JSON, for ``GET /v1/limits`` and ``GET /admin/keys/{name}``.

Shape (counts are requests or tokens; USD amounts are floats; times are seconds)::

    {"key": str, "key_id": str, "team": str | null, "tier": str | null,
     "team_tier": str | null, "degraded": bool,
     "limits": [{"scope": "key" | "team", "subject": str, "model": str | null,
                 "limit": "requests_per_minute", "value": int, "used": int,
                 "remaining": int, "reset_s": float}],
     "budgets": [{"scope", "subject", "budget": "budget_usd_per_day", "period": "2026-05-03",
                  "limit_usd", "spent_usd", "reserved_usd", "remaining_usd"}]}

``reserved_usd`` is held by requests in flight (their worst-case cost); concurrency limits
report requests in flight as ``used``.
"""

from __future__ import annotations

from typing import Any

from proxy.limits.limiter import Limiter
from proxy.limits.policy import NANO
from proxy.types import Principal

__all__ = ["limits_status"]


async def limits_status(limiter: Limiter, principal: Principal) -> dict[str, Any]:
    """The current state of every limit and budget of ``principal`` (no reservation made).

    May raise nothing but what the store raises through the limiter's fallback rules: when
    the shared store is down, the local (degraded) counters are shown with ``degraded``.
    """
    bounds, checks, decision, degraded = await limiter.snapshot(principal)
    limits: list[dict[str, Any]] = []
    budgets: list[dict[str, Any]] = []
    for bound, check, state in zip(bounds, checks, decision.states, strict=True):
        rule = bound.rule
        remaining = max(0, rule.limit - state.used)
        if rule.metric == "budget":
            budgets.append(
                {
                    "scope": bound.scope,
                    "subject": bound.subject,
                    "budget": rule.name,
                    "period": check.key.rsplit(":", 1)[1],
                    "limit_usd": rule.limit / NANO,
                    "spent_usd": state.spent / NANO,
                    "reserved_usd": (state.used - state.spent) / NANO,
                    "remaining_usd": remaining / NANO,
                }
            )
        else:
            limits.append(
                {
                    "scope": bound.scope,
                    "subject": bound.subject,
                    "model": rule.model,
                    "limit": rule.name,
                    "value": rule.limit,
                    "used": state.used,
                    "remaining": remaining,
                    "reset_s": state.reset_ms / 1000,
                }
            )
    policy = limiter.policy
    return {
        "key": principal.name,
        "key_id": principal.key_id,
        "team": principal.team,
        "tier": policy.key_tier(principal.tier),
        "team_tier": policy.team_tier(principal.team),
        "degraded": degraded,
        "limits": limits,
        "budgets": budgets,
    }
