"""``Limiter``: the ``Admission`` implementation (rate limits and budgets, one round trip).

``admit`` binds the request's rules (key tier, team tier, per-model rules; see
``proxy.limits.policy``) to counter keys, computes each check's cost (1 request; estimated
prompt tokens plus the request's ``max_tokens``/``max_completion_tokens`` if it sets one;
1 slot in flight; the worst-case cost in nano-USD) and reserves them all in one backend
call. ``settle`` corrects the token windows to the actual total tokens (no usage: all
reserved tokens are given back; requests always count), releases the slot and the budget
holds, and adds the actual cost to the budgets.

Counter keys share one Redis Cluster hash tag per request: ``{t:<team>}`` when the key has
a team (its own and its team's counters), else ``{k:<key_id>}``::

    orp:{t:research}:k:3f2a9c1b7d4e:requests_per_minute
    orp:{t:research}:t:research:m:openai/gpt-4o:tokens_per_minute
    orp:{t:research}:t:research:budget_usd_per_month:2026-05

When the shared store fails, ``proxy.limits.failover`` decides (fail-open on local shares
or fail-closed 503), and degraded responses carry ``x-proxy-degraded: store-unavailable``.
Counters for metrics: ``degraded_total``, ``settle_failures_total``, ``rejected_total`` (by
metric: requests, tokens, concurrent, budget; ``store`` for 503s) and ``alerts.fired_total``.
"""

from __future__ import annotations

import functools
import itertools
import secrets
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from proxy.config import LimitsSettings
from proxy.errors import LimitsUnavailable
from proxy.limits.alerts import BudgetAlerts
from proxy.limits.backend import Backend, Check, CheckState, Decision, Release
from proxy.limits.failover import Failover
from proxy.limits.headers import binding_check, limit_error, ratelimit_headers
from proxy.limits.policy import Bound, KeyBudgets, LimitsPolicy, Period, Rule
from proxy.limits.pricing import Pricer, actual_cost_nusd, max_output_tokens
from proxy.pricing import Price
from proxy.tokens import estimate_prompt_tokens
from proxy.types import ChatCall, Principal, RoutePlan, Ticket, UsageRecord

__all__ = ["DEGRADED_HEADER", "BudgetsOf", "Limiter", "period_of"]


DEGRADED_HEADER = (b"x-proxy-degraded", b"store-unavailable")
_EMPTY = Ticket()
_DAY_MS = 86_400_000
_LEASE_GRACE_MS = 60_000
BudgetsOf = Callable[[str], KeyBudgets | None]


@functools.lru_cache(maxsize=64)
def _period_at(period: Period, minute: int) -> tuple[str, int]:
    return period_of(period, minute * 60.0)


def period_of(period: Period | None, now: float) -> tuple[str, int]:
    """``(period id, Unix ms the period ends)`` in UTC; ``("total", 0)`` never ends."""
    if period is None or period == "total":
        return "total", 0
    if now % 60:  # periods change on whole minutes: reuse the minute's answer
        return _period_at(period, int(now // 60))
    t = datetime.fromtimestamp(now, UTC)
    if period == "day":
        start = t.replace(hour=0, minute=0, second=0, microsecond=0)
        return start.strftime("%Y-%m-%d"), int(start.timestamp() * 1000) + _DAY_MS
    start = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    following = (
        start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    )
    return start.strftime("%Y-%m"), int(following.timestamp() * 1000)


def _safe(part: str) -> str:
    return part.replace("{", "%7B").replace("}", "%7D")


@dataclass(frozen=True, slots=True)
class _Reserved:
    """``Ticket.state``: everything ``settle`` needs."""

    rid: str
    backend: Backend
    degraded: bool
    bounds: tuple[Bound, ...]
    checks: tuple[Check, ...]
    states: tuple[CheckState, ...]
    period_ends: tuple[int, ...]
    budget_nusd: int
    price: Price | None


class Limiter:
    """Rate limits and budgets over a ``Backend`` (memory, or Redis with a local fallback)."""

    def __init__(
        self,
        settings: LimitsSettings,
        policy: LimitsPolicy,
        backend: Backend,
        pricer: Pricer,
        *,
        budgets_of: BudgetsOf | None = None,
        alerts: BudgetAlerts | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.policy = policy
        self.backend = backend
        self.pricer = pricer
        self.alerts = alerts or BudgetAlerts((), None, 1.0)
        self.failover = Failover(settings, backend, clock)
        self._budgets_of = budgets_of or (lambda _key_id: None)
        self._clock = clock
        self._lease_ms = int(settings.lease_s * 1000)
        self._rid_prefix = secrets.token_hex(6)
        self._rid_seq = itertools.count()
        self._bound_cache: dict[tuple[Principal, str | None, KeyBudgets | None], tuple[Bound, ...]] = {}
        self.rejected_total: Counter[str] = Counter()

    async def start(self) -> None:
        await self.failover.start()
        await self.alerts.start()

    async def aclose(self) -> None:
        await self.failover.aclose()
        await self.alerts.aclose()

    # -- admission ------------------------------------------------------------------

    async def admit(self, principal: Principal, call: ChatCall, plan: RoutePlan) -> Ticket:
        """Reserve every applicable limit and budget; raise ``RateLimited``/``QuotaExceeded``
        (429) or ``LimitsUnavailable`` (503, ``fail_closed``). Nothing stays reserved on raise."""
        bounds = self.bounds(principal, plan.model)
        if not bounds:
            return _EMPTY
        now = self._clock()
        metrics = {b.rule.metric for b in bounds}
        prompt = estimate_prompt_tokens(call.body) if metrics & {"tokens", "budget"} else 0
        tokens = prompt + (max_output_tokens(call.body) or 0)
        budget, price = 0, None
        if "budget" in metrics:
            budget, price = await self.pricer.worst_case((plan.model, *plan.fallbacks), prompt, call.body)
        checks, ends = self._checks(bounds, now, tokens, budget)
        rid = f"{self._rid_prefix}{next(self._rid_seq):x}"
        try:
            decision, backend, bounds = await self.failover.reserve(bounds, checks, rid, int(now * 1000))
        except LimitsUnavailable:
            self.rejected_total["store"] += 1
            raise
        degraded = backend is self.failover.local
        if not decision.admitted:
            i = binding_check(decision.states)
            waits = [max(0, end - int(now * 1000)) for end in ends]
            error = limit_error(i, bounds, decision.states, [c.cost for c in checks], waits)
            self.rejected_total[bounds[i].rule.metric] += 1
            if degraded:
                error.headers.append(DEGRADED_HEADER)
            raise error
        headers = ratelimit_headers(bounds, decision.states)
        if degraded:
            headers.append(DEGRADED_HEADER)
        state = _Reserved(rid, backend, degraded, bounds, tuple(checks), decision.states, tuple(ends), budget, price)
        return Ticket(tuple(headers), state)

    def bounds(self, principal: Principal, model: str | None) -> tuple[Bound, ...]:
        """The rules for ``principal`` calling ``model`` (``None``: all models), with keys."""
        budgets = self._budgets_of(principal.key_id)
        cache_key = (principal, model, budgets)
        found = self._bound_cache.get(cache_key)
        if found is not None:
            return found
        team = principal.team
        tag = f"t:{_safe(team)}" if team else f"k:{principal.key_id}"
        key_rules = self.policy.rules(self.policy.key_tier(principal.tier), model, budgets)
        team_rules = self.policy.rules(self.policy.team_tier(team), model)
        found = tuple(
            [Bound(r, _key(tag, "k", principal.key_id, r), "key", principal.name) for r in key_rules]
            + [Bound(r, _key(tag, "t", _safe(team), r), "team", team) for r in team_rules if team]
        )
        if len(self._bound_cache) > 10_000:
            self._bound_cache.clear()
        self._bound_cache[cache_key] = found
        return found

    def _checks(self, bounds: Sequence[Bound], now: float, tokens: int, budget: int) -> tuple[list[Check], list[int]]:
        checks, ends = [], []
        for bound in bounds:
            rule = bound.rule
            end = 0
            if rule.metric == "requests":
                check = Check(bound.key, rule.limit, 1, rule.window)
            elif rule.metric == "tokens":
                check = Check(bound.key, rule.limit, tokens, rule.window)
            elif rule.metric == "concurrent":
                check = Check(bound.key, rule.limit, 1, ttl_ms=self._lease_ms + _LEASE_GRACE_MS)
            else:
                period, end = period_of(rule.period, now)
                ttl = end - int(now * 1000) + _DAY_MS if end else 0
                check = Check(f"{bound.key}:{period}", rule.limit, budget, ttl_ms=ttl)
            checks.append(check)
            ends.append(end)
        return checks, ends

    # -- settlement -----------------------------------------------------------------

    async def settle(self, ticket: Ticket, record: UsageRecord) -> None:
        """Correct tokens to actual usage, release slot and budget holds, add actual cost."""
        state = ticket.state
        if not isinstance(state, _Reserved):
            return
        usage = record.usage
        tokens = (usage.total_tokens or usage.prompt_tokens + usage.completion_tokens) if usage else 0
        cost = actual_cost_nusd(usage, state.price, state.budget_nusd)
        now_ms = int(self._clock() * 1000)
        releases: list[Release] = []
        for bound, check, st, end in zip(state.bounds, state.checks, state.states, state.period_ends, strict=True):
            metric = bound.rule.metric
            if metric == "tokens":
                releases.append(Release(check.key, True, bucket=st.bucket, delta=tokens - check.cost))
            elif metric == "concurrent":
                releases.append(Release(check.key, False))
            elif metric == "budget":
                releases.append(Release(check.key, False, spend=cost, ttl_ms=end - now_ms + _DAY_MS if end else 0))
        if not releases:
            return
        spent = await self.failover.settle(state.backend, releases, state.rid, now_ms)
        if spent is None or state.degraded or not cost:
            return
        budgets = [(b, c) for b, c in zip(state.bounds, state.checks, strict=True) if b.rule.metric == "budget"]
        spent_of = [s for rel, s in zip(releases, spent, strict=True) if rel.spend]
        for (bound, check), after in zip(budgets, spent_of, strict=True):
            self.alerts.crossed(
                scope=bound.scope,
                subject=bound.subject,
                budget=bound.rule.name,
                period=check.key.rsplit(":", 1)[1],
                limit=bound.rule.limit,
                before=after - cost,
                after=after,
            )

    # -- state reporting --------------------------------------------------------------

    async def snapshot(self, principal: Principal) -> tuple[tuple[Bound, ...], list[Check], Decision, bool]:
        """Every counter of ``principal`` (all models) as it stands, without reserving."""
        bounds = self.bounds(principal, None)
        now = self._clock()
        checks, _ = self._checks(bounds, now, 0, 0)
        checks = [replace(c, cost=0) for c in checks]
        decision, backend, bounds = await self.failover.reserve(bounds, checks, "-", int(now * 1000), dry=True)
        return bounds, checks, decision, backend is self.failover.local

    async def ready(self) -> dict[str, Any]:
        """Store state for ``/readyz``::

        {"store": "redis" | "memory", "ok": bool (a ping answered in time),
         "degraded": bool (deciding without the store now), "failure_policy": str,
         "down_for_s": float | null, "last_error": str | null, "degraded_total": int}
        """
        return await self.failover.ready()

    @property
    def degraded_total(self) -> int:
        """Requests decided without the shared store (fail-open admissions and 503s)."""
        return self.failover.degraded_total

    @property
    def settle_failures_total(self) -> int:
        """Settlements the shared store did not take (their holds expire with the lease)."""
        return self.failover.settle_failures_total


def _key(tag: str, scope: str, subject: str, rule: Rule) -> str:
    model = f":m:{_safe(rule.model)}" if rule.model else ""
    return f"orp:{{{tag}}}:{scope}:{subject}{model}:{rule.name}"
