from __future__ import annotations

import asyncio
from typing import Any

import pytest

from proxy.catalog import ModelCatalog, openai_model_list
from proxy.errors import ProxyError, UpstreamUnreachable

MODELS = {
    "data": [
        {
            "id": "openai/gpt-4o-mini",
            "created": 5,
            "name": "GPT-4o mini",
            "context_length": 128000,
            "pricing": {"prompt": "0.00000015", "completion": "0.0000006"},
        }
    ]
}


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def test_cached_for_the_ttl_fetched_once_under_concurrency_and_stale_on_error() -> None:
    calls = 0
    fail = False
    clock = Clock()

    async def fetch() -> Any:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        if fail:
            raise UpstreamUnreachable("down")
        return MODELS

    async def main() -> None:
        nonlocal fail
        catalog = ModelCatalog(fetch, ttl_s=60, clock=clock)
        results = await asyncio.gather(*(catalog.models() for _ in range(20)))
        assert calls == 1 and all(r[0]["id"] == "openai/gpt-4o-mini" for r in results)
        clock.now = 30
        await catalog.models()
        assert calls == 1
        clock.now = 61
        fail = True
        assert (await catalog.models())[0]["id"] == "openai/gpt-4o-mini"  # stale copy served
        assert calls == 2
        assert (await catalog.get("openai/gpt-4o-mini:nitro")) is not None
        assert await catalog.get("x/unknown") is None

    asyncio.run(main())


def test_no_copy_and_failing_fetch_raises() -> None:
    async def fetch() -> Any:
        raise UpstreamUnreachable("down")

    async def main() -> None:
        with pytest.raises(ProxyError):
            await ModelCatalog(fetch, ttl_s=60).models()

    asyncio.run(main())


def test_openai_list_shape_with_aliases() -> None:
    listing = openai_model_list(MODELS["data"], {"mini": "openai/gpt-4o-mini"})
    assert listing["object"] == "list"
    model, alias = listing["data"]
    assert model == {
        "id": "openai/gpt-4o-mini",
        "object": "model",
        "created": 5,
        "owned_by": "openai",
        "name": "GPT-4o mini",
        "context_length": 128000,
        "pricing": MODELS["data"][0]["pricing"],
    }
    assert alias == {
        "id": "mini",
        "object": "model",
        "created": 5,
        "owned_by": "openrouter-proxy",
        "alias_of": "openai/gpt-4o-mini",
    }


def test_an_alias_named_like_a_catalog_model_is_listed_once_as_the_alias() -> None:
    listing = openai_model_list(MODELS["data"], {"openai/gpt-4o-mini": "openai/gpt-4o-mini:floor"})
    entries = [m for m in listing["data"] if m["id"] == "openai/gpt-4o-mini"]
    assert len(entries) == 1 and entries[0]["alias_of"] == "openai/gpt-4o-mini:floor"
