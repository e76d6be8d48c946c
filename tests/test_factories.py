"""``UpstreamLog``, the e2e tests' view of what the emulator received: it must count only its
path, from its mark, even once the emulator's bounded log has rolled over."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import pytest

from .factories import CHAT_PATH, UpstreamLog


@dataclass(eq=False)
class Seen:
    path: str
    model: str = ""


@dataclass
class FakeEmulator:
    requests: deque[Seen]


def test_counts_only_its_path_from_the_mark_also_after_the_log_rolled_over() -> None:
    app = FakeEmulator(deque((Seen(CHAT_PATH, "old") for _ in range(3)), maxlen=4))
    log = UpstreamLog(app)
    assert log.sent() == []
    app.requests.append(Seen("/api/v1/models"))  # the proxy's background price refresh
    app.requests.append(Seen(CHAT_PATH, "a"))
    app.requests.append(Seen(CHAT_PATH, "b"))  # the log is full: the oldest entries fall off
    assert [r.model for r in log.sent()] == ["a", "b"]
    assert [r.path for r in UpstreamLog(app, "/api/v1/models").sent()] == []


def test_a_mark_that_left_the_log_is_an_error_not_a_silent_recount() -> None:
    app = FakeEmulator(deque([Seen(CHAT_PATH)], maxlen=2))
    log = UpstreamLog(app)
    app.requests.extend([Seen(CHAT_PATH), Seen(CHAT_PATH)])
    with pytest.raises(AssertionError, match="mark left"):
        log.sent()


def test_wait_returns_what_there_is_at_the_deadline() -> None:
    app = FakeEmulator(deque(maxlen=10))
    log = UpstreamLog(app)  # an empty log: everything after is new
    app.requests.append(Seen(CHAT_PATH, "only"))
    assert [r.model for r in log.wait(2, timeout=0.05)] == ["only"]
