"""The response cache over both stores: keys, what is stored, hits, TTLs and bounds."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_asyncio

from proxy.cache import CACHE_HIT, ResponseCache
from proxy.parse import parse_chat_request
from proxy.routing import Router, RoutingPolicy
from proxy.store import MemoryStore, Store, open_store
from proxy.store.cache_memory import MemoryCache
from proxy.types import ChatCall, Principal, RoutePlan

FIXTURES = Path(__file__).resolve().parents[1] / "proxy/emulator/data/fixtures"
STREAM = (FIXTURES / "stream_basic.sse").read_bytes()
WHOLE = (FIXTURES / "completion_basic.json").read_bytes()
ALICE = Principal(key_id="k-alice", name="alice", team="research")
ANNA = Principal(key_id="k-anna", name="anna", team="research")
BOB = Principal(key_id="k-bob", name="bob", team="web")
HEADERS = [(b"content-type", b"application/json"), (b"x-generation-id", b"gen-1"), (b"x-provider-name", b"OpenAI")]
SSE_HEADERS = [(b"content-type", b"text/event-stream")]
ROUTER = Router(
    RoutingPolicy.model_validate(
        {
            "aliases": {"fast": "openai/gpt-4o-mini"},
            "rules": [
                {"name": "no-cache", "match": {"key": "nocache"}},
                {"name": "cached", "cache": {"ttl_s": 60}, "caps": {"max_tokens": 50}},
            ],
        }
    )
)


@pytest_asyncio.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    url = None if request.param == "memory" else request.getfixturevalue("redis_url")
    opened = open_store(url)
    yield opened
    await opened.aclose()


def call(stream: bool = False, **body: Any) -> ChatCall:
    fields = {"model": "fast", "messages": [{"role": "user", "content": "What is 2+2?"}], "stream": stream, **body}
    return parse_chat_request(orjson.dumps(fields))


def plan_of(one: ChatCall, principal: Principal = ALICE) -> RoutePlan:
    return ROUTER.plan(one, principal)


@pytest.mark.asyncio
async def test_whole_and_streamed_answers_are_stored_and_replayed(store: Store) -> None:
    cache = ResponseCache(store)
    whole, streamed = call(seed=1), call(stream=True, seed=1)
    assert await cache.lookup(plan_of(whole), whole, ALICE) is None
    assert await cache.store(plan_of(whole), whole, ALICE, status=200, headers=HEADERS, body=WHOLE, stream=False)
    assert await cache.lookup(plan_of(streamed), streamed, ALICE) is None  # stream is part of the key
    assert await cache.store(
        plan_of(streamed), streamed, ALICE, status=200, headers=SSE_HEADERS, body=STREAM, stream=True
    )
    hit = await cache.lookup(plan_of(whole), whole, ALICE)
    assert hit is not None
    assert (hit.status, hit.body, hit.stream) == (200, WHOLE, False)
    assert hit.headers == ((b"content-type", b"application/json"), (b"x-provider-name", b"OpenAI"), CACHE_HIT)
    hit = await cache.lookup(plan_of(streamed), streamed, ALICE)
    assert hit is not None and hit.body == STREAM and hit.stream is True  # the SSE bytes, byte for byte


@pytest.mark.asyncio
async def test_the_key_is_the_routed_request_minus_what_does_not_change_the_answer() -> None:
    cache = ResponseCache(MemoryStore())
    base = call()

    def key(one: ChatCall, principal: Principal = ALICE) -> str | None:
        return cache.key(plan_of(one, principal), one, principal)

    same = [
        call(user="u-2", metadata={"a": "b"}, session_id="s", stream_options={"include_usage": True}),
        call(model="openai/gpt-4o-mini"),  # the alias resolves to the same upstream request
        call(max_tokens=500),  # capped to 50 by the rule, like the default
        parse_chat_request(orjson.dumps({"stream": False, "messages": base.body["messages"], "model": "fast"})),
    ]
    assert all(key(one) == key(base) for one in same)
    assert key(base, ANNA) == key(base)  # the same team shares
    different = [call(temperature=0.5), call(stream=True), call(model="openai/gpt-4o"), call(max_tokens=10)]
    assert len({key(base), key(base, BOB), *(key(one) for one in different)}) == 6
    assert key(call(), Principal(key_id="k-x", name="nocache")) is None  # no cache rule matched


@pytest.mark.asyncio
async def test_only_clean_answers_are_stored(store: Store) -> None:
    cache = ResponseCache(store, max_bytes=4096)
    one, streamed = call(seed=2), call(stream=True, seed=2)

    async def stores(body: bytes, *, status: int = 200, stream: bool = False) -> bool:
        target = streamed if stream else one
        return await cache.store(plan_of(target), target, ALICE, status=status, headers=[], body=body, stream=stream)

    error_event = b'data: {"error":{"code":502,"message":"x"},"choices":[{"finish_reason":"error"}]}\n\n'
    assert not await stores(WHOLE, status=500)
    assert not await stores(b'{"error":{"code":400,"message":"bad"}}')
    assert not await stores(b'{"choices":[{"finish_reason":"error","error":{"code":502}}]}')
    assert not await stores(b"not json")
    assert not await stores(WHOLE + b" " * 5000)  # over max_bytes
    assert not await stores(STREAM.replace(b"data: [DONE]\n\n", b""), stream=True)  # no [DONE]
    assert not await stores(STREAM[: len(STREAM) // 2], stream=True)  # cut
    assert not await stores(STREAM.replace(b"data: [DONE]", error_event + b"data: [DONE]"), stream=True)
    assert await cache.lookup(plan_of(one), one, ALICE) is None
    assert await cache.lookup(plan_of(streamed), streamed, ALICE) is None


@pytest.mark.asyncio
async def test_entries_expire_after_their_ttl(store: Store) -> None:
    await store.cache_set("orp:cache:test-ttl", b"\x00\xff value", 0.05)
    assert await store.cache_get("orp:cache:test-ttl") == b"\x00\xff value"  # bytes stay bytes
    await asyncio.sleep(0.15)
    assert await store.cache_get("orp:cache:test-ttl") is None


@pytest.mark.asyncio
async def test_an_unreachable_store_misses_and_skips() -> None:
    down = open_store("redis://127.0.0.1:1/0")
    cache = ResponseCache(down)
    one = call()
    assert await cache.lookup(plan_of(one), one, ALICE) is None
    assert not await cache.store(plan_of(one), one, ALICE, status=200, headers=[], body=WHOLE, stream=False)
    await down.aclose()


def test_the_memory_cache_is_bounded_in_entries_and_bytes() -> None:
    now = [0.0]
    cache = MemoryCache(max_entries=3, max_bytes=10, clock=lambda: now[0])
    for name in "abc":
        cache.set(name, b"12", 10)
    cache.set("d", b"12", 10)  # a full cache drops the oldest entry
    assert [cache.get(k) for k in "abcd"] == [None, b"12", b"12", b"12"]
    cache.set("e", b"1234567", 10)  # too many bytes: old entries go until it fits
    assert cache.get("b") is None and cache.get("c") is None and cache.get("e") == b"1234567"
    cache.set("huge", b"x" * 11, 10)
    assert cache.get("huge") is None
    now[0] = 11.0
    assert cache.get("e") is None


@pytest.mark.asyncio
async def test_a_hanging_store_costs_one_short_timeout_then_is_left_alone_for_retry_s() -> None:
    """A stalled Redis: the first lookup gives up after ``timeout_s``; the next ones (and the
    stores) within ``retry_s`` do not touch the store; after it, it is tried again."""
    calls: list[str] = []

    class Hanging(MemoryStore):
        async def cache_get(self, key: str) -> bytes | None:
            calls.append("get")
            await asyncio.sleep(10)
            return None

    cache = ResponseCache(Hanging(), timeout_s=0.05, retry_s=0.3)
    one = call()
    loop = asyncio.get_running_loop()
    began = loop.time()
    assert await cache.lookup(plan_of(one), one, ALICE) is None
    for _ in range(5):
        assert await cache.lookup(plan_of(one), one, ALICE) is None
    assert not await cache.store(plan_of(one), one, ALICE, status=200, headers=[], body=WHOLE, stream=False)
    assert loop.time() - began < 0.3 and calls == ["get"]
    await asyncio.sleep(0.3)
    many = await asyncio.gather(*(cache.lookup(plan_of(one), one, ALICE) for _ in range(20)))
    assert many == [None] * 20 and calls == ["get", "get"]  # one of them probed, the others skipped
