"""Literal prefilters for ``user_text`` regular expressions.

Python's ``re`` has no fast path for case-insensitive or alternation patterns: a search
of ``(?i)\\b(python|rust)\\b`` over 1 KB of text costs tens of microseconds, so 200 such
rules would cost milliseconds. Most classification patterns, though, cannot match unless
one of a few literal strings occurs in the text. ``required_literals`` derives such a set
from the parsed pattern (as RE2's FilteredRE2 does, in small): a rule whose literals are
all absent from the lower-cased text is skipped without running its regex; ``str.__contains__``
costs well under a microsecond.

Sound by construction: only ASCII literals are used and the check applies only to ASCII
text, where a (case-insensitive) match implies that the lower-cased literal occurs in the
lower-cased text. Patterns the walk does not understand get no prefilter (``None``).

With many such rules, checking each rule's literals still costs about a microsecond per
rule and KB of text. ``literal_gate`` joins the literals of all rules into one regular
expression (literal alternations with shared prefixes are what ``re`` searches fastest):
when it finds none of them in a request's text, every prefiltered rule fails at once.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable
from typing import Any

__all__ = ["GATE_MIN_LITERALS", "literal_gate", "required_literals"]

GATE_MIN_LITERALS = 16
"""Below this many distinct literals, per-rule ``in`` checks are as fast as the gate."""

_parser: Any = importlib.import_module("re._parser")  # the stdlib's regex parser (no stubs)
_REPEATS = frozenset({"MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"})

Literals = frozenset[str]


def required_literals(pattern: str) -> Literals | None:
    """Lower-case strings one of which occurs in any ASCII text ``pattern`` matches, or ``None``."""
    try:
        tree = _parser.parse(pattern)
    except Exception:
        return None
    return _sequence(tree)


def literal_gate(sets: Iterable[Literals | None]) -> re.Pattern[str] | None:
    """One pattern matching any literal of ``sets`` (``None`` with too few to pay off)."""
    literals = sorted(set().union(*(s for s in sets if s)), key=lambda s: (-len(s), s))
    if len(literals) < GATE_MIN_LITERALS:
        return None
    return re.compile("|".join(re.escape(s) for s in literals))


def _score(literals: Literals) -> int:
    return min(len(s) for s in literals)


def _better(best: Literals | None, other: Literals | None) -> Literals | None:
    if not other or "" in other:
        return best
    return other if best is None or _score(other) > _score(best) else best


def _sequence(items: Any) -> Literals | None:
    """The most selective requirement among the items of one sequence (all must match)."""
    best: Literals | None = None
    run: list[str] = []
    for op, arg in items:
        name = str(op)
        if name == "LITERAL" and arg < 128:
            run.append(chr(arg).lower())
            continue
        best = _better(best, frozenset({"".join(run)}) if run else None)
        run = []
        if name == "SUBPATTERN":
            best = _better(best, _sequence(arg[-1]))
        elif name == "ATOMIC_GROUP":
            best = _better(best, _sequence(arg))
        elif name == "BRANCH":
            alternatives = [_sequence(alt) for alt in arg[1]]
            if all(alternatives):
                best = _better(best, frozenset().union(*(a for a in alternatives if a)))
        elif name in _REPEATS and arg[0] >= 1:
            best = _better(best, _sequence(arg[2]))
    return _better(best, frozenset({"".join(run)}) if run else None)
