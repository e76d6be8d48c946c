"""Which failures are retried, which fall back, which stop; and the back-off."""

from __future__ import annotations

import random

import pytest

from proxy.config import RetrySettings
from proxy.errors import (
    ProxyError,
    UpstreamCut,
    UpstreamKeyRejected,
    UpstreamOutOfCredits,
    UpstreamStatusError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from proxy.retry import Decision, backoff_s, judge

CONTEXT = {"message": "This endpoint's maximum context length is 131072 tokens. However, ...", "code": 400}


@pytest.mark.parametrize(
    ("error", "decision", "breaker_failure"),
    [
        (UpstreamUnreachable("reset"), Decision.RETRY, True),
        (UpstreamCut("cut"), Decision.RETRY, True),
        (UpstreamTimeout("slow connect", phase="connect"), Decision.RETRY, True),
        (UpstreamTimeout("silent", phase="first_byte"), Decision.NEXT_MODEL, True),
        (UpstreamTimeout("no token", phase="first_token"), Decision.NEXT_MODEL, True),
        (UpstreamStatusError(408, {"code": 408}), Decision.RETRY, True),
        (UpstreamStatusError(429, {"code": 429}), Decision.RETRY, False),
        (UpstreamStatusError(500, {"code": 500}), Decision.RETRY, True),
        (UpstreamStatusError(502, {"code": 502}), Decision.RETRY, True),
        (UpstreamStatusError(503, {"code": 503}), Decision.RETRY, True),
        (UpstreamStatusError(404, {"code": 404}), Decision.NEXT_MODEL, None),  # may be one caller's doing
        (UpstreamStatusError(400, CONTEXT), Decision.NEXT_MODEL, False),
        (
            UpstreamStatusError(
                400, {"code": 400, "metadata": {"error_type": "context_length_exceeded"}, "message": "x"}
            ),
            Decision.NEXT_MODEL,
            False,
        ),
        (UpstreamStatusError(400, {"code": 400, "message": "bad temperature"}), Decision.STOP, False),
        (UpstreamStatusError(403, {"code": 403, "message": "flagged"}), Decision.STOP, False),
        (UpstreamStatusError(413, {"code": 413}), Decision.STOP, False),
        (UpstreamKeyRejected("key"), Decision.STOP, False),
        (UpstreamOutOfCredits("credits"), Decision.STOP, False),
    ],
)
def test_judge(error: ProxyError, decision: Decision, breaker_failure: bool) -> None:
    verdict = judge(error)
    assert (verdict.decision, verdict.breaker_failure) == (decision, breaker_failure)


def test_retry_after_is_read_from_the_upstream_header() -> None:
    assert judge(UpstreamStatusError(429, {"code": 429}, retry_after="2")).retry_after_s == 2.0
    assert judge(UpstreamStatusError(503, {"code": 503}, retry_after="soon")).retry_after_s is None


def test_backoff_is_full_jitter_capped_and_honours_retry_after() -> None:
    settings = RetrySettings(backoff_base_s=1.0, backoff_cap_s=4.0, max_retry_after_s=10.0)
    rng = random.Random(7)
    for retry, ceiling in ((0, 1.0), (1, 2.0), (2, 4.0), (5, 4.0)):
        waits = [backoff_s(settings, retry, None, rng) for _ in range(500)]
        assert all(w is not None and 0 <= w <= ceiling for w in waits)
        assert max(w for w in waits if w is not None) > ceiling * 0.9  # spread over the whole range
    assert backoff_s(settings, 0, 3.0) == 3.0
    assert backoff_s(settings, 0, 30.0) is None  # too long: fall back instead of waiting
