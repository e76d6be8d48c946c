"""Checks across a whole policy that a single field cannot make: each finding has a location.

What "can never match" means here, checked statically (no catalog, no network):

* a rule after an earlier rule that stops evaluation (no ``continue``) and matches
  everything the later rule matches: an unconditional rule, an identical ``match``, or a
  broader one (each condition of the earlier rule is present in the later one and at
  least as wide: patterns it holds verbatim or that match the later rule's exact names,
  equal flags and regular expressions, a prompt-token range that contains the later one);
* per field (in ``schema.py``): an empty pattern list, an empty or whitespace pattern, an
  unclosed ``[`` in a glob, an invalid regular expression, an empty token range.

Whether a model id exists at OpenRouter is not checked: the catalog changes without a
policy edit, and a policy must load offline. Also found here: duplicate rule names
(names label usage records) and alias cycles.
"""

from __future__ import annotations

from proxy.routing.patterns import Patterns, as_list
from proxy.routing.schema import Match, RoutingPolicy

__all__ = ["Finding", "check_policy", "resolve_aliases"]

Loc = tuple[str | int, ...]
Finding = tuple[Loc, str]


def resolve_aliases(aliases: dict[str, str]) -> tuple[dict[str, str], list[Finding]]:
    """(alias -> final target with chains followed, cycle findings)."""
    resolved: dict[str, str] = {}
    findings: list[Finding] = []
    reported: set[str] = set()
    for alias in aliases:
        seen = [alias]
        target = aliases[alias]
        while target in aliases:
            if target in seen:
                if not reported & set(seen):
                    findings.append((("aliases", alias), f"aliases: alias cycle {' -> '.join([*seen, target])}"))
                reported.update(seen)
                break
            seen.append(target)
            target = aliases[target]
        resolved[alias] = target
    return resolved, findings


def check_policy(policy: RoutingPolicy) -> list[Finding]:
    """Every cross-rule problem of ``policy`` (an empty list when it is sound)."""
    _, findings = resolve_aliases(policy.aliases)
    names: dict[str, int] = {}
    stoppers: list[tuple[int, Match]] = []
    for i, rule in enumerate(policy.rules):
        loc: Loc = ("rules", i)
        if rule.name in names:
            message = f"rules: duplicate rule name {rule.name!r} (also rule #{names[rule.name]})"
            findings.append(((*loc, "name"), message))
        names.setdefault(rule.name, i)
        for j, earlier in stoppers:
            if _covers(earlier, rule.match):
                other = policy.rules[j].name
                findings.append(
                    (loc, f"rules: rule {rule.name!r} can never match: rule {other!r} above matches all it does")
                )
                break
        if not rule.continue_:
            stoppers.append((i, rule.match))
    return findings


def _covers(wide: Match, narrow: Match) -> bool:
    """True when every request ``narrow`` matches is also matched by ``wide``."""
    for name in ("model", "key", "team", "tier"):
        mine = getattr(wide, name)
        if mine is None:
            continue
        theirs = getattr(narrow, name)
        if theirs is None or not Patterns.compile(as_list(mine)).covers(Patterns.compile(as_list(theirs))):
            return False
    for header, patterns in (wide.header or {}).items():
        theirs = (narrow.header or {}).get(header)
        if theirs is None or not Patterns.compile(as_list(patterns)).covers(Patterns.compile(as_list(theirs))):
            return False
    for name in ("tools", "images", "response_format", "stream", "user_text"):
        mine = getattr(wide, name)
        if mine is not None and getattr(narrow, name) != mine:
            return False
    if wide.prompt_tokens is not None:
        theirs_range = narrow.prompt_tokens
        if theirs_range is None:
            return False
        low, high = wide.prompt_tokens.min or 0, wide.prompt_tokens.max
        if (theirs_range.min or 0) < low:
            return False
        if high is not None and (theirs_range.max is None or theirs_range.max > high):
            return False
    return True
