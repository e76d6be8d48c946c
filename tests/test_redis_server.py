"""The tests' own redis-server fixtures start on a port someone else took in the meantime:
a CI run once lost every Redis Cluster test to a node that could not bind its port."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from . import redis_server
from .factories import free_port


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port held by a listening socket for the test's duration."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield held.getsockname()[1]


def test_free_port_avoids_the_ephemeral_range_and_never_repeats() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    if low >= 12000:
        assert all(port < low for port in ports)


@pytest.mark.parametrize("start", [redis_server.redis_server, redis_server.redis_cluster])
def test_a_server_that_cannot_bind_is_started_again_on_new_ports(
    start: object, taken_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    redis_server.redis_binary()  # skip (or fail under REQUIRE_REDIS=1) without redis-server
    handed: list[int] = []

    def first_taken() -> int:
        handed.append(taken_port if not handed else free_port())
        return handed[-1]

    monkeypatch.setattr(redis_server, "free_port", first_taken)
    with start() as url:  # type: ignore[operator]
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        assert port != taken_port
        with redis.Redis(port=port) as client:
            assert client.ping()
    assert handed[0] == taken_port and len(handed) > 1


def test_a_server_that_never_binds_reports_why(taken_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    redis_server.redis_binary()
    monkeypatch.setattr(redis_server, "free_port", lambda: taken_port)
    with pytest.raises(RuntimeError, match="Address already in use"), redis_server.redis_server():
        pass
