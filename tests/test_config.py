from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import DEFAULT_BASE_URL, load_settings
from proxy.yamlsrc import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_shipped_config_is_valid_and_env_overrides_apply() -> None:
    settings = load_settings(REPO / "config.yaml", {})
    assert settings.upstream.base_url == DEFAULT_BASE_URL
    assert settings.upstream.api_key is None and settings.store.redis_url is None
    env = {
        "OPENROUTER_API_KEY": "sk-or-secret",
        "OPENROUTER_BASE_URL": "http://127.0.0.1:9/api/v1/",
        "REDIS_URL": "redis://127.0.0.1:6379/0",
    }
    settings = load_settings(REPO / "config.yaml", env)
    assert settings.upstream.base_url == "http://127.0.0.1:9/api/v1"
    assert settings.upstream.api_key is not None and settings.upstream.api_key.get_secret_value() == "sk-or-secret"
    assert "sk-or-secret" not in repr(settings)
    assert settings.store.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.usage.log_path == REPO / "var" / "usage.jsonl"
    assert settings.policies_dir == REPO / "policies"


def test_every_problem_is_reported_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "server:\n  port: 99999\n  colour: blue\nupstream:\n  base_url: ftp://x\n"
        "keys:\n  - name: a\n    sha256: nothex\n"
    )
    with pytest.raises(ConfigError) as info:
        load_settings(path, {})
    found = sorted((p.line, p.message.split(":")[0]) for p in info.value.problems)
    assert found == [(2, "server.port"), (3, "server.colour"), (5, "upstream.base_url"), (8, "keys.0.sha256")]


def test_duplicate_keys_and_forbidden_forward_headers(tmp_path: Path) -> None:
    digest = "a" * 64
    path = tmp_path / "config.yaml"
    path.write_text(f"keys:\n  - name: a\n    sha256: {digest}\n  - name: a\n    sha256: {digest}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, {})
    assert len(info.value.problems) == 2 and info.value.problems[0].line == 4
    path.write_text("upstream:\n  forward_headers: [Authorization]\n")
    with pytest.raises(ConfigError):
        load_settings(path, {})


def test_a_repeated_yaml_key_and_bytes_that_are_not_utf8_are_problems_with_a_line(tmp_path: Path) -> None:
    """Plain YAML keeps the last of two equal keys silently: a second ``server:`` section
    would drop the first without a word."""
    path = tmp_path / "config.yaml"
    path.write_text("server:\n  port: 9000\nmetrics:\n  enabled: true\nserver:\n  port: 9001\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, {})
    (problem,) = info.value.problems
    assert problem.line == 5 and "server: duplicate key (first on line 1)" in problem.message
    path.write_bytes(b"server:\n  port: 9000\n  host: caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, {})
    (problem,) = info.value.problems
    assert problem.line == 3 and "not UTF-8" in problem.message


def test_a_lease_shorter_than_a_request_may_run_is_refused(tmp_path: Path) -> None:
    """A request that runs to ``total_timeout_s`` settles after a shorter lease ended, and its
    budget hold would be gone (its spend lost): such a config does not load."""
    path = tmp_path / "config.yaml"
    path.write_text("upstream:\n  total_timeout_s: 1800\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, {})
    (problem,) = info.value.problems
    assert "limits.lease_s must be at least upstream.total_timeout_s + 60 (1860), not 960" in problem.message
    path.write_text("upstream:\n  total_timeout_s: 1800\nlimits:\n  lease_s: 1860\n")
    assert load_settings(path, {}).limits.lease_s == 1860
    # set in the file: the problem points at its line, without pydantic's "Value error," prefix
    path.write_text("upstream:\n  total_timeout_s: 1800\nlimits:\n  lease_s: 600\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, {})
    (problem,) = info.value.problems
    assert problem.line == 4
    assert problem.message.startswith("limits.lease_s: must be at least upstream.total_timeout_s + 60 (1860), not 600")
    path.write_text("metrics:\n  token_sha256: nothex\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, {})
    (problem,) = info.value.problems
    assert (problem.line, problem.message) == (2, "metrics.token_sha256: must be 64 hex characters")


def test_forward_header_patterns_are_trailing_prefixes_that_never_cover_a_blocked_header(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    for bad in ("au*", "auth*", "x-*-id", "*", "x-open*router*"):
        path.write_text(f"upstream:\n  forward_headers: ['{bad}']\n")
        with pytest.raises(ConfigError):
            load_settings(path, {})
    path.write_text("upstream:\n  forward_headers: ['X-OpenRouter-*', x-session-id]\n")
    assert load_settings(path, {}).upstream.forward_headers == ("x-openrouter-*", "x-session-id")
