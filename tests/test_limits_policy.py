"""The limits policy file: validation with file and line, compilation, ``check``, formats."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.auth import hash_key
from proxy.cli import main
from proxy.config import load_settings
from proxy.limits import load_limits_policy
from proxy.limits.headers import format_reset
from proxy.limits.limiter import period_of
from proxy.limits.policy import NANO, KeyBudgets
from proxy.yamlsrc import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_the_shipped_policy_compiles() -> None:
    policy = load_limits_policy(REPO / "policies" / "limits.yaml")
    assert {"free", "standard", "enterprise"} <= set(policy.tiers)
    assert policy.key_tier(None) == "standard" and policy.team_tier("research") == "team-standard"
    sonnet = policy.rules("standard", "anthropic/claude-sonnet-4.5")
    names = [(r.name, r.model) for r in sonnet]
    assert ("requests_per_minute", None) in names and ("requests_per_minute", "anthropic/claude-sonnet-4.5") in names
    budgets = {r.name: r.limit for r in sonnet if r.metric == "budget"}
    assert budgets == {"budget_usd_per_day": 25 * NANO, "budget_usd_per_month": 300 * NANO}
    overridden = {r.name: r.limit for r in policy.rules("standard", None, KeyBudgets(usd_per_day=2)) if r.period}
    assert overridden["budget_usd_per_day"] == 2 * NANO


def test_the_load_test_policy_compiles() -> None:
    """``loadtests/`` ships its own policies; the benchmark must not find them broken."""
    policy = load_limits_policy(REPO / "loadtests" / "policies" / "limits.yaml")
    assert {"bench", "team-bench", "tight"} <= set(policy.tiers)


def test_problems_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "limits.yaml"
    path.write_text(
        "default_tier: gold\nteams:\n  red: nope\ntiers:\n  free:\n    requests_per_minute: 0\n    tokens_per_hour: 5\n"
        "    budget_usd_per_month: 5000000\n    tokens_per_day: 10000000000000000\n"
    )
    with pytest.raises(ConfigError) as info:
        load_limits_policy(path)
    assert [str(p) for p in info.value.problems] == [
        f"{path}:6: tiers.free.requests_per_minute: Input should be greater than or equal to 1",
        f"{path}:9: tiers.free.tokens_per_day: Input should be less than or equal to 1000000000000000",
        f"{path}:8: tiers.free.budget_usd_per_month: Input should be less than or equal to 1000000",
        f"{path}:7: tiers.free.tokens_per_hour: unknown key",
    ]
    path.write_text("default_tier: gold\nteams:\n  red: nope\ntiers:\n  free: {}\n")
    with pytest.raises(ConfigError) as info:
        load_limits_policy(path)
    assert [str(p) for p in info.value.problems] == [
        f"{path}:3: teams.red: unknown tier 'nope' (tiers: free)",
        f"{path}:1: default_tier: unknown tier 'gold' (tiers: free)",
    ]


def test_a_missing_file_means_no_limits(tmp_path: Path) -> None:
    policy = load_limits_policy(tmp_path / "limits.yaml")
    assert policy.tiers == [] and policy.key_tier(None) is None


def test_check_reports_limits_problems_and_unknown_key_tiers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "limits.yaml").write_text("tiers:\n  free:\n    concurrent_requests: 2\n")
    config = tmp_path / "config.yaml"
    config.write_text(f"keys:\n  - name: a\n    sha256: {hash_key('k')}\n    tier: gold\n")
    assert main(["check", "--config", str(config)]) == 1
    assert f"{config}:4: keys.0: key 'a' has unknown tier 'gold' (tiers: free)" in capsys.readouterr().out
    config.write_text(f"keys:\n  - name: a\n    sha256: {hash_key('k')}\n    tier: free\n")
    assert main(["check", "--config", str(config)]) == 0
    assert "limits.yaml: ok (1 limit tiers)" in capsys.readouterr().out
    from proxy.app import create_app

    settings = load_settings(config, {})
    assert create_app(settings).limits.tiers == ["free"]
    (tmp_path / "policies" / "limits.yaml").write_text("tiers:\n  silver: {}\n")
    with pytest.raises(ConfigError, match="unknown tier 'free'"):
        create_app(settings)


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "0s"),
        (250, "250ms"),
        (1000, "1s"),
        (1500, "1.5s"),
        (59_999, "59.999s"),
        (60_000, "1m0s"),
        (360_000, "6m0s"),
        (3_723_000, "1h2m3s"),
        (87_300_000, "24h15m0s"),
    ],
)
def test_reset_times_use_openai_s_format(ms: int, text: str) -> None:
    assert format_reset(ms) == text


def test_budget_periods_are_utc_calendar_periods() -> None:
    dec31 = 1_798_761_599.0  # 2026-12-31T23:59:59Z
    assert period_of("day", dec31) == ("2026-12-31", 1_798_761_600_000)
    assert period_of("month", dec31) == ("2026-12", 1_798_761_600_000)
    assert period_of("month", dec31 + 1) == ("2027-01", 1_801_440_000_000)
    assert period_of("total", dec31) == ("total", 0)
