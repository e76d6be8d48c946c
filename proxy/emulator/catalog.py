"""Model catalog: the ``/models`` table, per-token prices and model-id resolution.

Source: ``data/models.json`` (the four entries of the shared ``fixtures/models.json`` plus
composed entries for gpt-4o-mini, gpt-4o, Claude Haiku/Sonnet 4.5 and paid Llama 3.3 70B,
same Model object shape and key order, openrouter-api.md §6.1).  Prices there are decimal
strings in USD per token and are kept as ``Decimal``.  Variant suffixes (§1.4) resolve to
their base model's price; ``:free`` only where a ``…:free`` entry exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

import orjson

__all__ = ["VARIANTS", "Catalog", "ModelInfo", "ResolvedModel"]

VARIANTS: Final = frozenset({"nitro", "floor", "online", "thinking", "exacto", "extended"})

_PROVIDERS: Final = {  # author -> (display name, endpoint tag); served-by values as in the fixtures
    "openai": ("OpenAI", "openai"),
    "anthropic": ("Anthropic", "anthropic"),
    "meta-llama": ("DeepInfra", "deepinfra/bf16"),
    "qwen": ("DeepInfra", "deepinfra/fp8"),
}
_FALLBACK_PROVIDER: Final = ("DeepInfra", "deepinfra")
_ENDPOINT_STATS: Final = {
    "latency_last_30m": {"p50": 0.31, "p75": 0.42, "p90": 0.6, "p99": 1.2},
    "throughput_last_30m": {"p50": 142.5, "p75": 120.1, "p90": 96.4, "p99": 51.7},
}


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """One catalog entry, reduced to what the completion path needs."""

    id: str
    canonical_slug: str
    author: str
    provider: str
    """Display name of the serving provider (response ``provider``, ``x-provider-name``)."""
    prompt_price: Decimal
    """USD per prompt token."""
    completion_price: Decimal
    """USD per completion token."""
    reasoning: bool
    """Model supports reasoning (``reasoning`` in ``supported_parameters``)."""
    reasoning_default: bool
    """``reasoning.default_enabled`` of the entry: reasons unless told not to."""
    context_length: int
    """Tokens of prompt + output the model accepts (``context_length`` of the entry)."""


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    """A request's model id resolved against the catalog."""

    requested: str
    """The id as the client wrote it, echoed in the response ``model``."""
    info: ModelInfo
    thinking: bool
    """The ``:thinking`` variant was asked for: reasoning is forced on."""


class Catalog:
    """Immutable after construction; response bodies are precomputed bytes."""

    def __init__(self, entries: list[dict[str, Any]], endpoint_fixture: dict[str, Any]) -> None:
        self._by_id: dict[str, ModelInfo] = {}
        self._endpoints: dict[str, bytes] = {}
        for entry in entries:
            self._by_id[entry["id"]] = _model_info(entry)
        for entry in entries:  # canonical slugs are aliases unless an id already owns them
            self._by_id.setdefault(entry["canonical_slug"], self._by_id[entry["id"]])
        for entry in entries:
            fixture_id = endpoint_fixture["data"]["id"]
            doc = endpoint_fixture if entry["id"] == fixture_id else _endpoints_doc(entry)
            body = orjson.dumps(doc)
            self._endpoints.setdefault(entry["id"], body)
            self._endpoints.setdefault(entry["canonical_slug"], body)
        self.models_body: bytes = orjson.dumps({"data": entries, "total_count": len(entries), "links": {"next": None}})
        """``GET /api/v1/models`` response body."""

    @classmethod
    def load(cls, data_dir: Path) -> Catalog:
        """Read ``models.json`` and ``fixtures/model_endpoints.json`` from ``data_dir``."""
        models = orjson.loads((data_dir / "models.json").read_bytes())
        endpoints = orjson.loads((data_dir / "fixtures" / "model_endpoints.json").read_bytes())
        return cls(models["data"], endpoints)

    def resolve(self, model_id: str) -> ResolvedModel | None:
        """Resolve ``author/slug[:variant…]``; ``None`` if unknown or a variant is invalid."""
        info = self._by_id.get(model_id)
        if info is not None:
            return ResolvedModel(model_id, info, thinking=False)
        base, *suffixes = model_id.split(":")
        if not suffixes:
            return None
        if "free" in suffixes:
            info = self._by_id.get(base + ":free")
            suffixes.remove("free")
        else:
            info = self._by_id.get(base)
        if info is None or not all(s in VARIANTS for s in suffixes):
            return None
        return ResolvedModel(model_id, info, thinking="thinking" in suffixes)

    def endpoints_body(self, model_id: str) -> bytes | None:
        """``GET /api/v1/models/{author}/{slug}/endpoints`` body for an id or canonical slug."""
        return self._endpoints.get(model_id)


def _model_info(entry: dict[str, Any]) -> ModelInfo:
    author = entry["id"].split("/", 1)[0]
    reasoning = entry.get("reasoning") or {}
    return ModelInfo(
        id=entry["id"],
        canonical_slug=entry["canonical_slug"],
        author=author,
        provider=_PROVIDERS.get(author, _FALLBACK_PROVIDER)[0],
        prompt_price=Decimal(entry["pricing"]["prompt"]),
        completion_price=Decimal(entry["pricing"]["completion"]),
        reasoning="reasoning" in entry["supported_parameters"],
        reasoning_default=bool(reasoning.get("default_enabled", False)),
        context_length=int(entry["context_length"]),
    )


def _endpoints_doc(entry: dict[str, Any]) -> dict[str, Any]:
    """Compose a §6.2 document with one endpoint, in the key order of the fixture."""
    provider, tag = _PROVIDERS.get(entry["id"].split("/", 1)[0], _FALLBACK_PROVIDER)
    top = entry["top_provider"]
    endpoint = {
        "name": f"{provider} | {entry['canonical_slug']}",
        "model_id": entry["canonical_slug"],
        "model_name": entry["name"],
        "context_length": top["context_length"],
        "pricing": entry["pricing"],
        "provider_name": provider,
        "tag": tag,
        "quantization": tag.rpartition("/")[2] if "/" in tag else "unknown",
        "max_completion_tokens": top["max_completion_tokens"],
        "max_prompt_tokens": None,
        "supported_parameters": entry["supported_parameters"],
        "status": 0,
        "uptime_last_30m": 100,
        "uptime_last_5m": 100,
        "uptime_last_1d": 100,
        "supports_implicit_caching": "input_cache_read" in entry["pricing"],
        **_ENDPOINT_STATS,
    }
    keys = ("id", "name", "created", "description", "architecture")
    return {"data": {**{k: entry[k] for k in keys}, "endpoints": [endpoint]}}
