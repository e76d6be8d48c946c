"""The ``Store`` protocol and the values it returns.

The usage ledger (stream, per-day rollups, reconciliation tickets) is a part of every
store, ``store.usage``; its contract and values live in ``proxy.store.usage``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, NamedTuple, Protocol

if TYPE_CHECKING:
    from proxy.store.usage import UsageLedger

__all__ = ["Reachability", "Store", "StoreUnavailable", "day_of", "nano_usd"]


class Reachability(NamedTuple):
    """A store probe's answer: how many nodes serve the store (1, or a Redis Cluster's
    primaries), the ``host:port`` of each that did not answer, and whether a failure
    points at the configuration rather than an outage (the password was refused, the
    host name does not resolve)."""

    nodes: int
    unreachable: list[str]
    misconfigured: bool = False


class StoreUnavailable(Exception):
    """The store could not be reached or answered with an error."""


def nano_usd(cost_usd: float | None) -> int:
    """USD as integer nano-USD, rounded to the nearest (``None`` -> 0)."""
    return 0 if cost_usd is None else round(cost_usd * 1_000_000_000)


def day_of(ts: float) -> str:
    """UTC calendar day of a Unix time, ``YYYY-MM-DD``."""
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


class Store(Protocol):
    """What the pipeline needs from shared state. Every method may raise ``StoreUnavailable``."""

    name: str

    @property
    def usage(self) -> UsageLedger:
        """The usage ledger: stream, per-day rollups and reconciliation tickets."""

    async def ping(self) -> bool:
        """True when the store answers (every primary of a Redis Cluster)."""

    async def ping_nodes(self) -> Reachability:
        """One ``PING`` to every node (each primary of a Redis Cluster)."""

    async def breaker_publish(self, target: str, open_until: float) -> None:
        """Share that ``target``'s circuit breaker is open until ``open_until`` (Unix s)."""

    async def breaker_states(self) -> dict[str, float]:
        """Every published open breaker: target -> Unix time it closes (may be past)."""

    async def cache_get(self, key: str) -> bytes | None:
        """The response-cache value stored under ``key``; ``None`` when absent or expired."""

    async def cache_set(self, key: str, value: bytes, ttl_s: float) -> None:
        """Store a response-cache value for ``ttl_s`` seconds (older entries may be evicted)."""

    async def aclose(self) -> None:
        """Release connections."""
