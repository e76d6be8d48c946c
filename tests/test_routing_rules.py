"""The rule engine, table-driven: each match condition, each action, and how rules combine."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from proxy.errors import PermissionDenied
from proxy.parse import parse_chat_request
from proxy.routing import Router, RoutingPolicy
from proxy.types import Principal, RoutePlan

ALICE = Principal(key_id="k-alice", name="alice", team="research", tier="free")
BOB = Principal(key_id="k-bob", name="bob", team="web")
CARL = Principal(key_id="k-carl", name="carl")
HI: Any = [{"role": "user", "content": "hi"}]
IMAGE: Any = [
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        ],
    }
]
TOOLS: Any = [{"type": "function", "function": {"name": "f", "parameters": {}}}]


def router(rules: list[dict[str, Any]], aliases: dict[str, str] | None = None) -> Router:
    return Router(RoutingPolicy.model_validate({"aliases": aliases or {}, "rules": rules}))


def decide(
    r: Router,
    model: str = "openai/gpt-4o",
    principal: Principal = ALICE,
    headers: tuple[tuple[bytes, bytes], ...] = (),
    **body: Any,
) -> RoutePlan:
    body.setdefault("messages", HI)
    return r.plan(parse_chat_request(orjson.dumps({"model": model, **body})), principal, headers)


def sent(plan: RoutePlan) -> dict[str, Any]:
    assert plan.body is not None and plan.request is not None
    decoded: dict[str, Any] = orjson.loads(plan.body)
    assert decoded == plan.request
    return decoded


MATCHES: list[tuple[str, dict[str, Any], dict[str, Any], bool]] = [
    # (case, match, request: model/principal/headers/body fields, matches?)
    ("model exact", {"model": "openai/gpt-4o"}, {}, True),
    ("model exact, other", {"model": "openai/gpt-4o"}, {"model": "openai/gpt-4o-mini"}, False),
    ("model glob", {"model": "openai/*"}, {"model": "openai/gpt-4o-mini"}, True),
    ("model glob, other", {"model": "openai/*"}, {"model": "anthropic/claude-haiku-4.5"}, False),
    ("model glob set", {"model": "anthropic/claude-[hs]*"}, {"model": "anthropic/claude-haiku-4.5"}, True),
    ("model list", {"model": ["x/y", "anthropic/*"]}, {"model": "anthropic/claude-haiku-4.5"}, True),
    ("model by alias name", {"model": "big"}, {"model": "big"}, True),
    ("model by alias target", {"model": "openai/*"}, {"model": "big"}, True),
    ("key", {"key": "alice"}, {}, True),
    ("key, other", {"key": "alice"}, {"principal": BOB}, False),
    ("key glob", {"key": ["b*", "x"]}, {"principal": BOB}, True),
    ("team", {"team": "research"}, {}, True),
    ("team, none set", {"team": "research"}, {"principal": CARL}, False),
    ("tier", {"tier": "free"}, {}, True),
    ("tier, other", {"tier": "free"}, {"principal": BOB}, False),
    ("header", {"header": {"x-app": "billing-*"}}, {"headers": ((b"x-app", b"billing-eu"),)}, True),
    ("header, other value", {"header": {"x-app": "billing-*"}}, {"headers": ((b"x-app", b"web"),)}, False),
    ("header, absent", {"header": {"x-app": "*"}}, {}, False),
    ("tools", {"tools": True}, {"tools": TOOLS}, True),
    ("tools, none sent", {"tools": True}, {}, False),
    ("no tools", {"tools": False}, {}, True),
    ("images", {"images": True}, {"messages": IMAGE}, True),
    ("images, text only", {"images": True}, {}, False),
    ("no images", {"images": False}, {"messages": IMAGE}, False),
    ("response_format", {"response_format": True}, {"response_format": {"type": "json_object"}}, True),
    ("response_format absent", {"response_format": True}, {}, False),
    ("response_format type", {"response_format": "json_schema"}, {"response_format": {"type": "json_object"}}, False),
    ("stream", {"stream": True}, {"stream": True}, True),
    ("stream, not", {"stream": True}, {}, False),
    ("not stream", {"stream": False}, {}, True),
    ("user text", {"user_text": r"(?i)\bpython\b"}, {"messages": [{"role": "user", "content": "Write Python"}]}, True),
    (
        "user text, last user only",
        {"user_text": "python"},
        {
            "messages": [
                {"role": "user", "content": "python"},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "thanks"},
            ]
        },
        False,
    ),
    (
        "prompt tokens min",
        {"prompt_tokens": {"min": 100}},
        {"messages": [{"role": "user", "content": "x" * 800}]},
        True,
    ),
    ("prompt tokens min, short", {"prompt_tokens": {"min": 100}}, {}, False),
    ("prompt tokens max", {"prompt_tokens": {"max": 100}}, {}, True),
    ("all of them", {"team": "research", "stream": True, "model": "openai/*"}, {"stream": True}, True),
    ("all of them, one fails", {"team": "research", "stream": True}, {}, False),
    ("empty match", {}, {"principal": CARL}, True),
]


@pytest.mark.parametrize(("match", "request_", "expected"), [c[1:] for c in MATCHES], ids=[c[0] for c in MATCHES])
def test_each_condition(match: dict[str, Any], request_: dict[str, Any], expected: bool) -> None:
    r = router([{"name": "r", "match": match, "model": "x/matched"}], aliases={"big": "openai/gpt-4o"})
    plan = decide(r, **request_)
    assert (plan.model == "x/matched") is expected
    assert (plan.rule == "r") is expected


ACTIONS: list[tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]]] = [
    # (case, rule actions, request body fields, expected: plan attributes and "sent" body fields)
    ("model", {"model": "anthropic/claude-haiku-4.5"}, {}, {"model": "anthropic/claude-haiku-4.5"}),
    ("model via alias", {"model": "fast"}, {}, {"model": "openai/gpt-4o-mini"}),
    ("variant", {"variant": "nitro"}, {}, {"model": "openai/gpt-4o:nitro"}),
    ("variants with colon", {"variant": [":free", "online"]}, {}, {"model": "openai/gpt-4o:free:online"}),
    ("variant already there", {"variant": "free"}, {"model": "openai/gpt-4o:free"}, {"model": "openai/gpt-4o:free"}),
    ("model and variant", {"model": "fast", "variant": "floor"}, {}, {"model": "openai/gpt-4o-mini:floor"}),
    (
        "fallbacks, proxy only",
        {"fallbacks": ["fast", "anthropic/claude-haiku-4.5"]},
        {},
        {"fallbacks": ("openai/gpt-4o-mini", "anthropic/claude-haiku-4.5"), "sent.models": None},
    ),
    (
        "fallbacks, also native",
        {"model": "emulator/error-502", "fallbacks": ["fast"], "native_fallbacks": True},
        {},
        {"fallbacks": ("openai/gpt-4o-mini",), "sent.models": ["emulator/error-502", "openai/gpt-4o-mini"]},
    ),
    (
        "provider merged, policy wins",
        {"provider": {"sort": "price", "data_collection": "deny"}},
        {"provider": {"sort": "latency", "zdr": True}},
        {"sent.provider": {"sort": "price", "data_collection": "deny", "zdr": True}},
    ),
    ("default set", {"defaults": {"temperature": 0.2}}, {}, {"sent.temperature": 0.2}),
    ("default kept", {"defaults": {"temperature": 0.2}}, {"temperature": 1.0}, {"body": None}),
    ("cap lowers", {"caps": {"max_tokens": 100}}, {"max_tokens": 5000}, {"sent.max_tokens": 100}),
    ("cap keeps lower", {"caps": {"max_tokens": 100}}, {"max_tokens": 50}, {"body": None}),
    ("cap sets when absent", {"caps": {"max_tokens": 100}}, {}, {"sent.max_tokens": 100}),
    (
        "cap covers max_completion_tokens",
        {"caps": {"max_tokens": 100}},
        {"max_completion_tokens": 900},
        {"sent.max_completion_tokens": 100, "sent.max_tokens": None},
    ),
    ("cap temperature", {"caps": {"temperature": 0.5}}, {"temperature": 1.5}, {"sent.temperature": 0.5}),
    ("cap temperature absent", {"caps": {"temperature": 0.5}}, {}, {"body": None}),
    (
        "default then cap",
        {"defaults": {"temperature": 1.5}, "caps": {"temperature": 1.0}},
        {},
        {"sent.temperature": 1.0},
    ),
    ("first token timeout", {"first_token_timeout_s": 7.5}, {}, {"first_token_timeout_s": 7.5, "body": None}),
    ("cache", {"cache": {"ttl_s": 60}}, {}, {"cache_ttl_s": 60.0, "body": None}),
    ("tag only", {}, {}, {"rule": "r", "body": None, "model": "openai/gpt-4o"}),
]


@pytest.mark.parametrize(("actions", "request_", "expected"), [c[1:] for c in ACTIONS], ids=[c[0] for c in ACTIONS])
def test_each_action(actions: dict[str, Any], request_: dict[str, Any], expected: dict[str, Any]) -> None:
    r = router([{"name": "r", **actions}], aliases={"fast": "openai/gpt-4o-mini"})
    plan = decide(r, **request_)
    assert plan.rule == "r"
    for name, want in expected.items():
        if name.startswith("sent."):
            assert sent(plan).get(name[5:]) == want, name
        else:
            assert getattr(plan, name) == want, name
    if plan.body is not None:
        assert sent(plan)["model"] == plan.model
    assert plan.policy_hash == r.policy_hash


def test_deny_is_a_403_naming_the_rule() -> None:
    r = router([{"name": "no-big-for-web", "match": {"team": "web", "model": "openai/gpt-4o"}, "deny": "Ask for it."}])
    with pytest.raises(PermissionDenied) as info:
        decide(r, principal=BOB)
    assert info.value.status_code() == 403
    assert info.value.message == "Ask for it. (routing rule 'no-big-for-web')"
    assert decide(r).rule is None


def test_deny_by_vendor_glob_covers_latest_ids_variants_and_the_client_models_list() -> None:
    """The other spellings of a denied vendor's models: OpenRouter's ``~author/...-latest``
    ids, variant suffixes, and entries of the client's ``models`` fallback list."""
    r = router([{"name": "no-anthropic", "match": {"team": "web", "model": "anthropic/*"}, "deny": "No."}])
    for model in ("anthropic/claude-sonnet-4.5", "~anthropic/claude-sonnet-latest", "anthropic/claude-haiku-4.5:nitro"):
        with pytest.raises(PermissionDenied):
            decide(r, model=model, principal=BOB)
    plan = decide(r, model="openai/gpt-4o", principal=BOB, models=["~anthropic/claude-sonnet-latest", "openai/gpt-4o"])
    assert plan.fallbacks == ()  # the denied fallback is dropped
    assert decide(r, model="~anthropic/claude-sonnet-latest").model == "~anthropic/claude-sonnet-latest"  # not web


def test_first_match_wins_and_continue_adds() -> None:
    r = router(
        [
            {"name": "free-cap", "match": {"tier": "free"}, "caps": {"max_tokens": 200}, "continue": True},
            {"name": "web-cap", "match": {"team": "web"}, "caps": {"max_tokens": 100}, "continue": True},
            {"name": "nitro", "match": {"model": "openai/*"}, "variant": "nitro", "model": "openai/gpt-4o-mini"},
            {"name": "catch-all", "caps": {"max_tokens": 50}},
        ]
    )
    plan = decide(r, max_tokens=1000)
    assert plan.rule == "free-cap+nitro"
    assert plan.model == "openai/gpt-4o-mini:nitro"
    assert sent(plan)["max_tokens"] == 200
    other = decide(r, model="anthropic/claude-haiku-4.5", principal=BOB)
    assert other.rule == "web-cap+catch-all"
    assert sent(other)["max_tokens"] == 50  # the strictest cap wins
    assert other.model == "anthropic/claude-haiku-4.5"


def test_earlier_rules_win_model_defaults_and_provider_keys() -> None:
    r = router(
        [
            {
                "name": "a",
                "model": "x/a",
                "defaults": {"temperature": 0.1},
                "provider": {"sort": "price"},
                "continue": True,
            },
            {
                "name": "b",
                "model": "x/b",
                "defaults": {"temperature": 0.9, "top_p": 0.5},
                "provider": {"sort": "latency", "zdr": True},
            },
        ]
    )
    body = sent(decide(r))
    assert body["model"] == "x/a" and body["temperature"] == 0.1 and body["top_p"] == 0.5
    assert body["provider"] == {"sort": "price", "zdr": True}


def test_conditions_see_the_request_as_sent_not_earlier_changes() -> None:
    r = router(
        [
            {"name": "to-mini", "model": "openai/gpt-4o-mini", "continue": True},
            {"name": "mini-only", "match": {"model": "openai/gpt-4o-mini"}, "variant": "nitro"},
        ]
    )
    plan = decide(r)
    assert plan.model == "openai/gpt-4o-mini" and plan.rule == "to-mini"


def test_unmatched_requests_share_one_plan_and_forward_the_clients_bytes() -> None:
    r = router([{"name": "r", "match": {"key": "nobody"}, "model": "x/y"}])
    first, again, other = decide(r), decide(r), decide(r, principal=BOB)
    assert first is again and other == first  # one shared plan per (model, caller)
    assert first.body is None and first.request is None and first.rule is None
    assert first.policy_hash == r.policy_hash


def test_aliases_still_apply_with_rules_and_to_the_models_list() -> None:
    r = router([{"name": "tag", "match": {"model": "claude"}}], aliases={"claude": "anthropic/claude-haiku-4.5"})
    plan = decide(r, model="claude")
    assert plan.model == "anthropic/claude-haiku-4.5" and plan.rule == "tag"
    plan = decide(r, model="x/y", models=["claude", "z/z"])
    assert plan.rule == "client:models" and "models" not in sent(plan)
    assert plan.fallbacks == ("anthropic/claude-haiku-4.5", "z/z")


def test_a_client_models_list_cannot_reach_a_denied_model() -> None:
    """The client's own fallback list is policy-governed: denied entries are dropped, the
    rest become the proxy's fallbacks (limits, budgets and breakers cover them)."""
    r = router(
        [{"name": "no-opus", "match": {"model": "anthropic/claude-opus-*"}, "deny": "Opus is not allowed"}],
        aliases={"opus": "anthropic/claude-opus-4"},
    )
    plan = decide(r, model="openai/gpt-4o-mini", models=["opus", "anthropic/claude-opus-4", "openai/gpt-4o"])
    assert plan.fallbacks == ("openai/gpt-4o",)
    assert "models" not in sent(plan)


def test_headers_are_optional_and_read_lazily() -> None:
    r = router([{"name": "h", "match": {"header": {"x-team-override": "gold"}}, "model": "x/gold"}])
    assert decide(r).model == "openai/gpt-4o"
    assert decide(r, headers=((b"x-other", b"1"), (b"x-team-override", b"gold"))).model == "x/gold"


def test_policy_hash_ignores_layout_and_follows_content() -> None:
    one = router([{"name": "r", "model": "x/y"}])
    two = Router(RoutingPolicy.model_validate({"rules": [{"model": "x/y", "name": "r"}]}))
    three = router([{"name": "r", "model": "x/z"}])
    assert one.policy_hash == two.policy_hash != three.policy_hash
    assert len(one.policy_hash) == 12


DENY_CARL_CLAUDE = {"name": "no-claude", "match": {"key": "carl", "model": "anthropic/*"}, "deny": "not for carl"}


@pytest.mark.parametrize(
    ("case", "rules", "aliases", "model", "body"),
    [
        (
            "a variant of an exactly denied id",
            [{"name": "no", "match": {"key": "carl", "model": "anthropic/claude-sonnet-4.5"}, "deny": "no"}],
            {},
            "anthropic/claude-sonnet-4.5:nitro",
            {},
        ),
        ("an alias of a ~ id", [DENY_CARL_CLAUDE], {"latest": "~anthropic/claude-sonnet-latest"}, "latest", {}),
        (
            "an alias through a denied alias",
            [{"name": "no", "match": {"key": "carl", "model": "small"}, "deny": "no"}],
            {"tiny": "small", "small": "openai/gpt-4o-mini"},
            "tiny",
            {},
        ),
        (
            "a split arm",
            [DENY_CARL_CLAUDE, {"name": "ab", "split": [{"model": "anthropic/claude-haiku-4.5", "weight": 1}]}],
            {},
            "openai/gpt-4o",
            {},
        ),
        (
            "a rule's model",
            [DENY_CARL_CLAUDE, {"name": "code", "match": {"model": "auto"}, "model": "anthropic/claude-haiku-4.5"}],
            {"auto": "openai/gpt-4o-mini"},
            "auto",
            {},
        ),
    ],
)
def test_a_deny_holds_however_the_model_is_reached(
    case: str, rules: list[dict[str, Any]], aliases: dict[str, str], model: str, body: dict[str, Any]
) -> None:
    with pytest.raises(PermissionDenied):
        decide(router(rules, aliases), model, CARL, **body)
    decide(router(rules, aliases), model, BOB, **body)  # the deny is carl's only


def test_denied_fallbacks_of_a_rule_or_a_client_are_dropped() -> None:
    rules = [
        DENY_CARL_CLAUDE,
        {"name": "big-deny", "match": {"key": "carl", "model": "big"}, "deny": "no"},
        {"name": "chain", "match": {"model": "openai/gpt-4o"}, "fallbacks": ["anthropic/claude-haiku-4.5", "x/y"]},
    ]
    r = router(rules, {"big": "openai/gpt-4.1"})
    assert decide(r, "openai/gpt-4o", CARL).fallbacks == ("x/y",)
    assert decide(r, "openai/gpt-4o", BOB).fallbacks == ("anthropic/claude-haiku-4.5", "x/y")
    plan = decide(r, "openai/gpt-4o-mini", CARL, models=["big", "openai/gpt-4.1", "x/z"])
    assert plan.fallbacks == ("openai/gpt-4.1", "x/z")  # "big" is denied by its own name


def test_a_rule_s_fallback_chain_is_tried_once_per_model() -> None:
    r = router(
        [
            {
                "name": "chain",
                "match": {"model": "openai/gpt-4o-mini"},
                "fallbacks": ["a/b", "openai/gpt-4o-mini", "a/b"],
            },
            {
                "name": "native",
                "match": {"model": "openai/gpt-4o"},
                "fallbacks": ["a/b", "a/b"],
                "native_fallbacks": True,
            },
        ]
    )
    assert decide(r, "openai/gpt-4o-mini").fallbacks == ("a/b",)
    assert sent(decide(r, "openai/gpt-4o"))["models"] == ["openai/gpt-4o", "a/b"]


def test_a_max_completion_tokens_default_leaves_a_client_s_max_tokens_alone() -> None:
    r = router([{"name": "d", "defaults": {"max_completion_tokens": 2000}, "caps": {"temperature": 1}}])
    assert "max_completion_tokens" not in sent(decide(r, max_tokens=100, temperature=1.5))
    assert sent(decide(r))["max_completion_tokens"] == 2000


def test_only_a_deny_sees_a_variant_id_as_its_base_model() -> None:
    """A rule that sets the model must not catch (and drop the suffix of) a variant request."""
    r = router([{"name": "upgrade", "match": {"model": "openai/gpt-4o-mini"}, "model": "openai/gpt-4o"}])
    assert decide(r, "openai/gpt-4o-mini:free").model == "openai/gpt-4o-mini:free"
    assert decide(r, "openai/gpt-4o-mini").model == "openai/gpt-4o"
