"""Weighted splits (property tests): arms get their share of users, and a user keeps an arm."""

from __future__ import annotations

from functools import cache
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.parse import parse_chat_request
from proxy.routing import Router, RoutingPolicy
from proxy.routing.actions import Split, sticky_point
from proxy.types import ChatCall, Principal

KEY = Principal(key_id="k-1", name="alice", team="research")
weights = st.lists(st.integers(min_value=0, max_value=100), min_size=1, max_size=5).filter(lambda w: sum(w) > 0)


def call(user: str | None = None) -> ChatCall:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    if user is not None:
        body["user"] = user
    return parse_chat_request(orjson.dumps(body))


@cache
def user_calls(count: int) -> list[ChatCall]:
    return [call(f"user-{n}") for n in range(count)]


def split_policy(arm_weights: list[int], sticky: str = "user") -> RoutingPolicy:
    arms = [{"model": f"arm/{i}", "weight": w} for i, w in enumerate(arm_weights)]
    return RoutingPolicy.model_validate({"rules": [{"name": "ab", "split": arms, "sticky": sticky}]})


@settings(max_examples=30, deadline=None)
@given(arm_weights=weights, salt=st.text(min_size=1, max_size=8))
def test_a_split_converges_to_its_weights(arm_weights: list[int], salt: str) -> None:
    split = Split.build([(f"arm/{i}", float(w)) for i, w in enumerate(arm_weights)], by_user=True, salt=salt)
    users = 4000
    counts = dict.fromkeys(split.models, 0)
    for one in user_calls(users):
        counts[split.choose(one, KEY)] += 1
    total = sum(arm_weights)
    for i, weight in enumerate(arm_weights):
        share = weight / total
        observed = counts[f"arm/{i}"] / users
        # 5 standard deviations of a binomial share, plus a little slack
        assert abs(observed - share) <= 5 * (share * (1 - share) / users) ** 0.5 + 0.005, (arm_weights, counts)
        if weight == 0:
            assert counts[f"arm/{i}"] == 0


@settings(max_examples=50, deadline=None)
@given(arm_weights=weights, user=st.text(min_size=1, max_size=40), key_ids=st.lists(st.text(min_size=1), min_size=2))
def test_one_user_sees_one_arm_across_keys_and_recompiles(
    arm_weights: list[int], user: str, key_ids: list[str]
) -> None:
    arms = set()
    for key_id in key_ids:
        for router in (Router(split_policy(arm_weights)), Router(split_policy(arm_weights))):
            arms.add(router.plan(call(user), Principal(key_id=key_id, name="k")).model)
    assert len(arms) == 1


@settings(max_examples=50, deadline=None)
@given(arm_weights=weights, key_id=st.text(min_size=1, max_size=20), users=st.lists(st.text(min_size=1), max_size=5))
def test_sticky_key_ignores_the_user_field(arm_weights: list[int], key_id: str, users: list[str]) -> None:
    router = Router(split_policy(arm_weights, sticky="key"))
    principal = Principal(key_id=key_id, name="k")
    arms = {router.plan(c, principal).model for c in [*(call(u) for u in users), call()]}
    assert len(arms) == 1


def test_without_a_user_field_the_key_decides() -> None:
    router = Router(split_policy([1, 1, 1, 1]))
    by_key = {p: router.plan(call(), Principal(key_id=p, name="x")).model for p in ("a", "b", "c", "d", "e", "f")}
    assert len(set(by_key.values())) > 1
    assert all(router.plan(call(), Principal(key_id=p, name="y")).model == m for p, m in by_key.items())


def test_sticky_points_are_uniform_and_salted() -> None:
    points = [sticky_point(b"s", str(n)) for n in range(10_000)]
    assert all(0 <= p < 1 for p in points)
    assert abs(sum(points) / len(points) - 0.5) < 0.02
    assert sticky_point(b"a", "u") != sticky_point(b"b", "u")
