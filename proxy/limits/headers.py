"""OpenAI's rate-limit headers and the 429 errors, built from a reservation's outcome.

Admitted responses carry ``x-ratelimit-limit-requests``, ``x-ratelimit-remaining-requests``,
``x-ratelimit-reset-requests`` and the same three for ``-tokens``, for the most
constrained applicable limit of each kind (the one with the fewest remaining); reset is
the time until that window is empty again, in OpenAI's format (``250ms``, ``1s``, ``6m0s``,
``1h2m3s``). A rejected request gets 429 with ``retry-after`` (whole seconds, rounded up)
and ``retry-after-ms``, which OpenAI SDKs honour before their own back-off, and an error
naming the limit that was hit. Final rejections (a budget spent for its period, a request
larger than a limit) add ``x-should-retry: false``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from proxy.errors import QuotaExceeded, RateLimited
from proxy.limits.backend import CheckState
from proxy.limits.policy import NANO, Bound

__all__ = ["HeaderPlan", "binding_check", "format_reset", "header_plan", "limit_error", "ratelimit_headers"]

_CONCURRENCY_RETRY_MS = 1000


def format_reset(ms: int) -> str:
    """OpenAI's reset format: ``0s``, ``250ms``, ``1.5s``, ``6m0s``, ``1h2m3s``."""
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{round(seconds, 3):g}s"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes}m{secs}s" if hours else f"{minutes}m{secs}s"


HeaderPlan = tuple[tuple[tuple[bytes, bytes, bytes], tuple[tuple[int, int], ...]], ...]


def header_plan(bounds: Sequence[Bound]) -> HeaderPlan:
    """For ``requests`` and ``tokens``: the three header names and ``(check index, limit)`` of
    each applicable window (kinds without one are left out)."""
    plan = []
    for metric in ("requests", "tokens"):
        windows = tuple((i, b.rule.limit) for i, b in enumerate(bounds) if b.rule.metric == metric)
        if windows:
            names = (
                f"x-ratelimit-limit-{metric}".encode(),
                f"x-ratelimit-remaining-{metric}".encode(),
                f"x-ratelimit-reset-{metric}".encode(),
            )
            plan.append((names, windows))
    return tuple(plan)


def ratelimit_headers(
    bounds: Sequence[Bound], states: Sequence[CheckState], plan: HeaderPlan | None = None
) -> list[tuple[bytes, bytes]]:
    """``x-ratelimit-*`` for the tightest ``requests`` and ``tokens`` window (``plan``:
    ``header_plan(bounds)``, when the caller keeps it)."""
    headers: list[tuple[bytes, bytes]] = []
    for (limit_name, remaining_name, reset_name), windows in plan or header_plan(bounds):
        best_remaining, best_limit, best_reset = -1, 0, 0
        for i, limit in windows:
            state = states[i]
            remaining = limit - state.used
            if remaining < 0:
                remaining = 0
            if best_remaining < 0 or remaining < best_remaining:
                best_remaining, best_limit, best_reset = remaining, limit, state.reset_ms
        headers += (
            (limit_name, b"%d" % best_limit),
            (remaining_name, b"%d" % best_remaining),
            (reset_name, format_reset(best_reset).encode()),
        )
    return headers


def _retry_headers(retry_ms: int) -> list[tuple[bytes, bytes]]:
    return [
        (b"retry-after", str(max(1, math.ceil(retry_ms / 1000))).encode()),
        (b"retry-after-ms", str(retry_ms).encode()),
    ]


def binding_check(states: Sequence[CheckState]) -> int:
    """Index of the failed check that decides a rejection.

    A final failure (``retry_ms`` -1) wins over a temporary one; among temporary ones the
    longest wait wins (retrying sooner would fail anyway).
    """
    failed = [i for i, s in enumerate(states) if s.retry_ms != 0]
    return max(failed, key=lambda j: (states[j].retry_ms < 0, states[j].retry_ms))


def limit_error(
    i: int, bounds: Sequence[Bound], states: Sequence[CheckState], costs: Sequence[int], period_end_ms: Sequence[int]
) -> RateLimited:
    """The error for a rejection decided by check ``i`` (see ``binding_check``).

    ``period_end_ms`` gives, per check, the time until a budget's period ends (0: never).
    """
    bound, state, cost = bounds[i], states[i], costs[i]
    rule = bound.rule
    headers = ratelimit_headers(bounds, states)
    if rule.metric == "budget":
        limit, spent, held = rule.limit / NANO, state.spent / NANO, (state.used - state.spent) / NANO
        if state.retry_ms < 0:
            message = (
                f"Budget exceeded for {bound.who}: {rule.name} is {limit:.2f} USD, {spent:.6f} USD spent; "
                f"this request may cost up to {cost / NANO:.6f} USD."
            )
            wait = period_end_ms[i]
            return QuotaExceeded(message, headers=headers + (_retry_headers(wait) if wait > 0 else []), final=True)
        message = (
            f"Budget of {bound.who} is reserved by requests in flight: {rule.name} is {limit:.2f} USD, "
            f"{spent:.6f} USD spent and {held:.6f} USD reserved; this request may cost up to {cost / NANO:.6f} USD. "
            "Retry shortly."
        )
        return QuotaExceeded(message, headers=headers + _retry_headers(_CONCURRENCY_RETRY_MS))
    if rule.metric == "concurrent":
        message = f"Too many concurrent requests for {bound.who}: limit {rule.limit} in flight."
        return RateLimited(message, headers=headers + _retry_headers(_CONCURRENCY_RETRY_MS))
    unit = "tokens" if rule.metric == "tokens" else "requests"
    if state.retry_ms < 0:
        message = f"Request too large for {bound.who}: {rule.name} is {rule.limit}, this request needs {cost} {unit}."
        return RateLimited(message, headers=headers, final=True)
    message = (
        f"Rate limit reached for {bound.who} on {rule.name}: limit {rule.limit}, used {state.used}, "
        f"requested {cost}. Please try again in {format_reset(state.retry_ms)}."
    )
    return RateLimited(message, headers=headers + _retry_headers(state.retry_ms))
