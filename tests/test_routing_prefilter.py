"""Literal prefilters for user_text regexes: what they derive, that they never skip a match."""

from __future__ import annotations

import re
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.parse import parse_chat_request
from proxy.routing import Router, RoutingPolicy
from proxy.routing.prefilter import GATE_MIN_LITERALS, literal_gate, required_literals
from proxy.types import Principal

LITERALS: list[tuple[str, set[str] | None]] = [
    (r"(?i)\b(python|type script|sql)\b", {"python", "type script", "sql"}),
    (r"(?i)stack ?trace", {"stack"}),
    (r"Refactor\w+", {"refactor"}),
    (r"(?:foo)?bar", {"bar"}),
    (r"[ab]cd", {"cd"}),
    (r"(a|)b", {"b"}),
    (r"(?x) hello \s world", {"hello"}),
    (r"\d+", None),
    (r"x*", None),
    (r"(python|\d+)", None),  # one alternative has no literal
    (r"(?!python)", None),
    (r"é", None),  # no ASCII literal
]


@pytest.mark.parametrize(("pattern", "expected"), LITERALS)
def test_required_literals(pattern: str, expected: set[str] | None) -> None:
    found = required_literals(pattern)
    assert (set(found) if found is not None else None) == expected


WORDS = ["python", "rust", "sql", "trace", "stack", "pyth", "on", "art", "trust", "Über", "x"]
word = st.sampled_from(WORDS).flatmap(lambda w: st.sampled_from([w, w.upper(), w.capitalize()]))


@st.composite
def patterns(draw: Any) -> str:
    alternatives = draw(st.lists(st.sampled_from(WORDS[:-1]), min_size=1, max_size=4))
    body = "|".join(re.escape(a) for a in alternatives)
    body = draw(st.sampled_from([f"({body})", f"(?:{body})s?", rf"\b({body})\b", f"pre({body})+"]))
    return draw(st.sampled_from(["", "(?i)"])) + body


@settings(max_examples=300, deadline=None)
@given(pattern=patterns(), words=st.lists(word, max_size=8), glue=st.sampled_from([" ", "", "-", "\n"]))
def test_a_regex_never_matches_text_without_one_of_its_literals(pattern: str, words: list[str], glue: str) -> None:
    text = glue.join(words)
    literals = required_literals(pattern)
    assert literals is not None
    if re.search(pattern, text) and text.isascii():
        assert any(literal in text.lower() for literal in literals), (pattern, text, literals)


def test_the_gate_needs_enough_literals_and_finds_any_of_them() -> None:
    few = [frozenset({f"w{i}"}) for i in range(GATE_MIN_LITERALS - 1)]
    assert literal_gate(few) is None
    gate = literal_gate([*few, frozenset({"rust", "trust"}), None])
    assert gate is not None
    assert gate.search("i trust this") and gate.search("w3") and not gate.search("nothing here")


def test_a_policy_with_many_text_rules_decides_like_the_plain_regexes() -> None:
    topics = [f"topic{i}" for i in range(GATE_MIN_LITERALS + 4)] + ["rust"]
    rules = [{"name": t, "match": {"user_text": rf"(?i)\b{t}\b"}, "model": f"x/{t}"} for t in topics]
    rules.append({"name": "digits", "match": {"user_text": r"\d{4}"}, "model": "x/digits"})  # no literal
    router = Router(RoutingPolicy.model_validate({"rules": rules}))
    who = Principal(key_id="k", name="alice")

    def routed(text: str) -> str:
        body = {"model": "m", "messages": [{"role": "user", "content": text}]}
        return router.plan(parse_chat_request(orjson.dumps(body)), who).model

    assert routed("A question about TOPIC7 and topic3") == "x/topic3"  # first rule in order wins
    assert routed("Is Rust fast?") == "x/rust"
    assert routed("trusted") == "m"  # the literal is there, the regex (word boundaries) says no
    assert routed("nothing to see") == "m"
    assert routed("year 2026") == "x/digits"
    assert routed("Ünïcode and Topic9") == "x/topic9"  # non-ASCII text: no prefilter, the regex decides
