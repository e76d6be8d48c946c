"""The counter backends' contract: reserve every check of a request at once, settle later.

Two kinds of counters, the same in memory and in Redis:

* **window** (requests, tokens): a sliding window of ``Window.buckets`` sub-buckets. A
  request is admitted when the sum of every live bucket plus its cost fits the limit, so
  no rolling window of the configured length ever holds more than the limit (the counted
  span is between one window and one window plus one bucket long).
* **hold** (concurrency, budgets): ``spent`` plus reservations ("holds") of requests in
  flight, each with a lease; a request is admitted when ``spent + held + cost <= limit``.
  Settling releases the hold and adds the actual spend; a hold whose request never
  settles (worker killed) is released when its lease expires.

``reserve`` is all or nothing: either every check fits and every counter is reserved, or
nothing is written. Times are Unix milliseconds; every method may raise
``proxy.store.StoreUnavailable``.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import NamedTuple, Protocol

from proxy.limits.policy import Window

__all__ = ["Backend", "Check", "CheckState", "Decision", "Release"]


class Check(NamedTuple):
    """One counter to check and reserve. ``window`` None = a hold.

    ``limit`` and ``cost`` are in the counter's unit (requests, tokens, nano-USD);
    ``ttl_ms`` keeps a hold's counter that long after the last write (0 = for ever);
    ``least``: the smallest allotment worth leasing for leased admission (0 = never leased;
    see ``proxy.limits.leased``).
    """

    key: str
    limit: int
    cost: int
    window: Window | None = None
    ttl_ms: int = 0
    least: int = 0


class CheckState(NamedTuple):
    """A counter as the reservation saw it (after reserving, when admitted).

    ``used``: window total, or ``spent + held`` of a hold; ``spent``: a hold's settled
    spend. ``reset_ms``: until the window is empty again. ``retry_ms``: until ``cost``
    would fit (0: fits now; -1: never by waiting, e.g. cost above the limit or a budget
    already spent). ``bucket``: the window bucket written, for settlement.
    """

    used: int
    spent: int = 0
    reset_ms: int = 0
    retry_ms: int = 0
    bucket: int = 0


class Decision(NamedTuple):
    admitted: bool
    states: tuple[CheckState, ...]


class Release(NamedTuple):
    """Settlement of one reserved counter.

    Window: add ``delta`` (actual minus reserved) to ``bucket`` if that bucket is still
    live (never below zero). Hold: release the request's hold if it is still there, and
    add ``spend`` to ``spent``. With ``allotment`` set (Redis only, ``proxy.limits.leased``):
    a hold releases ``delta`` of that allotment (all of it and deletes it when ``bucket`` is
    1) and adds ``spend``, only while the allotment exists; a window returns ``delta`` of
    that allotment (all when -1) to its bucket, once.
    """

    key: str
    window: bool
    bucket: int = 0
    delta: int = 0
    spend: int = 0
    allotment: str = ""


class Backend(Protocol):
    name: str

    async def reserve(
        self,
        checks: Sequence[Check],
        rid: str,
        now_ms: int,
        lease_ms: int,
        *,
        dry: bool = False,
        shape: Hashable | None = None,
    ) -> Decision:
        """Check every counter; when all fit (and not ``dry``) reserve them all for ``rid``.

        ``shape``: calls with the same shape have the same checks but for their costs (a
        backend may cache their encoding)."""

    async def settle(
        self, releases: Sequence[Release], rid: str, now_ms: int, *, shape: Hashable | None = None
    ) -> list[int]:
        """Apply ``releases`` of request ``rid``; returns each hold's ``spent`` afterwards (0 for windows).

        An empty list: the backend applies them later, in a batch, and reports each budget's
        spend then (``LeasedBackend.on_spent``). ``shape``: calls with the same shape release
        the same keys the same way."""

    async def add_spend(self, keys: Sequence[str], delta: int) -> list[int]:
        """Add ``delta`` (nano-USD, may be negative; never below zero) to the ``spent`` of each
        budget hold in ``keys`` that exists (a correction found after settlement); each
        one's ``spent`` afterwards (-1: it does not exist)."""
