"""Name patterns: exact strings and shell-style globs, compiled once into one matcher.

A pattern containing ``*``, ``?`` or ``[`` is a glob with ``fnmatch`` semantics, case
sensitive (``openai/*``, ``*-mini``, ``anthropic/claude-[hs]*``); any other string matches
itself only. A list of patterns matches when any of them does. ``Patterns`` keeps the exact
strings in a frozenset and joins the globs into one regular expression, so a match costs a
set lookup and at most one ``re.match``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Patterns", "as_list", "glob_problem", "is_glob"]

_GLOB_CHARS = frozenset("*?[")


def is_glob(pattern: str) -> bool:
    """True when ``pattern`` has a glob metacharacter (``*``, ``?``, ``[``)."""
    return not _GLOB_CHARS.isdisjoint(pattern)


def glob_problem(pattern: str) -> str | None:
    """Why ``pattern`` can never match anything, or ``None`` when it is fine.

    Checked statically: the empty pattern (names are never empty), leading or trailing
    whitespace (names never have it), and an unclosed ``[`` set (fnmatch would silently
    take it as a literal ``[``, which is almost certainly not what was meant).
    """
    if not pattern:
        return "an empty pattern never matches"
    if pattern != pattern.strip():
        return f"pattern {pattern!r} has leading or trailing whitespace and never matches"
    i = pattern.find("[")
    while i != -1:
        j = i + 1
        if pattern[j : j + 1] == "!":
            j += 1
        if pattern[j : j + 1] == "]":
            j += 1
        close = pattern.find("]", j)
        if close == -1:
            return f"glob {pattern!r} has an unclosed '['"
        i = pattern.find("[", close + 1)
    return None


def as_list(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """A pattern field as a tuple: ``None`` -> ``()``, ``"x"`` -> ``("x",)``."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


@dataclass(frozen=True, slots=True)
class Patterns:
    """Compiled patterns; call with a name (``None`` never matches)."""

    source: tuple[str, ...]
    exact: frozenset[str]
    regex: re.Pattern[str] | None

    @classmethod
    def compile(cls, patterns: Iterable[str]) -> Patterns:
        source = tuple(patterns)
        globs = [p for p in source if is_glob(p)]
        regex = re.compile("|".join(fnmatch.translate(p) for p in globs)) if globs else None
        return cls(source, frozenset(p for p in source if not is_glob(p)), regex)

    def __call__(self, name: str | None) -> bool:
        if name is None:
            return False
        if name in self.exact:
            return True
        return self.regex is not None and self.regex.match(name) is not None

    def covers(self, other: Patterns) -> bool:
        """True when every name ``other`` matches is also matched here (checked conservatively).

        Each pattern of ``other`` must be one of ours literally, or an exact name we match;
        a glob of ``other`` that we do not hold verbatim counts as not covered.
        """
        return all(p in self.source or (not is_glob(p) and self(p)) for p in other.source)
