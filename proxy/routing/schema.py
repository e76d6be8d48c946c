"""The schema of ``policies/routing.yaml``: pydantic models that reject unknown keys.

This module is the policy's contract (validated values); ``engine.py`` holds its runtime
form. Per-field checks live here so that pydantic reports them with their location (and
``proxy.yamlsrc`` turns that into file and line); checks across rules live in
``checks.py``. ``routing_schema()`` is the JSON Schema editors use
(``policies/routing.schema.json``, ``openrouter-proxy check --schema``).
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from proxy.parse import NUMERIC_PARAMETERS
from proxy.routing.patterns import as_list, glob_problem

__all__ = [
    "CAPPABLE",
    "INTEGER_CAPS",
    "VARIANTS",
    "Arm",
    "CacheSpec",
    "Match",
    "ProviderPrefs",
    "RoutingPolicy",
    "Rule",
    "TokenRange",
    "routing_schema",
]

# OpenRouter's model-id variant suffixes (openrouter-api.md §1.4).
VARIANTS = frozenset({"free", "nitro", "floor", "online", "thinking", "exacto", "extended"})
# Numeric request parameters a rule may cap. ``max_tokens`` caps ``max_completion_tokens`` too.
CAPPABLE = frozenset(
    {
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "n",
        "frequency_penalty",
        "presence_penalty",
        "repetition_penalty",
        "top_logprobs",
    }
)
INTEGER_CAPS = frozenset({"max_tokens", "top_k", "n", "top_logprobs"})
# Body fields that rule actions own; ``defaults`` may not set them.
_RESERVED = frozenset({"model", "models", "messages", "stream", "provider"})
_NAME = r"^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,63}$"
_HEADER = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]+$")

PatternList = str | list[str]

# What a cap or default of a numeric parameter may be: (integer only, lowest, highest), the
# request's own bounds (``parse``), plus the samplers it does not check.
_RANGES: dict[str, tuple[bool, float | None, float | None]] = {
    **NUMERIC_PARAMETERS,
    "top_k": (True, 0, None),
    "repetition_penalty": (False, 0, 2),
}


def _out_of_range(key: str, value: Any) -> str | None:
    """Why ``value`` cannot be ``key``'s cap or default, or ``None``."""
    integer, low, high = _RANGES.get(key, (False, None, None))
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return "must be a finite number"
    if integer and value != int(value):
        return "must be an integer"
    if (low is not None and value < low) or (high is not None and value > high):
        return f"must be between {low} and {high}" if high is not None else f"must be at least {low}"
    return None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_patterns(value: PatternList | None) -> PatternList | None:
    if value is not None:
        patterns = as_list(value)
        if not patterns:
            raise ValueError("an empty list never matches")
        for pattern in patterns:
            problem = glob_problem(pattern)
            if problem:
                raise ValueError(problem)
    return value


class TokenRange(_Strict):
    """An inclusive range of estimated prompt tokens (``proxy.tokens.estimate_prompt_tokens``)."""

    min: Annotated[int, Field(ge=0)] | None = None
    max: Annotated[int, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _ordered(self) -> TokenRange:
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is above max ({self.max}): the range is empty")
        return self


class Match(_Strict):
    """Conditions, all of which must hold (an empty match holds for every request).

    Pattern fields take one pattern or a list (any may match); patterns may be globs.
    """

    model: PatternList | None = Field(default=None, description="Requested model, or the alias target it resolves to.")
    key: PatternList | None = Field(default=None, description="Virtual key name.")
    team: PatternList | None = None
    tier: PatternList | None = None
    header: dict[str, PatternList] | None = Field(
        default=None, description="Request header (lower case) -> value pattern."
    )
    tools: bool | None = Field(default=None, description="true: the request has tools; false: it has none.")
    images: bool | None = Field(default=None, description="true: some message has an image content part.")
    response_format: bool | str | None = Field(default=None, description="Presence, or the response_format type.")
    stream: bool | None = None
    user_text: str | None = Field(default=None, description="Regular expression searched in the last user message.")
    prompt_tokens: TokenRange | None = None

    _patterns = field_validator("model", "key", "team", "tier")(_check_patterns)

    @field_validator("header")
    @classmethod
    def _headers(cls, value: dict[str, PatternList] | None) -> dict[str, PatternList] | None:
        for name, patterns in (value or {}).items():
            if not _HEADER.match(name):
                raise ValueError(f"header name {name!r} must be a lower-case HTTP token")
            _check_patterns(patterns)
        return value

    @field_validator("user_text")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except (re.error, OverflowError, RecursionError) as exc:
                raise ValueError(f"invalid regular expression: {exc}") from None
        return value


class Arm(_Strict):
    """One arm of a weighted split."""

    model: Annotated[str, Field(min_length=1)]
    weight: Annotated[float, Field(ge=0, le=1e9, allow_inf_nan=False)]


class CacheSpec(_Strict):
    """Response-cache opt-in: identical requests within ``ttl_s`` seconds get the stored answer."""

    ttl_s: Annotated[float, Field(gt=0, le=30 * 86400)]


class ProviderPrefs(_Strict):
    """OpenRouter's ``provider`` object (openrouter-api.md §1.3), sent as given."""

    order: list[str] | None = None
    allow_fallbacks: bool | None = None
    require_parameters: bool | None = None
    data_collection: Literal["allow", "deny"] | None = None
    zdr: bool | None = None
    enforce_distillable_text: bool | None = None
    only: list[str] | None = None
    ignore: list[str] | None = None
    quantizations: list[str] | None = None
    sort: str | dict[str, Any] | None = None
    preferred_min_throughput: float | dict[str, float] | None = None
    preferred_max_latency: float | dict[str, float] | None = None
    max_price: dict[str, float] | None = None


class Rule(_Strict):
    """One rule: ``match`` conditions and the actions taken when they hold."""

    name: Annotated[str, Field(pattern=_NAME)]
    match: Match = Match()
    continue_: bool = Field(default=False, alias="continue", description="Also evaluate later rules.")
    deny: Annotated[str, Field(min_length=1)] | None = Field(
        default=None, description="Refuse with 403 and this message."
    )
    model: Annotated[str, Field(min_length=1)] | None = None
    variant: PatternList | None = Field(default=None, description="OpenRouter variant(s) to append: nitro, floor, ...")
    split: list[Arm] | None = None
    sticky: Literal["user", "key"] = Field(default="user", description="Split by the request's user field or by key.")
    fallbacks: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    native_fallbacks: bool = Field(default=False, description="Also send the fallbacks as OpenRouter's models list.")
    provider: ProviderPrefs | None = None
    defaults: dict[str, Any] = Field(default_factory=dict)
    caps: dict[str, float] = Field(default_factory=dict)
    first_token_timeout_s: Annotated[float, Field(gt=0)] | None = None
    cache: CacheSpec | None = None

    @field_validator("variant")
    @classmethod
    def _variants(cls, value: PatternList | None) -> PatternList | None:
        for variant in as_list(value):
            if variant.removeprefix(":") not in VARIANTS:
                raise ValueError(f"unknown variant {variant!r}; known: {', '.join(sorted(VARIANTS))}")
        return value

    @field_validator("defaults")
    @classmethod
    def _defaults(cls, value: dict[str, Any]) -> dict[str, Any]:
        reserved = sorted(_RESERVED & value.keys())
        if reserved:
            raise ValueError(f"{', '.join(reserved)} cannot be a default (use the rule's own action)")
        for key in sorted(value.keys() & _RANGES.keys()):
            problem = _out_of_range(key, value[key])
            if problem:
                raise ValueError(f"the {key} default {problem}")
        return value

    @field_validator("caps")
    @classmethod
    def _caps(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(value.keys() - CAPPABLE)
        if unknown:
            raise ValueError(f"cannot cap {', '.join(unknown)}; cappable: {', '.join(sorted(CAPPABLE))}")
        for key in sorted(value):
            problem = _out_of_range(key, value[key])
            if problem:
                raise ValueError(f"the {key} cap {problem}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Rule:
        if self.deny is not None:
            acts = [n for n in _ACTIONS if n in self.model_fields_set and n != "deny"]
            if acts or self.continue_:
                raise ValueError(f"a deny rule takes no other action ({', '.join(acts) or 'continue'})")
        if self.model is not None and self.split is not None:
            raise ValueError("use either model or split, not both")
        if self.split is not None:
            if not self.split:
                raise ValueError("split is empty")
            if sum(arm.weight for arm in self.split) <= 0:
                raise ValueError("split weights must sum to a positive number")
        elif "sticky" in self.model_fields_set:
            raise ValueError("sticky applies only to split")
        if self.native_fallbacks and not self.fallbacks:
            raise ValueError("native_fallbacks needs fallbacks")
        return self


_ACTIONS = (
    "deny",
    "model",
    "variant",
    "split",
    "sticky",
    "fallbacks",
    "native_fallbacks",
    "provider",
    "defaults",
    "caps",
    "first_token_timeout_s",
    "cache",
)


class RoutingPolicy(_Strict):
    """The whole file: model aliases, then rules evaluated top to bottom."""

    aliases: dict[str, Annotated[str, Field(min_length=1)]] = Field(default_factory=dict)
    rules: list[Rule] = Field(default_factory=list)


def routing_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of ``routing.yaml``, for editors."""
    schema = RoutingPolicy.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "openrouter-proxy routing policy"
    return schema
