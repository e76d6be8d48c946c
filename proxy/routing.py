"""Routing: turn the requested model into the model sent to OpenRouter.

Compiled once from ``policies/routing.yaml``; ``Router.plan`` then costs a dict lookup.
Today the policy holds model aliases (``gpt-4o: openai/gpt-4o``); aliases apply to
``model`` and to each entry of OpenRouter's ``models`` fallback list (§1.2 of
openrouter-api.md). The rule engine plugs in here: it returns the same ``RoutePlan``.

Policy file shape::

    aliases:            # alias -> OpenRouter model id (or another alias)
      gpt-4o: openai/gpt-4o
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from proxy.types import ChatCall, Principal, RoutePlan
from proxy.yamlsrc import ConfigError, Problem, load_yaml, problems_from_validation

__all__ = ["Router", "RoutingPolicy", "load_router"]

ROUTING_FILE = "routing.yaml"


class RoutingPolicy(BaseModel):
    """The schema of ``policies/routing.yaml``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    aliases: dict[str, str] = Field(default_factory=dict)


class Router:
    """Compiled routing policy. Build with ``load_router`` or from a ``RoutingPolicy``."""

    def __init__(self, policy: RoutingPolicy) -> None:
        self.policy = policy
        self.aliases = _resolve_aliases(policy.aliases)

    def plan(self, call: ChatCall, principal: Principal) -> RoutePlan:
        """Decide the upstream model for ``call``.

        Returns a ``RoutePlan`` whose ``body`` is ``None`` when nothing changed (the
        client's bytes go upstream untouched) and the re-serialised body otherwise.
        """
        aliases = self.aliases
        target = aliases.get(call.model)
        fallbacks = call.body.get("models")
        new_fallbacks = None
        if fallbacks and any(m in aliases for m in fallbacks):
            new_fallbacks = [aliases.get(m, m) for m in fallbacks]
        if target is None and new_fallbacks is None:
            return RoutePlan(model=call.model)
        body: dict[str, Any] = dict(call.body)
        if target is not None:
            body["model"] = target
        if new_fallbacks is not None:
            body["models"] = new_fallbacks
        rule = f"alias:{call.model}" if target is not None else "alias:models"
        return RoutePlan(model=target or call.model, rule=rule, body=orjson.dumps(body))

    def model_aliases(self) -> dict[str, str]:
        """Alias -> final OpenRouter model id (chains resolved)."""
        return dict(self.aliases)


def _resolve_aliases(aliases: dict[str, str]) -> dict[str, str]:
    resolved = {}
    for alias in aliases:
        seen = [alias]
        target = aliases[alias]
        while target in aliases:
            if target in seen:
                raise ValueError(" -> ".join([*seen, target]))
            seen.append(target)
            target = aliases[target]
        resolved[alias] = target
    return resolved


def load_router(policies_dir: Path) -> Router:
    """Load and compile ``policies_dir/routing.yaml`` (absent file: no routing).

    Raises ``ConfigError`` with each problem's file and line: unknown keys, wrong types,
    alias cycles.
    """
    path = policies_dir / ROUTING_FILE
    if not path.exists():
        return Router(RoutingPolicy())
    data, source = load_yaml(path)
    if data is None or data == {}:
        return Router(RoutingPolicy())
    if not isinstance(data, dict):
        raise ConfigError([Problem(source.file, 1, "the file must hold a mapping")])
    try:
        policy = RoutingPolicy.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(problems_from_validation(exc, source)) from None
    try:
        return Router(policy)
    except ValueError as exc:
        first = str(exc).split(" -> ")[0]
        line = source.line_of(("aliases", first))
        raise ConfigError([Problem(source.file, line, f"aliases: alias cycle {exc}")]) from None
