"""Compiled rule actions, and the draft that collects the actions of every matched rule.

With ``continue: true`` several rules can match one request. The first match wins, and
later rules only add what earlier ones left open: the model (set or split) and the
fallback chain come from the first rule that has one; ``provider`` keys and
``defaults`` from the earliest rule that names them; variants accumulate; for ``caps``
the strictest (lowest) value wins; ``first_token_timeout_s`` and ``cache`` come from the
first rule that sets them.

A weighted split is sticky: the arm is chosen by hashing the request's ``user`` field
(``sticky: user``, the default; requests without one use the key) or the virtual key's
id (``sticky: key``) with the rule name as salt, so one user always sees one arm of a
given split, and different splits are independent.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from dataclasses import dataclass
from typing import Any, TypeGuard

from proxy.routing.patterns import as_list
from proxy.routing.schema import INTEGER_CAPS, Rule
from proxy.types import ChatCall, Principal

__all__ = ["Actions", "Draft", "Split", "sticky_point", "with_variants"]

_SCALE = float(1 << 64)
_OUTPUT_LIMITS = ("max_tokens", "max_completion_tokens")


def sticky_point(salt: bytes, ident: str) -> float:
    """A uniform, stable point in [0, 1) for ``ident`` (BLAKE2b, the same in every process)."""
    digest = hashlib.blake2b(salt + ident.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _SCALE


@dataclass(frozen=True, slots=True)
class Split:
    """Models with cumulative weight bounds in (0, 1]; the last bound is exactly 1."""

    models: tuple[str, ...]
    bounds: tuple[float, ...]
    by_user: bool
    salt: bytes

    @classmethod
    def build(cls, arms: list[tuple[str, float]], *, by_user: bool, salt: str) -> Split:
        total = sum(weight for _, weight in arms)
        bounds, running = [], 0.0
        for _, weight in arms:
            running += weight
            bounds.append(running / total)
        bounds[-1] = 1.0
        return cls(tuple(m for m, _ in arms), tuple(bounds), by_user, salt.encode() + b"\x1f")

    def choose(self, call: ChatCall, principal: Principal) -> str:
        """The arm for this caller (see the module docstring)."""
        ident = principal.key_id
        if self.by_user:
            user = call.body.get("user")
            if isinstance(user, str) and user:
                ident = "u:" + user
        index = bisect_right(self.bounds, sticky_point(self.salt, ident))
        return self.models[min(index, len(self.models) - 1)]


@dataclass(frozen=True, slots=True)
class Actions:
    """What one rule does. Model names are already alias-resolved."""

    name: str
    deny: str | None
    model: str | None
    split: Split | None
    variants: tuple[str, ...]
    fallbacks: tuple[str, ...]
    native_fallbacks: bool
    provider: dict[str, Any] | None
    defaults: dict[str, Any]
    caps: dict[str, int | float]
    first_token_timeout_s: float | None
    cache_ttl_s: float | None

    @classmethod
    def build(cls, rule: Rule, aliases: dict[str, str]) -> Actions:
        split = None
        if rule.split is not None:
            arms = [(aliases.get(a.model, a.model), a.weight) for a in rule.split]
            split = Split.build(arms, by_user=rule.sticky == "user", salt=rule.name)
        return cls(
            name=rule.name,
            deny=rule.deny,
            model=aliases.get(rule.model, rule.model) if rule.model else None,
            split=split,
            variants=tuple(v.removeprefix(":") for v in as_list(rule.variant)),
            fallbacks=tuple(dict.fromkeys(aliases.get(m, m) for m in rule.fallbacks)),  # each once
            native_fallbacks=rule.native_fallbacks,
            provider=rule.provider.model_dump(exclude_none=True) if rule.provider else None,
            defaults=dict(rule.defaults),
            caps={k: int(v) if k in INTEGER_CAPS else v for k, v in rule.caps.items()},
            first_token_timeout_s=rule.first_token_timeout_s,
            cache_ttl_s=rule.cache.ttl_s if rule.cache else None,
        )


def with_variants(model: str, variants: list[str]) -> str:
    """``model`` with each variant suffix appended unless it is already there."""
    present = model.split(":")[1:]
    return model + "".join(f":{v}" for v in variants if v not in present)


class Draft:
    """The merged actions of the rules matched so far (see the module docstring)."""

    __slots__ = (
        "cache_ttl_s",
        "caps",
        "defaults",
        "fallbacks",
        "model",
        "names",
        "native",
        "provider",
        "ttft_s",
        "variants",
    )

    def __init__(self) -> None:
        self.names: list[str] = []
        self.model: str | None = None
        self.variants: list[str] = []
        self.fallbacks: tuple[str, ...] = ()
        self.native = False
        self.provider: dict[str, Any] = {}
        self.defaults: dict[str, Any] = {}
        self.caps: dict[str, int | float] = {}
        self.ttft_s: float | None = None
        self.cache_ttl_s: float | None = None

    def add(self, actions: Actions, call: ChatCall, principal: Principal) -> None:
        self.names.append(actions.name)
        if self.model is None:
            if actions.model is not None:
                self.model = actions.model
            elif actions.split is not None:
                self.model = actions.split.choose(call, principal)
        self.variants.extend(v for v in actions.variants if v not in self.variants)
        if not self.fallbacks and actions.fallbacks:
            self.fallbacks, self.native = actions.fallbacks, actions.native_fallbacks
        if actions.provider:
            for key, value in actions.provider.items():
                self.provider.setdefault(key, value)
        for key, value in actions.defaults.items():
            self.defaults.setdefault(key, value)
        for key, cap in actions.caps.items():
            self.caps[key] = min(cap, self.caps.get(key, cap))
        if self.ttft_s is None:
            self.ttft_s = actions.first_token_timeout_s
        if self.cache_ttl_s is None:
            self.cache_ttl_s = actions.cache_ttl_s

    def parameters(self, body: dict[str, Any], changes: dict[str, Any]) -> None:
        """Add to ``changes`` the ``provider``, defaults and caps this draft makes to ``body``.

        ``provider``: the client's object with the policy's keys on top (policy wins).
        Defaults: set where the client sent nothing (for ``max_tokens`` or
        ``max_completion_tokens``, neither of the two output limits). Caps: a larger value is lowered; a
        ``max_tokens`` cap lowers both output limits and is set when the client sent none.
        """
        if self.provider:
            sent = body.get("provider")
            merged = {**sent, **self.provider} if isinstance(sent, dict) else dict(self.provider)
            if merged != sent:
                changes["provider"] = merged
        for key, value in self.defaults.items():
            keys = _OUTPUT_LIMITS if key in _OUTPUT_LIMITS else (key,)
            if all(body.get(k) is None for k in keys):
                changes[key] = value
        for key, cap in self.caps.items():
            if key == "max_tokens":
                limits = [k for k in _OUTPUT_LIMITS if changes.get(k, body.get(k)) is not None]
                for k in limits or ["max_tokens"]:
                    value = changes.get(k, body.get(k))
                    if value is None or (_is_number(value) and value > cap):
                        changes[k] = cap
                continue
            value = changes.get(key, body.get(key))
            if _is_number(value) and value > cap:
                changes[key] = cap


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)
