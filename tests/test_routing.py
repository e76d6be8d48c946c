from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from proxy.parse import parse_chat_request
from proxy.routing import Router, RoutingPolicy, load_router
from proxy.types import Principal
from proxy.yamlsrc import ConfigError

ALICE = Principal(key_id="abc", name="alice", team="research")


def call(model: str, **extra: object) -> bytes:
    return orjson.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], **extra})


def test_alias_rewrites_model_and_keeps_other_fields() -> None:
    router = Router(RoutingPolicy(aliases={"gpt-4o": "openai/gpt-4o"}))
    plan = router.plan(parse_chat_request(call("gpt-4o", temperature=0.5, provider={"sort": "price"})), ALICE)
    assert plan.model == "openai/gpt-4o"
    assert plan.rule == "alias:gpt-4o"
    assert plan.body is not None
    sent = orjson.loads(plan.body)
    assert sent["model"] == "openai/gpt-4o" and sent["temperature"] == 0.5 and sent["provider"] == {"sort": "price"}


def test_unaliased_model_forwards_the_clients_bytes() -> None:
    router = Router(RoutingPolicy(aliases={"gpt-4o": "openai/gpt-4o"}))
    plan = router.plan(parse_chat_request(call("anthropic/claude-haiku-4.5")), ALICE)
    assert plan.model == "anthropic/claude-haiku-4.5" and plan.body is None and plan.rule is None


def test_alias_chains_resolve_and_apply_to_the_models_list() -> None:
    router = Router(RoutingPolicy(aliases={"fast": "mini", "mini": "openai/gpt-4o-mini", "big": "openai/gpt-4o"}))
    assert router.model_aliases()["fast"] == "openai/gpt-4o-mini"
    plan = router.plan(parse_chat_request(call("openai/o3", models=["big", "fast", "x/y"])), ALICE)
    assert plan.body is not None
    assert "models" not in orjson.loads(plan.body)  # the proxy falls back itself, under policy
    assert plan.fallbacks == ("openai/gpt-4o", "openai/gpt-4o-mini", "x/y")
    assert plan.model == "openai/o3"


def test_policy_file_problems_name_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "routing.yaml").write_text("aliases:\n  a: b\n  b: a\n")
    with pytest.raises(ConfigError) as info:
        load_router(tmp_path)
    (problem,) = info.value.problems
    assert problem.line == 2 and "cycle" in problem.message
    (tmp_path / "routing.yaml").write_text("aliases:\n  a: b\nrulez: []\n")
    with pytest.raises(ConfigError) as info:
        load_router(tmp_path)
    assert [(p.line, p.message) for p in info.value.problems] == [(3, "rulez: unknown key")]
    (tmp_path / "routing.yaml").write_text("aliases:\n  a: [1\n")
    with pytest.raises(ConfigError) as info:
        load_router(tmp_path)
    assert "YAML syntax error" in info.value.problems[0].message


def test_missing_or_empty_policy_means_no_routing(tmp_path: Path) -> None:
    assert load_router(tmp_path).aliases == {}
    (tmp_path / "routing.yaml").write_text("# nothing yet\n")
    assert load_router(tmp_path).aliases == {}


def test_the_public_surface() -> None:
    import importlib
    import pkgutil

    import proxy.routing as package

    assert sorted(package.__all__) == [
        "CompiledPolicy",
        "ContextGuard",
        "ROUTING_FILE",
        "ReloadingRouter",
        "Router",
        "RoutingPolicy",
        "compile_policy",
        "load_policy",
        "load_router",
        "routing_schema",
    ]
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"proxy.routing.{info.name}")
        assert all(hasattr(module, name) for name in module.__all__), info.name
