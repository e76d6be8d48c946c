"""Loading routing.yaml: every problem with its file and line, the JSON Schema, the shipped policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxy.cli import main
from proxy.routing import load_router, routing_schema
from proxy.yamlsrc import ConfigError

REPO = Path(__file__).resolve().parents[1]
SCHEMA_FILE = REPO / "policies" / "routing.schema.json"


def problems(tmp_path: Path, text: str) -> list[tuple[int | None, str]]:
    (tmp_path / "routing.yaml").write_text(text)
    with pytest.raises(ConfigError) as info:
        load_router(tmp_path)
    assert all(p.file == str(tmp_path / "routing.yaml") for p in info.value.problems)
    return [(p.line, p.message) for p in info.value.problems]


BAD: list[tuple[str, str, int, str]] = [
    # (case, file text, line of the problem, words in its message)
    ("unknown rule key", "rules:\n  - name: a\n    modle: x/y\n", 3, "rules.0.modle: unknown key"),
    ("unknown match key", "rules:\n  - name: a\n    match:\n      teams: x\n", 4, "rules.0.match.teams: unknown key"),
    (
        "weights sum to zero",
        "rules:\n  - name: a\n    split:\n      - {model: x/a, weight: 0}\n      - {model: x/b, weight: 0}\n",
        2,
        "split weights must sum to a positive number",
    ),
    (
        "negative weight",
        "rules:\n  - name: a\n    split:\n      - {model: x/a, weight: -1}\n",
        4,
        "greater than or equal",
    ),
    ("empty split", "rules:\n  - name: a\n    split: []\n", 2, "split is empty"),
    ("invalid regex", "rules:\n  - name: a\n    match:\n      user_text: '(code'\n", 4, "invalid regular expression"),
    ("unclosed glob", "rules:\n  - name: a\n    match:\n      model: 'openai/[gpt'\n", 4, "unclosed '['"),
    ("empty pattern list", "rules:\n  - name: a\n    match:\n      key: []\n", 4, "an empty list never matches"),
    (
        "empty token range",
        "rules:\n  - name: a\n    match:\n      prompt_tokens: {min: 9, max: 3}\n",
        4,
        "range is empty",
    ),
    ("unknown variant", "rules:\n  - name: a\n    variant: turbo\n", 3, "unknown variant 'turbo'"),
    ("uncappable", "rules:\n  - name: a\n    caps: {seed: 1}\n", 3, "cannot cap seed"),
    ("fractional token cap", "rules:\n  - name: a\n    caps: {max_tokens: 1.5}\n", 3, "must be an integer"),
    ("infinite cap", "rules:\n  - name: a\n    caps: {max_tokens: .inf}\n", 3, "must be a finite number"),
    ("NaN cap", "rules:\n  - name: a\n    caps: {temperature: .nan}\n", 3, "must be a finite number"),
    ("negative temperature cap", "rules:\n  - name: a\n    caps: {temperature: -1}\n", 3, "between 0 and 2"),
    ("default out of range", "rules:\n  - name: a\n    defaults: {top_p: 3}\n", 3, "the top_p default must be"),
    ("default of the wrong type", "rules:\n  - name: a\n    defaults: {top_p: high}\n", 3, "finite number"),
    (
        "infinite weight",
        "rules:\n  - name: a\n    split: [{model: x/y, weight: .inf}, {model: x/z, weight: 1}]\n",
        3,
        "weight",
    ),
    (
        "regex repeat too large",
        "rules:\n  - name: a\n    match: {user_text: 'a{99999999999}'}\n",
        3,
        "regular expression",
    ),
    ("reserved default", "rules:\n  - name: a\n    defaults: {model: x}\n", 3, "model cannot be a default"),
    ("deny and act", "rules:\n  - name: a\n    deny: nope\n    model: x/y\n", 2, "a deny rule takes no other action"),
    ("model and split", "rules:\n  - name: a\n    model: x/y\n    split: [{model: x/z, weight: 1}]\n", 2, "not both"),
    ("native without fallbacks", "rules:\n  - name: a\n    native_fallbacks: true\n", 2, "needs fallbacks"),
    (
        "bad provider key",
        "rules:\n  - name: a\n    provider: {sortt: price}\n",
        3,
        "rules.0.provider.sortt: unknown key",
    ),
    ("bad name", "rules:\n  - name: 'two words'\n", 2, "rules.0.name"),
    (
        "after an unconditional rule",
        "rules:\n  - name: all\n    model: x/y\n  - name: later\n    match: {team: web}\n",
        4,
        "rule 'later' can never match: rule 'all' above matches all it does",
    ),
    (
        "shadowed by a broader glob",
        "rules:\n  - name: wide\n    match: {model: 'openai/*'}\n  - name: narrow\n"
        "    match: {model: openai/gpt-4o, stream: true}\n",
        4,
        "rule 'narrow' can never match: rule 'wide'",
    ),
    (
        "shadowed by a wider token range",
        "rules:\n  - name: big\n    match: {prompt_tokens: {min: 1000}}\n  - name: bigger\n"
        "    match: {prompt_tokens: {min: 5000, max: 9000}}\n",
        4,
        "rule 'bigger' can never match",
    ),
    ("duplicate names", "rules:\n  - name: a\n    match: {key: x}\n  - name: a\n    match: {key: y}\n", 4, "duplicate"),
    ("alias cycle", "aliases:\n  a: b\n  b: c\n  c: a\n", 2, "aliases: alias cycle a -> b -> c -> a"),
]


@pytest.mark.parametrize(("text", "line", "words"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_policies_name_file_and_line(tmp_path: Path, text: str, line: int, words: str) -> None:
    found = problems(tmp_path, text)
    assert any(at == line and words in message for at, message in found), found


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = "rules:\n  - name: a\n    match: {user_text: '('}\n  - name: b\n    variant: fast\n    cache: {ttl: 5}\n"
    found = problems(tmp_path, text)
    assert [line for line, _ in found] == [3, 5, 6, 6]
    assert "Value error" not in repr(found)


def test_rules_that_can_still_match_are_accepted(tmp_path: Path) -> None:
    (tmp_path / "routing.yaml").write_text(
        "rules:\n"
        "  - name: tag-all\n    continue: true\n"  # continue: later rules stay reachable
        "  - name: narrow\n    match: {model: openai/gpt-4o, stream: true}\n    model: x/a\n"
        "  - name: wide\n    match: {model: 'openai/*'}\n    model: x/b\n"  # wider after narrower: fine
        "  - name: other-glob\n    match: {model: 'openai/gpt-*'}\n    model: x/c\n"  # a glob is not decided
    )
    router = load_router(tmp_path)
    assert [r.name for r in router.policy.rules] == ["tag-all", "narrow", "wide", "other-glob"]


def test_the_shipped_policy_loads_with_rules() -> None:
    router = load_router(REPO / "policies")
    assert router.aliases["fast"] == "openai/gpt-4o-mini"
    assert len(router.policy.rules) >= 5


def test_the_json_schema_file_is_current() -> None:
    expected = json.dumps(routing_schema(), indent=2) + "\n"
    if not SCHEMA_FILE.exists() or SCHEMA_FILE.read_text() != expected:
        SCHEMA_FILE.write_text(expected)
        pytest.fail(f"{SCHEMA_FILE} was stale and has been regenerated; commit it")


def test_check_prints_the_schema_and_the_policy_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"] == "openrouter-proxy routing policy"
    assert "continue" in schema["$defs"]["Rule"]["properties"]
    assert main(["check", "--config", str(REPO / "config.yaml")]) == 0
    out = capsys.readouterr().out
    assert f"rules, policy {load_router(REPO / 'policies').policy_hash}" in out


def test_the_readme_example_is_a_valid_policy(tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Routing policies") :]
    example = section[section.index("```yaml") + len("```yaml") : section.index("```\n", section.index("```yaml") + 7)]
    (tmp_path / "routing.yaml").write_text(example)
    router = load_router(tmp_path)
    names = [rule.name for rule in router.policy.rules]
    assert names[0] == "free-tier-limits" and len(names) == 6
    used = set().union(*(rule.model_fields_set | rule.match.model_fields_set for rule in router.policy.rules))
    every = {"match", "continue_", "deny", "model", "variant", "split", "sticky", "fallbacks", "native_fallbacks"}
    every |= {"provider", "defaults", "caps", "first_token_timeout_s", "cache", "key", "team", "tier", "header"}
    every |= {"tools", "images", "response_format", "stream", "user_text", "prompt_tokens"}
    assert every <= used
