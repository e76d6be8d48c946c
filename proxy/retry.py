"""What to do after a failed upstream attempt: retry the model, try the next, or stop.

Applies only before a stream's commit point (README, "Resilience"). The rules:

=============================================  ===========  ==========================
failure                                        decision     counts against the breaker
=============================================  ===========  ==========================
connection error or reset before the head      retry        yes
body broke off before anything was sent        retry        yes
connect timeout                                retry        yes
408, 500, 502, 503, 524, 529                   retry        yes
429 (Retry-After honoured up to a limit)       retry        no
no response head in time (silent provider)     next model   yes
no first token in time                         next model   yes
404 (no endpoint for the model and request)   next model   neither
400 context length exceeded                    next model   no
other 4xx (400, 403 moderation, 413, 422),     stop         no
the proxy's own key refused (401), credits
=============================================  ===========  ==========================

A 404 counts neither way (``breaker_failure`` is ``None``; a half-open probe it took is given
back): OpenRouter answers it for a model gone, but also for what one caller asked
(``provider.only`` naming no live provider, a data policy, tools the endpoints lack), and a
breaker is shared by every tenant and replica, so one tenant could otherwise shut a model
off for all, or keep a failing one's breaker closed with 404s counted as successes.

A retry whose wait would pass the request's deadline, or whose ``Retry-After`` exceeds
``max_retry_after_s``, becomes "next model". Back-off: exponential with full jitter.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass

from proxy.config import RetrySettings
from proxy.errors import (
    ProxyError,
    UpstreamCut,
    UpstreamStatusError,
    UpstreamTimeout,
    UpstreamUnreachable,
)

__all__ = ["Decision", "Verdict", "backoff_s", "judge"]

_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 524, 529})


class Decision(enum.Enum):
    RETRY = "retry"
    NEXT_MODEL = "next_model"
    STOP = "stop"


@dataclass(frozen=True, slots=True)
class Verdict:
    """``decision``; ``breaker_failure``: count it as the model being unhealthy (``None``:
    count it neither way); ``retry_after_s``: the upstream's ``Retry-After`` in seconds, if
    it gave one."""

    decision: Decision
    breaker_failure: bool | None
    retry_after_s: float | None = None


def _is_context_length(error: UpstreamStatusError) -> bool:
    metadata = error.upstream.get("metadata")
    if isinstance(metadata, dict) and metadata.get("error_type") == "context_length_exceeded":
        return True
    return "context length" in error.message.lower()


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def judge(error: ProxyError) -> Verdict:
    """Classify a failed attempt (see the module table)."""
    if isinstance(error, UpstreamTimeout):
        if error.phase == "connect":
            return Verdict(Decision.RETRY, True)
        return Verdict(Decision.NEXT_MODEL, True)
    if isinstance(error, UpstreamUnreachable | UpstreamCut):
        return Verdict(Decision.RETRY, True)
    if isinstance(error, UpstreamStatusError):
        status = error.upstream_status
        if status in _RETRY_STATUSES:
            return Verdict(Decision.RETRY, status != 429, _retry_after(error.retry_after))
        if status == 404:
            return Verdict(Decision.NEXT_MODEL, None)
        if status == 400 and _is_context_length(error):
            return Verdict(Decision.NEXT_MODEL, False)
    return Verdict(Decision.STOP, False)


def backoff_s(
    settings: RetrySettings, retry: int, retry_after_s: float | None, rng: random.Random | None = None
) -> float | None:
    """Seconds to wait before retry number ``retry`` (0-based), or ``None``: do not retry.

    Honours ``Retry-After`` when it is at most ``max_retry_after_s``; otherwise full jitter
    over ``min(backoff_cap_s, backoff_base_s * 2**retry)``.
    """
    if retry_after_s is not None:
        return retry_after_s if retry_after_s <= settings.max_retry_after_s else None
    ceiling = min(settings.backoff_cap_s, settings.backoff_base_s * (2**retry))
    return (rng or random).uniform(0, ceiling)
