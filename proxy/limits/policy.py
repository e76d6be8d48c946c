"""The limits policy: ``policies/limits.yaml`` validated, then compiled to ``Rule`` lists.

File shape (every limit is optional; a tier without any limits admits everything)::

    default_tier: standard        # keys without ``tier:`` (omit: such keys are unlimited)
    default_team_tier: null       # teams not listed under ``teams``
    teams:                        # team -> tier: limits shared by all keys of the team
      research: team-standard
    tiers:
      standard:
        requests_per_second: 5    # also _per_minute, _per_hour, _per_day
        tokens_per_minute: 200000 # also _per_day (prompt + completion tokens)
        concurrent_requests: 10   # requests in flight
        budget_usd_per_day: 20    # also _per_month, _total (UTC calendar periods)
        models:                   # per (key or team, model); model ids as sent upstream
          anthropic/claude-sonnet-4.5: {requests_per_minute: 20}

A key's tier limits apply to the key alone; a team's tier limits to all keys of the team
together. Budgets are kept in integer nano-USD (1e-9 USD), so sums are exact; one budget is
at most ``MAX_BUDGET_USD`` (1,000,000 USD) so Redis's Lua numbers (doubles) stay exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from proxy.yamlsrc import ConfigError, Problem, Source, load_yaml, problems_from_validation

__all__ = [
    "DAY",
    "HOUR",
    "MAX_BUDGET_USD",
    "MINUTE",
    "SECOND",
    "Bound",
    "KeyBudgets",
    "LimitsFile",
    "LimitsPolicy",
    "Metric",
    "Period",
    "PositiveUSD",
    "Rule",
    "Window",
    "check_key_tiers",
    "load_limits_policy",
]

Metric = Literal["requests", "tokens", "concurrent", "budget"]
Period = Literal["day", "month", "total"]
NANO = 1_000_000_000


@dataclass(frozen=True, slots=True)
class Window:
    """A sliding window of ``ms`` milliseconds counted in ``buckets`` equal sub-buckets."""

    name: str
    ms: int
    buckets: int

    @property
    def bucket_ms(self) -> int:
        return self.ms // self.buckets


SECOND = Window("second", 1_000, 10)
MINUTE = Window("minute", 60_000, 60)
HOUR = Window("hour", 3_600_000, 60)
DAY = Window("day", 86_400_000, 96)


@dataclass(frozen=True, slots=True)
class Rule:
    """One limit of a tier. ``limit``: requests, tokens, requests in flight or nano-USD."""

    name: str
    metric: Metric
    limit: int
    window: Window | None = None
    period: Period | None = None
    model: str | None = None


@dataclass(frozen=True, slots=True)
class Bound:
    """A rule bound to a subject: its storage key and who it limits (``key 'alice'``)."""

    rule: Rule
    key: str
    scope: str
    subject: str

    @property
    def who(self) -> str:
        where = f"{self.scope} {self.subject!r}"
        return f"{where} on model {self.rule.model}" if self.rule.model else where


@dataclass(frozen=True, slots=True)
class KeyBudgets:
    """Per-key USD budgets that replace the tier's (runtime keys; ``None`` = the tier's)."""

    usd_per_day: float | None = None
    usd_per_month: float | None = None
    usd_total: float | None = None


_WINDOWS: dict[str, tuple[Metric, Window]] = {
    "requests_per_second": ("requests", SECOND),
    "requests_per_minute": ("requests", MINUTE),
    "requests_per_hour": ("requests", HOUR),
    "requests_per_day": ("requests", DAY),
    "tokens_per_minute": ("tokens", MINUTE),
    "tokens_per_day": ("tokens", DAY),
}
_BUDGETS: dict[str, Period] = {
    "budget_usd_per_day": "day",
    "budget_usd_per_month": "month",
    "budget_usd_total": "total",
}

# Redis keeps counters as Lua doubles, exact to 2**53 (~9.0e15 tokens, ~9.0e6 USD in nano-USD):
# limits and budgets stay well below
PositiveInt = Annotated[int, Field(ge=1, le=10**15)]
MAX_BUDGET_USD = 1_000_000
MIN_BUDGET_USD = 0.000001  # one micro-dollar: budgets count nano-USD, a smaller one would be 0
PositiveUSD = Annotated[float, Field(ge=MIN_BUDGET_USD, le=MAX_BUDGET_USD, allow_inf_nan=False)]


class ModelLimits(BaseModel):
    """Window and concurrency limits (for a tier, or for one model within a tier)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests_per_second: PositiveInt | None = None
    requests_per_minute: PositiveInt | None = None
    requests_per_hour: PositiveInt | None = None
    requests_per_day: PositiveInt | None = None
    tokens_per_minute: PositiveInt | None = None
    tokens_per_day: PositiveInt | None = None
    concurrent_requests: PositiveInt | None = None


class TierSpec(ModelLimits):
    """A named tier: limits, USD budgets and per-model limits."""

    budget_usd_per_day: PositiveUSD | None = None
    budget_usd_per_month: PositiveUSD | None = None
    budget_usd_total: PositiveUSD | None = None
    models: dict[str, ModelLimits] = Field(default_factory=dict)


class LimitsFile(BaseModel):
    """The schema of ``policies/limits.yaml``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    default_tier: str | None = None
    default_team_tier: str | None = None
    teams: dict[str, str] = Field(default_factory=dict)
    tiers: dict[str, TierSpec] = Field(default_factory=dict)


def _window_rules(limits: ModelLimits, model: str | None) -> list[Rule]:
    rules = [
        Rule(name, metric, value, window=window, model=model)
        for name, (metric, window) in _WINDOWS.items()
        if (value := getattr(limits, name)) is not None
    ]
    if limits.concurrent_requests is not None:
        rules.append(Rule("concurrent_requests", "concurrent", limits.concurrent_requests, model=model))
    return rules


def _budget_rules(spec: TierSpec, budgets: KeyBudgets | None) -> list[Rule]:
    values = {name: getattr(spec, name) for name in _BUDGETS}
    if budgets is not None:
        for name, override in zip(
            _BUDGETS, (budgets.usd_per_day, budgets.usd_per_month, budgets.usd_total), strict=True
        ):
            if override is not None:
                values[name] = override
    return [Rule(name, "budget", round(usd * NANO), period=_BUDGETS[name]) for name, usd in values.items() if usd]


@dataclass(frozen=True, slots=True)
class _Tier:
    spec: TierSpec
    rules: tuple[Rule, ...]
    model_rules: dict[str, tuple[Rule, ...]]


class LimitsPolicy:
    """The compiled policy. ``key_rules``/``team_rules`` give a request's rules (cheap)."""

    def __init__(self, spec: LimitsFile | None = None) -> None:
        self.spec = spec = spec or LimitsFile()
        self._tiers = {
            name: _Tier(
                tier,
                tuple([*_window_rules(tier, None), *_budget_rules(tier, None)]),
                {model: tuple(_window_rules(limits, model)) for model, limits in tier.models.items()},
            )
            for name, tier in spec.tiers.items()
        }

    @property
    def tiers(self) -> list[str]:
        return sorted(self._tiers)

    def has_tier(self, name: str) -> bool:
        return name in self._tiers

    def key_tier(self, tier: str | None) -> str | None:
        """The tier that applies to a key with ``tier`` (the default tier for ``None``)."""
        name = tier or self.spec.default_tier
        return name if name in self._tiers else None

    def team_tier(self, team: str | None) -> str | None:
        if team is None:
            return None
        name = self.spec.teams.get(team, self.spec.default_team_tier)
        return name if name in self._tiers else None

    def rules(self, tier: str | None, model: str | None, budgets: KeyBudgets | None = None) -> tuple[Rule, ...]:
        """Rules of ``tier`` for a request to ``model`` (``None``: every model's rules). A model
        with a variant suffix (openrouter-api.md §1.4) gets its base model's per-model rules
        unless the tier names the variant itself."""
        if tier is None:
            return ()
        compiled = self._tiers[tier]
        base = compiled.rules
        if budgets is not None:
            base = (*(r for r in base if r.metric != "budget"), *_budget_rules(compiled.spec, budgets))
        if model is None:
            return tuple([*base, *(r for rules in compiled.model_rules.values() for r in rules)])
        return (*base, *self.model_rules(tier, model))

    def model_rules(self, tier: str | None, model: str) -> tuple[Rule, ...]:
        """Only the per-model rules of ``tier`` for ``model`` (a variant gets its base model's
        unless the tier names the variant itself)."""
        if tier is None:
            return ()
        rules = self._tiers[tier].model_rules
        found = rules.get(model)
        if found is None and ":" in model:  # a variant (``:floor``, ``:nitro``...) of a limited model
            found = rules.get(model.split(":", 1)[0])
        return found or ()


def load_limits_policy(path: Path) -> LimitsPolicy:
    """Load and compile the limits policy at ``path`` (absent file: no limits).

    Raises ``ConfigError`` listing every problem with file and line: unknown keys, wrong
    types, references to tiers that do not exist.
    """
    if not path.exists():
        return LimitsPolicy(LimitsFile())
    data, source = load_yaml(path)
    if data is None or data == {}:
        return LimitsPolicy(LimitsFile())
    if not isinstance(data, dict):
        raise ConfigError([Problem(source.file, 1, "the file must hold a mapping")])
    try:
        spec = LimitsFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(problems_from_validation(exc, source)) from None
    problems = _unknown_tiers(spec, source)
    if problems:
        raise ConfigError(problems)
    return LimitsPolicy(spec)


def _unknown_tiers(spec: LimitsFile, source: Source) -> list[Problem]:
    refs: list[tuple[tuple[str, ...], str]] = [(("teams", team), tier) for team, tier in spec.teams.items()]
    for name in ("default_tier", "default_team_tier"):
        value = getattr(spec, name)
        if value is not None:
            refs.append(((name,), value))
    known = ", ".join(sorted(spec.tiers)) or "none defined"
    return [
        Problem(source.file, source.line_of(loc), f"{'.'.join(loc)}: unknown tier {tier!r} (tiers: {known})")
        for loc, tier in refs
        if tier not in spec.tiers
    ]


def check_key_tiers(
    policy: LimitsPolicy, tiers: list[tuple[str, str | None]], config_file: str | None = None
) -> list[Problem]:
    """Problems for config keys (``(name, tier)``) whose tier the policy does not define
    (with lines when ``config_file`` is given)."""
    config_source: Source | None = None if config_file else Source("config")
    problems = []
    for i, (name, tier) in enumerate(tiers):
        if tier is not None and not policy.has_tier(tier):
            if config_source is None:
                assert config_file is not None
                try:
                    config_source = load_yaml(Path(config_file))[1]
                except ConfigError:
                    config_source = Source(config_file)
            line = config_source.line_of(("keys", i, "tier"))
            known = ", ".join(policy.tiers) or "none defined"
            problems.append(
                Problem(config_source.file, line, f"keys.{i}: key {name!r} has unknown tier {tier!r} (tiers: {known})")
            )
    return problems
