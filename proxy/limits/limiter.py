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
from datetime import UTC, datetime
from typing import Any, NamedTuple

from proxy.config import LimitsSettings
from proxy.errors import LimitsUnavailable
from proxy.limits.alerts import BudgetAlerts
from proxy.limits.backend import Backend, Check, CheckState, Decision, Release
from proxy.limits.failover import Failover
from proxy.limits.headers import binding_check, header_plan, limit_error, ratelimit_headers
from proxy.limits.leased import LeasedBackend
from proxy.limits.policy import Bound, KeyBudgets, LimitsPolicy, Period, Rule
from proxy.limits.pricing import Pricer, actual_cost_nusd, max_output_tokens
from proxy.pricing import Price
from proxy.tokens import estimate_prompt_tokens
from proxy.types import ChatCall, Principal, RoutePlan, Ticket, Usage, UsageRecord

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


_REQUESTS, _TOKENS, _CONCURRENT, _BUDGET = 0, 1, 2, 3
_FIXED_COST = (_REQUESTS, _CONCURRENT)
_KIND = {"requests": _REQUESTS, "tokens": _TOKENS, "concurrent": _CONCURRENT, "budget": _BUDGET}
# the smallest allotment worth a round trip under leased admission (``proxy.limits.leased``):
# 50 requests, 50,000 tokens, 10 slots, $0.50 (in nano-USD)
_LEAST = {_REQUESTS: 50, _TOKENS: 50_000, _CONCURRENT: 10, _BUDGET: 500_000_000}


class _Binding:
    """``bounds`` compiled for one UTC minute: the checks with their costs left to fill in,
    the budget periods of that minute, and what settlement releases. Hashable by identity:
    it is the backends' ``shape`` of the checks it makes."""

    __slots__ = (
        "bounds",
        "budget_releases",
        "concurrent",
        "ends",
        "kinds",
        "minute",
        "needs_prompt",
        "template",
        "windows",
    )

    def __init__(self, bounds: tuple[Bound, ...], minute: int, lease_ms: int) -> None:
        self.bounds = bounds
        self.minute = minute
        self.kinds = tuple(_KIND[b.rule.metric] for b in bounds)
        self.needs_prompt = any(k in (_TOKENS, _BUDGET) for k in self.kinds)
        start_ms = minute * 60_000
        template, ends = [], []
        for bound, kind in zip(bounds, self.kinds, strict=True):
            rule, end = bound.rule, 0
            if kind == _REQUESTS:
                check = Check(bound.key, rule.limit, 1, rule.window, least=_LEAST[kind])
            elif kind == _TOKENS:
                check = Check(bound.key, rule.limit, 0, rule.window, least=_LEAST[kind])
            elif kind == _CONCURRENT:
                check = Check(bound.key, rule.limit, 1, ttl_ms=lease_ms + _LEASE_GRACE_MS, least=_LEAST[kind])
            else:  # the period's key and a TTL that outlives the period by a day
                period, end = period_of(rule.period, minute * 60.0)
                ttl = end - start_ms + _DAY_MS if end else 0
                check = Check(f"{bound.key}:{period}", rule.limit, 0, ttl_ms=ttl, least=_LEAST[kind])
            template.append(check)
            ends.append(end)
        self.template = tuple(template)
        self.ends = tuple(ends)
        self.windows = header_plan(bounds)
        budget_releases, at = [], 0  # (index in settle()'s releases, bound, period id) of each budget
        for bound, check, kind in zip(bounds, template, self.kinds, strict=True):
            if kind == _BUDGET:
                budget_releases.append((at, bound, check.key.rsplit(":", 1)[1]))
            at += kind != _REQUESTS
        self.budget_releases = tuple(budget_releases)
        self.concurrent = tuple(
            Release(c.key, False) for c, k in zip(template, self.kinds, strict=True) if k == _CONCURRENT
        )

    def checks(self, tokens: int, budget: int) -> tuple[Check, ...]:
        """The checks of one request costing ``tokens`` tokens and ``budget`` nano-USD."""
        if not self.needs_prompt:
            return self.template
        return tuple(
            [
                c
                if k in _FIXED_COST
                else Check(c.key, c.limit, tokens if k == _TOKENS else budget, c.window, c.ttl_ms, c.least)
                for c, k in zip(self.template, self.kinds, strict=True)
            ]
        )


class _Reserved(NamedTuple):
    """``Ticket.state``: everything ``settle`` needs."""

    rid: str
    backend: Backend
    degraded: bool
    binding: _Binding
    checks: tuple[Check, ...]
    states: tuple[CheckState, ...]
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
        self._bound_cache: dict[tuple[Principal, str | None, KeyBudgets | None, bool], tuple[Bound, ...]] = {}
        self._bindings: dict[tuple[Principal, str | None, KeyBudgets | None, bool], _Binding | None] = {}
        self.rejected_total: Counter[str] = Counter()
        # budget key -> its bound and period, for spend a backend settles later (``_spent``)
        self._alerting: dict[str, tuple[Bound, str]] = {}
        if isinstance(backend, LeasedBackend):
            backend.on_spent = self._spent

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
        now = self._clock()
        binding = self._binding(principal, plan.model, int(now // 60))
        if binding is None:
            return _EMPTY
        return await self._reserve(binding, call, plan, now)

    async def admit_fallback(
        self, principal: Principal, call: ChatCall, plan: RoutePlan, model: str, held: Sequence[Ticket] = ()
    ) -> Ticket:
        """Reserve the per-model limits of ``model``, a fallback the request moves on to (the
        key's and team's own limits and the budgets were reserved by ``admit``, for the
        dearest model of the plan), except those the request's tickets ``held`` hold already
        (``openai/gpt-4o:nitro`` after ``openai/gpt-4o``). Raises as ``admit``; an empty
        ticket when nothing is left to reserve (no store call)."""
        now = self._clock()
        minute = int(now // 60)
        binding = self._binding(principal, model, minute, only_model=True)
        if binding is None:
            return _EMPTY
        taken = {b.key for t in held if isinstance(t.state, _Reserved) for b in t.state.binding.bounds}
        if any(b.key in taken for b in binding.bounds):
            bounds = tuple(b for b in binding.bounds if b.key not in taken)
            if not bounds:
                return _EMPTY
            binding = _Binding(bounds, minute, self._lease_ms)
        return await self._reserve(binding, call, plan, now)

    async def _reserve(self, binding: _Binding, call: ChatCall, plan: RoutePlan, now: float) -> Ticket:
        tokens = budget = 0
        price = None
        if binding.needs_prompt:
            body = call.body if plan.request is None else plan.request  # as routing capped it
            prompt = estimate_prompt_tokens(body)
            tokens = prompt + (max_output_tokens(body) or 0)
            if _BUDGET in binding.kinds:
                budget, price = await self.pricer.worst_case((plan.model, *plan.fallbacks), prompt, body)
        checks = binding.checks(tokens, budget)
        rid = f"{self._rid_prefix}{next(self._rid_seq):x}"
        now_ms = int(now * 1000)
        try:
            decision, backend, bounds = await self.failover.reserve(binding.bounds, checks, rid, now_ms, shape=binding)
        except LimitsUnavailable:
            self.rejected_total["store"] += 1
            raise
        degraded = backend is self.failover.local
        if not decision.admitted:
            i = binding_check(decision.states)
            waits = [max(0, end - now_ms) for end in binding.ends]
            error = limit_error(i, bounds, decision.states, [c.cost for c in checks], waits)
            self.rejected_total[bounds[i].rule.metric] += 1
            if degraded:
                error.headers.append(DEGRADED_HEADER)
            raise error
        if degraded:
            headers = ratelimit_headers(bounds, decision.states)
            headers.append(DEGRADED_HEADER)
        else:
            headers = ratelimit_headers(bounds, decision.states, binding.windows)
        state = _Reserved(rid, backend, degraded, binding, checks, decision.states, budget, price)
        return Ticket(tuple(headers), state)

    def _binding(
        self, principal: Principal, model: str | None, minute: int, *, only_model: bool = False
    ) -> _Binding | None:
        budgets = self._budgets_of(principal.key_id)
        cache_key = (principal, model, budgets, only_model)
        if cache_key in self._bindings:
            found = self._bindings[cache_key]
            if found is None or found.minute == minute:
                return found
        bounds = self.bounds(principal, model, only_model=only_model)
        binding = _Binding(bounds, minute, self._lease_ms) if bounds else None
        if len(self._bindings) > 10_000:
            self._bindings.clear()
        self._bindings[cache_key] = binding
        return binding

    def bounds(self, principal: Principal, model: str | None, *, only_model: bool = False) -> tuple[Bound, ...]:
        """The rules for ``principal`` calling ``model`` (``None``: all models), with keys;
        ``only_model``: just ``model``'s per-model rules."""
        budgets = self._budgets_of(principal.key_id)
        cache_key = (principal, model, budgets, only_model)
        found = self._bound_cache.get(cache_key)
        if found is not None:
            return found
        team = principal.team
        tag = f"t:{_safe(team)}" if team else f"k:{principal.key_id}"
        key_tier, team_tier = self.policy.key_tier(principal.tier), self.policy.team_tier(team)
        if only_model and model is not None:
            key_rules, team_rules = self.policy.model_rules(key_tier, model), self.policy.model_rules(team_tier, model)
        else:
            key_rules, team_rules = self.policy.rules(key_tier, model, budgets), self.policy.rules(team_tier, model)
        found = tuple(
            [Bound(r, _key(tag, "k", principal.key_id, r), "key", principal.name) for r in key_rules]
            + [Bound(r, _key(tag, "t", _safe(team), r), "team", team) for r in team_rules if team]
        )
        if len(self._bound_cache) > 10_000:
            self._bound_cache.clear()
        self._bound_cache[cache_key] = found
        return found

    # -- settlement -----------------------------------------------------------------

    async def settle(self, ticket: Ticket, record: UsageRecord) -> None:
        """Correct tokens to actual usage, release slot and budget holds, add actual cost.

        A per-model token window is charged only when its model (or a variant of it) is
        ``record.routed_model``, the model that answered: a primary that failed over to a
        fallback used none of its own tokens."""
        state = ticket.state
        if not isinstance(state, _Reserved):
            return
        binding = state.binding
        kinds = binding.kinds
        if _TOKENS not in kinds and _BUDGET not in kinds:
            releases: list[Release] = list(binding.concurrent)
            cost = 0
        else:
            usage = record.usage
            tokens = (usage.total_tokens or usage.prompt_tokens + usage.completion_tokens) if usage else 0
            cost = actual_cost_nusd(usage, state.price, state.budget_nusd)
            releases = []
            answered = record.routed_model
            for kind, check, st, bound in zip(kinds, state.checks, state.states, binding.bounds, strict=True):
                if kind == _TOKENS:
                    used = tokens
                    model = bound.rule.model
                    if model is not None and answered != model and (answered or "").split(":", 1)[0] != model:
                        used = 0  # a model's own token window: another model (a fallback) answered
                    releases.append(Release(check.key, True, st.bucket, used - check.cost))
                elif kind == _CONCURRENT:
                    releases.append(Release(check.key, False))
                elif kind == _BUDGET:
                    releases.append(Release(check.key, False, 0, 0, cost))
        if not releases:
            return
        now_ms = int(self._clock() * 1000)
        spent = await self.failover.settle(state.backend, releases, state.rid, now_ms, shape=binding)
        if spent is None or state.degraded or not cost or not self.alerts.thresholds:
            return
        if not spent:  # deferred (leased admission): the backend reports the batch's spend to _spent
            alerting = self._alerting
            for at, bound, period in binding.budget_releases:
                key = releases[at].key
                alerting.pop(key, None)  # to the end: the oldest keys go first
                alerting[key] = (bound, period)
            if len(alerting) > 10_000:  # past periods' keys, long settled
                for key in list(itertools.islice(alerting, 1000)):
                    del alerting[key]
            return
        for at, bound, period in binding.budget_releases:
            self._crossed(bound, period, spent[at] - cost, spent[at])

    def budget_charge(self, ticket: Ticket, usage: Usage | None) -> dict[str, Any] | None:
        """See ``Admission.budget_charge``: the budget hold keys ``ticket`` reserved, and the
        cost ``settle`` charges them (``actual_cost_nusd``, nano-USD)."""
        state = ticket.state
        if not isinstance(state, _Reserved) or state.degraded or _BUDGET not in state.binding.kinds:
            return None
        binding = state.binding
        keys = [check.key for kind, check in zip(binding.kinds, state.checks, strict=True) if kind == _BUDGET]
        alerts = [[b.scope, b.subject, b.rule.name, period, b.rule.limit] for _, b, period in binding.budget_releases]
        return {"keys": keys, "nusd": actual_cost_nusd(usage, state.price, state.budget_nusd), "alerts": alerts}

    async def correct_budgets(
        self, keys: Sequence[str], delta_nusd: int, alerts: Sequence[Sequence[Any]] | None = None
    ) -> bool:
        """See ``Admission.correct_budgets`` (a reconciliation's correction, in nano-USD).
        ``alerts``: per key ``[scope, subject, budget, period, limit]`` (``budget_charge``),
        so a correction that crosses a threshold alerts as a settlement would."""
        if not delta_nusd or not keys:
            return True
        spent = await self.failover.add_spend(keys, delta_nusd)
        if spent is None:
            return False
        if alerts and delta_nusd > 0 and self.alerts.thresholds and len(alerts) == len(spent):
            for after, (scope, subject, budget, period, limit) in zip(spent, alerts, strict=True):
                if after >= 0:
                    self.alerts.crossed(
                        scope=scope,
                        subject=subject,
                        budget=budget,
                        period=period,
                        limit=int(limit),
                        before=after - delta_nusd,
                        after=after,
                    )
        return True

    def _spent(self, key: str, before: int, after: int) -> None:
        """A deferred settlement moved budget ``key``'s spend from ``before`` to ``after`` (nano-USD)."""
        found = self._alerting.get(key)
        if found is not None:
            self._crossed(*found, before, after)

    def _crossed(self, bound: Bound, period: str, before: int, after: int) -> None:
        self.alerts.crossed(
            scope=bound.scope,
            subject=bound.subject,
            budget=bound.rule.name,
            period=period,
            limit=bound.rule.limit,
            before=before,
            after=after,
        )

    # -- state reporting --------------------------------------------------------------

    async def snapshot(self, principal: Principal) -> tuple[tuple[Bound, ...], list[Check], Decision, bool]:
        """Every counter of ``principal`` (all models) as it stands, without reserving."""
        bounds = self.bounds(principal, None)
        now = self._clock()
        checks = [c._replace(cost=0) for c in _Binding(bounds, int(now // 60), self._lease_ms).template]
        decision, backend, bounds = await self.failover.reserve(bounds, checks, "-", int(now * 1000), dry=True)
        return bounds, checks, decision, backend is self.failover.local

    def state(self) -> dict[str, Any]:
        """The shared store as the requests found it, for ``/readyz`` (no I/O)::

        {"store": "redis" | "memory", "degraded": bool (the last reservation could not
         reach it; the next after ``store_retry_s`` tries again), "failure_policy": str,
         "down_for_s": float | null, "last_error": str | null, "degraded_total": int}
        """
        return self.failover.state()

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
