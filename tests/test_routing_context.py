"""The context-window guard against the emulator's model catalog (context_length, §6.1)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.catalog import ModelCatalog
from proxy.errors import ContextLengthExceeded, ProxyError
from proxy.parse import parse_chat_request
from proxy.routing import ContextGuard, Router, RoutingPolicy
from proxy.types import ChatCall, Principal, RoutePlan

MODELS = orjson.loads((Path(__file__).resolve().parents[1] / "proxy/emulator/data/models.json").read_bytes())
LLAMA = "meta-llama/llama-3.1-8b-instruct"  # 131072 tokens
NANO = "openai/gpt-4.1-nano"  # 1047576 tokens
MINI = "openai/gpt-4o-mini"  # 128000 tokens
ALICE = Principal(key_id="k", name="alice", team="research")

pytestmark = pytest.mark.asyncio


class Fetches:
    def __init__(self, fail: bool = False) -> None:
        self.count = 0
        self.fail = fail

    async def __call__(self) -> Any:
        self.count += 1
        if self.fail:
            raise ProxyError("catalog down")
        return MODELS


def call(model: str = LLAMA, **body: Any) -> ChatCall:
    return parse_chat_request(orjson.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], **body}))


def planned(fallbacks: list[str], native: bool = False, model: str = LLAMA, **body: Any) -> tuple[RoutePlan, ChatCall]:
    rule: dict[str, Any] = {"name": "chain", "model": model}
    if fallbacks:
        rule.update(fallbacks=fallbacks, native_fallbacks=native)
    one = call(**body)
    return Router(RoutingPolicy.model_validate({"rules": [rule]})).plan(one, ALICE), one


async def test_small_requests_skip_the_catalog() -> None:
    fetch = Fetches()
    guard = ContextGuard(ModelCatalog(fetch, 60))
    plan, one = planned([], max_tokens=1000)
    assert await guard(plan, one) is plan
    assert fetch.count == 0


async def test_a_request_that_fits_keeps_its_plan() -> None:
    guard = ContextGuard(ModelCatalog(Fetches(), 60))
    plan, one = planned([NANO], max_tokens=100_000)
    assert await guard(plan, one) is plan


async def test_too_big_for_the_model_moves_to_the_first_fallback_that_fits() -> None:
    guard = ContextGuard(ModelCatalog(Fetches(), 60))
    plan, one = planned([MINI, NANO, "anthropic/claude-sonnet-4.5"], native=True, max_tokens=200_000)
    moved = await guard(plan, one)
    assert moved.model == NANO
    assert moved.fallbacks == ("anthropic/claude-sonnet-4.5",)
    assert moved.rule == plan.rule and moved.policy_hash == plan.policy_hash
    assert moved.body is not None and orjson.loads(moved.body) == moved.request
    assert moved.request is not None
    assert moved.request["model"] == NANO
    assert moved.request["models"] == [NANO, "anthropic/claude-sonnet-4.5"]


async def test_variants_use_the_base_models_window() -> None:
    guard = ContextGuard(ModelCatalog(Fetches(), 60))
    plan, one = planned([f"{NANO}:floor"], model=f"{LLAMA}:nitro", max_tokens=200_000)
    assert (await guard(plan, one)).model == f"{NANO}:floor"


async def test_nothing_fits_is_a_clear_400_before_any_upstream_call() -> None:
    guard = ContextGuard(ModelCatalog(Fetches(), 60))
    plan, one = planned([MINI], max_tokens=500_000)
    with pytest.raises(ContextLengthExceeded) as info:
        await guard(plan, one)
    error = info.value
    assert error.status_code() == 400 and error.code == "context_length_exceeded" and error.param == "messages"
    assert "500000" in error.message and "131072-token context window of meta-llama" in error.message
    assert "every fallback" in error.message


async def test_unknown_models_are_let_through() -> None:
    guard = ContextGuard(ModelCatalog(Fetches(), 60))
    plan, one = planned([], model="someone/new-model", max_tokens=5_000_000)
    assert await guard(plan, one) is plan


async def test_an_unavailable_catalog_lets_requests_through_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    guard = ContextGuard(ModelCatalog(Fetches(fail=True), 60))
    plan, one = planned([], max_tokens=500_000)
    with caplog.at_level(logging.WARNING, logger="proxy.routing"):
        assert await guard(plan, one) is plan
        assert await guard(plan, one) is plan
    assert [r.message for r in caplog.records].count(
        "context guard off: the model catalog is unavailable (catalog down)"
    ) == 1
