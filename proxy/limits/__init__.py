"""Rate limits and USD budgets per key, per team and per (key or team, model).

``open_limiter`` builds the ``Admission`` implementation over the store: Lua scripts in
Redis when the store is a ``RedisStore`` (exact across replicas), the same algorithm in
memory otherwise. The modules, one job each:

=============  ==================================================================
``policy``     ``policies/limits.yaml``: schema, validation (file and line), rules
``backend``    the counter contract (windows and holds) both stores implement
``lua``        the reserve and settle scripts
``redis``      counters in Redis (one ``EVALSHA`` per admission, one per settlement)
``leased``     leased admission: most requests admitted from per-worker allotments
``memory``     the same counters in process memory
``pricing``    worst-case and actual cost from OpenRouter's prices
``headers``    ``x-ratelimit-*`` headers and the 429 errors
``alerts``     soft budget thresholds (log and webhook)
``limiter``    ``Limiter``: admit and settle, fail-open/closed, state for ``/readyz``
``status``     a principal's limits and spend as JSON (``GET /v1/limits``, admin API)
=============  ==================================================================
"""

from __future__ import annotations

import time
from collections.abc import Callable

from proxy.catalog import ModelCatalog
from proxy.config import LimitsSettings, Settings
from proxy.limits.alerts import BudgetAlerts
from proxy.limits.backend import Backend
from proxy.limits.leased import LeasedBackend
from proxy.limits.limiter import DEGRADED_HEADER, BudgetsOf, Limiter
from proxy.limits.memory import MemoryBackend
from proxy.limits.policy import KeyBudgets, LimitsPolicy, check_key_tiers, load_limits_policy
from proxy.limits.pricing import Pricer
from proxy.limits.redis import RedisBackend
from proxy.store import Store
from proxy.store.redis import RedisStore
from proxy.yamlsrc import ConfigError, Problem

__all__ = [
    "DEGRADED_HEADER",
    "KeyBudgets",
    "Limiter",
    "LimitsPolicy",
    "check_key_tiers",
    "check_limits",
    "load_limits_policy",
    "open_limiter",
]


def open_limiter(
    settings: LimitsSettings,
    policy: LimitsPolicy,
    store: Store,
    catalog: ModelCatalog,
    *,
    budgets_of: BudgetsOf | None = None,
    clock: Callable[[], float] = time.time,
) -> Limiter:
    """The limiter for ``store``; call ``await limiter.start()`` and ``aclose()`` around use."""
    backend: Backend
    if isinstance(store, RedisStore):
        backend = RedisBackend(store.client, settings.store_timeout_ms / 1000)
        if settings.admission == "leased":
            backend = LeasedBackend(backend, settings.replicas, retry_s=settings.store_retry_s, clock=clock)
    else:
        backend = MemoryBackend()
    pricer = Pricer(
        catalog.get,
        prompt_margin=settings.prompt_margin,
        default_max_output=settings.default_max_completion_tokens,
        unknown_price_usd=settings.unknown_price_usd,
    )
    alerts = BudgetAlerts(settings.alert_thresholds, settings.alert_webhook_url, settings.alert_timeout_s)
    return Limiter(settings, policy, backend, pricer, budgets_of=budgets_of, alerts=alerts, clock=clock)


def check_limits(settings: Settings, config_file: str | None = None) -> tuple[LimitsPolicy | None, list[Problem]]:
    """Load the limits policy and check the config keys' tiers against it (for ``check``)."""
    try:
        policy = load_limits_policy(settings.policies_dir / settings.limits.policy_file)
    except ConfigError as exc:
        return None, exc.problems
    return policy, check_key_tiers(policy, [(k.name, k.tier) for k in settings.keys], config_file)
