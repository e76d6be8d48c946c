"""The runtime form of a routing policy: compiled once per load, then ``plan()`` per request.

Decision for one request:

1. The requested model's alias target is looked up (chains already resolved).
2. Rules are evaluated top to bottom; the first that matches wins, and a rule with
   ``continue: true`` lets later rules match too (``actions.Draft`` merges them). A rule's
   ``model`` condition matches the requested model or its alias target. Conditions read
   the request as the client sent it, never what earlier rules changed. A matching
   ``deny`` rule raises ``PermissionDenied`` (403) with its message and the rule's name.
   A ``model`` condition tries each name in its forms (``matching.model_forms``: without
   ``~``; for deny rules also without variant suffixes), and every alias of a chain.
3a. A model the rules chose (not the alias target) must pass the deny rules as if it had
   been requested (403 otherwise), and the rules' fallbacks that would be denied are dropped.
3. The upstream model is the first rule's model or split arm, else the alias target, else
   the requested model; variants are appended.
4. The client's own ``models`` fallback list (OpenRouter's, §1.2) is never sent upstream as
   it came: that would let a caller reach models the policy denies and spend past budget
   holds priced on the routed model. Its entries (aliases resolved) become the proxy's own
   fallbacks after the rule's chain, each kept only if the policy would not deny a request
   for it; so limits, budgets, breakers and the record cover them. A rule that sends its
   own native list (``native_fallbacks``) replaces the client's.

Speed: the rules that can match a given requested model and caller (their model, key,
team and tier conditions hold) are worked out once per (model, key name, team, tier) and
memoised (at most ``MEMO_LIMIT`` entries, then the memo starts over), so rules for other
models or callers cost nothing; only the per-request conditions (stream, tools, headers,
images, token range, text) run per request. When the policy's literal gate
(``prefilter``) finds none of the ``user_text`` literals in a request, the rules that
need one are skipped together. Requests that no rule or alias touches get a shared
``RoutePlan``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.errors import PermissionDenied
from proxy.routing.actions import Actions, Draft, with_variants
from proxy.routing.checks import resolve_aliases
from proxy.routing.matching import Check, RequestView, Static, compile_match
from proxy.routing.prefilter import literal_gate, required_literals
from proxy.routing.schema import RoutingPolicy
from proxy.types import ChatCall, Principal, RoutePlan

__all__ = ["MEMO_LIMIT", "CompiledPolicy", "policy_hash"]

MEMO_LIMIT = 16384


def policy_hash(policy: RoutingPolicy) -> str:
    """12 hex characters of the SHA-256 of the policy's canonical JSON (comments and layout
    of the file do not change it)."""
    canonical = orjson.dumps(policy.model_dump(mode="json", by_alias=True), option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class _Rule:
    static: Static
    checks: tuple[Check, ...]
    actions: Actions
    stop: bool
    needs_literal: bool
    """Its ``user_text`` regex has a literal prefilter (it cannot match without a literal)."""


@dataclass(frozen=True, slots=True)
class _ModelEntry:
    """What is known about one (requested model, caller) before looking at the request."""

    target: str | None
    candidates: tuple[_Rule, ...]
    without_text: tuple[_Rule, ...] | None
    """The candidates minus the rules that need a literal (``None``: no such rule), used
    when the policy's literal gate finds none in the text."""
    plain: RoutePlan | None
    """The shared plan when no rule matches and the client's ``models`` needs no alias."""
    deny_walk: tuple[_Rule, ...]
    """What deciding a deny for this model must look at: the candidates up to the last deny
    rule, without those that neither deny nor stop (empty: nothing can deny it)."""


class CompiledPolicy:
    """A validated ``RoutingPolicy`` compiled for fast decisions. Immutable but for its memo."""

    def __init__(self, policy: RoutingPolicy) -> None:
        self.policy = policy
        self.aliases, _ = resolve_aliases(policy.aliases)
        self.policy_hash = policy_hash(policy)
        rules, literals = [], []
        for rule in policy.rules:
            static, checks = compile_match(rule.match)
            needed = required_literals(rule.match.user_text) if rule.match.user_text is not None else None
            literals.append(needed)
            actions = Actions.build(rule, self.aliases)
            rules.append(_Rule(static, checks, actions, not rule.continue_, needed is not None))
        self.rules: tuple[_Rule, ...] = tuple(rules)
        self._gate = literal_gate(literals)
        self._memo: dict[tuple[str, str, str | None, str | None], _ModelEntry] = {}

    def plan(self, call: ChatCall, principal: Principal, headers: Sequence[tuple[bytes, bytes]] = ()) -> RoutePlan:
        """Decide where ``call`` goes (see the module docstring).

        ``headers`` are the request's ASGI headers, read only by ``header`` conditions.
        Raises ``PermissionDenied`` when a ``deny`` rule matches.
        """
        key = (call.model, principal.name, principal.team, principal.tier)
        entry = self._memo.get(key) or self._remember(key, principal)
        client_models = call.body.get("models")
        draft: Draft | None = None
        candidates = entry.candidates
        view: RequestView | None = None
        if candidates or client_models:
            view = RequestView(call, principal, headers, self._gate)
        if candidates:
            assert view is not None
            if entry.without_text is not None and view.lowered_ascii == "":
                candidates = entry.without_text
            for rule in candidates:
                for check in rule.checks:
                    if not check(view):
                        break
                else:
                    if rule.actions.deny is not None:
                        raise PermissionDenied(f"{rule.actions.deny} (routing rule '{rule.actions.name}')")
                    if draft is None:
                        draft = Draft()
                    draft.add(rule.actions, call, principal)
                    if rule.stop:
                        break
        if draft is None and entry.plain is not None and not client_models:
            return entry.plain
        if draft is not None and (draft.model is not None or draft.variants or draft.fallbacks):
            if view is None:
                view = RequestView(call, principal, headers, self._gate)
            self._enforce(draft, entry, call, principal, view)
        extra: tuple[str, ...] = ()
        if client_models and view is not None and not (draft is not None and draft.native):
            extra = self._client_fallbacks(client_models, principal, view)
        return self._build(call, entry, draft, extra, bool(client_models))

    def _client_fallbacks(self, models: Any, principal: Principal, view: RequestView) -> tuple[str, ...]:
        """The client's ``models`` entries the policy allows, aliases resolved, in order."""
        if not isinstance(models, list):
            return ()
        allowed: list[str] = []
        for name in models:
            if not isinstance(name, str) or not name:
                continue
            model = self.aliases.get(name, name)
            if model not in allowed and self._permits(name, principal, view):  # the alias chain too
                allowed.append(model)
        return tuple(allowed)

    def _permits(self, model: str, principal: Principal, view: RequestView) -> bool:
        """Would a request for ``model`` pass the policy's deny rules (same caller, same body)?"""
        return self._denial(model, principal, view) is None

    def _denial(self, model: str, principal: Principal, view: RequestView) -> str | None:
        """The 403 message if the policy denies a request for ``model`` (same caller, same
        body), else ``None``."""
        key = (model, principal.name, principal.team, principal.tier)
        entry = self._memo.get(key) or self._remember(key, principal)
        for rule in entry.deny_walk:
            for check in rule.checks:
                if not check(view):
                    break
            else:
                if rule.actions.deny is not None:
                    return f"{rule.actions.deny} (routing rule '{rule.actions.name}')"
                return None  # a rule that stops matched first
        return None

    def _enforce(
        self, draft: Draft, entry: _ModelEntry, call: ChatCall, principal: Principal, view: RequestView
    ) -> None:
        """A model the rules chose (a rule's model or split arm, variants added) passes the
        deny rules too, as if requested (else ``PermissionDenied``); the rules' fallbacks the
        policy denies are dropped. Conditions read the request as sent, so a deny on
        ``anthropic/*`` would otherwise miss a split arm or a rule that picks Anthropic."""
        requested = entry.target or call.model
        chosen = draft.model or requested
        if draft.variants:
            chosen = with_variants(chosen, draft.variants)
        if chosen != requested:
            denied = self._denial(chosen, principal, view)
            if denied is not None:
                raise PermissionDenied(denied)
        if draft.fallbacks:
            draft.fallbacks = tuple(m for m in draft.fallbacks if self._permits(m, principal, view))

    def _build(
        self, call: ChatCall, entry: _ModelEntry, draft: Draft | None, extra: tuple[str, ...], drop_models: bool
    ) -> RoutePlan:
        model = (draft.model if draft else None) or entry.target or call.model
        if draft is not None and draft.variants:
            model = with_variants(model, draft.variants)
        changes: dict[str, Any] = {}
        if model != call.model:
            changes["model"] = model
        fallbacks = tuple(m for m in draft.fallbacks if m != model) if draft is not None else ()
        if draft is not None and draft.native:
            changes["models"] = [model, *fallbacks]
        else:
            fallbacks = (*fallbacks, *(m for m in extra if m != model and m not in fallbacks))
        if draft is not None:
            draft.parameters(call.body, changes)
            rule: str | None = "+".join(draft.names)
        elif entry.target is not None:
            rule = f"alias:{call.model}"
        else:
            rule = "client:models"
        body = request = None
        if changes or fallbacks or drop_models:
            request = {**call.body, **changes}
            if drop_models and "models" not in changes:
                del request["models"]
            body = orjson.dumps(request)
        return RoutePlan(
            model=model,
            rule=rule,
            body=body,
            request=request,
            fallbacks=fallbacks,
            first_token_timeout_s=draft.ttft_s if draft is not None else None,
            cache_ttl_s=draft.cache_ttl_s if draft is not None else None,
            policy_hash=self.policy_hash,
        )

    def _alias_chain(self, model: str) -> tuple[str, ...]:
        """``model``, then every alias it goes through, its final target last."""
        chain = [model]
        raw = self.policy.aliases
        while chain[-1] in raw and raw[chain[-1]] not in chain:
            chain.append(raw[chain[-1]])
        return tuple(chain)

    def _remember(self, key: tuple[str, str, str | None, str | None], principal: Principal) -> _ModelEntry:
        model = key[0]
        target = self.aliases.get(model)
        names = self._alias_chain(model)
        candidates = tuple(
            rule for rule in self.rules if rule.static.admits(names, principal, bases=rule.actions.deny is not None)
        )
        without_text = tuple(rule for rule in candidates if not rule.needs_literal)
        plain = RoutePlan(model=model, policy_hash=self.policy_hash) if target is None else None
        gated = self._gate is not None and len(without_text) < len(candidates)
        last_deny = max((i for i, rule in enumerate(candidates) if rule.actions.deny is not None), default=-1)
        deny_walk = tuple(rule for rule in candidates[: last_deny + 1] if rule.actions.deny is not None or rule.stop)
        entry = _ModelEntry(target, candidates, without_text if gated else None, plain, deny_walk)
        if len(self._memo) >= MEMO_LIMIT:
            self._memo.clear()
        self._memo[key] = entry
        return entry
