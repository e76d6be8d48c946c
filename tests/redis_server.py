"""A real ``redis-server`` on a free loopback port, for tests (no persistence)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from .factories import free_port


def redis_binary() -> str:
    """The ``redis-server`` path; skip the test without one (fail it with REQUIRE_REDIS=1, as in CI)."""
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("REQUIRE_REDIS") == "1":
            pytest.fail("redis-server is not installed and REQUIRE_REDIS=1")
        pytest.skip("redis-server is not installed")
    return binary


def _log_tail(path: Path) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-3:])
    except OSError:
        return "no log"


def _start(binary: str, port: int, args: list[str], workdir: str) -> subprocess.Popen[bytes]:
    """One ``redis-server`` on ``127.0.0.1:port`` with its output in ``workdir/redis-<port>.log``."""
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    with Path(workdir, f"redis-{port}.log").open("wb") as log:
        return subprocess.Popen([*argv, "--dir", workdir, *args], stdout=log, stderr=subprocess.STDOUT)


def _wait_ready(proc: subprocess.Popen[bytes], port: int, deadline: float) -> bool:
    """Wait for ``+PONG`` on ``port``; False at once if the server exited (a port taken after all)."""
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    return proc.poll() is None  # not another process's server on a port ours lost
        except OSError:
            pass
        if proc.poll() is not None:
            return False
        if time.monotonic() > deadline:
            raise RuntimeError(f"redis-server on port {port} did not answer within its deadline")
        time.sleep(0.02)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(timeout=10)


ATTEMPTS = 3  # fresh ports each time a server exits at start


def _start_servers(
    binary: str, workdir: str, count: int, args_of: Callable[[int], list[str]] = lambda port: []
) -> tuple[list[subprocess.Popen[bytes]], list[int]]:
    """``count`` redis-servers on fresh free ports (``args_of(port)``: their extra arguments),
    all answering PING. When one exits at start (its port was taken after all), all are
    stopped and started again on new ports, up to ``ATTEMPTS`` times; then ``RuntimeError``
    quoting that server's log."""
    for attempt in range(ATTEMPTS):
        ports = [free_port() for _ in range(count)]
        procs = [_start(binary, port, args_of(port), workdir) for port in ports]
        try:
            deadline = time.monotonic() + 10
            if all(_wait_ready(proc, port, deadline) for proc, port in zip(procs, ports, strict=True)):
                return procs, ports
        except BaseException:
            _stop(procs)
            raise
        exited = next(port for proc, port in zip(procs, ports, strict=True) if proc.poll() is not None)
        _stop(procs)
        if attempt == ATTEMPTS - 1:
            raise RuntimeError(f"redis-server did not start: {_log_tail(Path(workdir, f'redis-{exited}.log'))}")
    raise AssertionError("unreachable")


@contextmanager
def redis_server() -> Iterator[str]:
    """Yield ``redis://127.0.0.1:<port>/0``; skip (or fail with REQUIRE_REDIS=1) without redis-server."""
    binary = redis_binary()
    with tempfile.TemporaryDirectory() as workdir:
        procs, (port,) = _start_servers(binary, workdir, 1)
        try:
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            _stop(procs)


@contextmanager
def redis_cluster(nodes: int = 3) -> Iterator[str]:
    """Yield ``redis+cluster://127.0.0.1:<port>``: a Redis Cluster of ``nodes`` primaries on
    free loopback ports, the 16384 slots split evenly (no replicas, no persistence); skip
    (or fail with REQUIRE_REDIS=1) without redis-server."""
    import redis

    binary = redis_binary()
    with tempfile.TemporaryDirectory() as workdir:
        bus_of: dict[int, int] = {}  # the default bus port, port + 10000, may be taken or past 65535

        def cluster_args(port: int) -> list[str]:
            bus_of[port] = free_port()
            args = ["--cluster-enabled", "yes", "--cluster-node-timeout", "15000", "--cluster-port"]
            return [*args, str(bus_of[port]), "--cluster-config-file", f"nodes-{port}.conf"]

        procs, ports = _start_servers(binary, workdir, nodes, cluster_args)
        buses = [bus_of[port] for port in ports]
        try:
            clients = [redis.Redis(port=port, socket_timeout=2) for port in ports]
            share = 16384 // nodes
            for i, client in enumerate(clients):
                last = 16383 if i == nodes - 1 else (i + 1) * share - 1
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", i * share, last)
            # Every node meets every other one: a single node's MEETs leave the rest to gossip,
            # which took up to 6 s here (and past a 20 s deadline once in CI). A handshake that
            # failed is dropped by Redis, never retried, so the MEETs are sent again until every
            # node knows all the others.
            deadline = time.monotonic() + 30
            met = 0.0
            while not all(b"cluster_state:ok" in client.execute_command("CLUSTER", "INFO") for client in clients):
                if time.monotonic() > deadline:
                    raise RuntimeError("the Redis Cluster did not come up")
                if time.monotonic() - met > 3:
                    met = time.monotonic()
                    for i, client in enumerate(clients):
                        if f"cluster_known_nodes:{nodes}".encode() in client.execute_command("CLUSTER", "INFO"):
                            continue
                        for port, bus in zip(ports[i + 1 :] + ports[:i], buses[i + 1 :] + buses[:i], strict=True):
                            client.execute_command("CLUSTER", "MEET", "127.0.0.1", port, bus)
                time.sleep(0.05)
            for client in clients:  # every node must know every slot's owner before clients ask
                while len(client.execute_command("CLUSTER", "SLOTS")) < nodes:
                    if time.monotonic() > deadline:
                        raise RuntimeError("the Redis Cluster did not agree on its slots")
                    time.sleep(0.05)
                client.close()
            yield f"redis+cluster://127.0.0.1:{ports[0]}"
        finally:
            _stop(procs)


def flush(url: str) -> None:
    """Empty the Redis (every primary of a ``redis+cluster://`` one) behind ``url``."""
    import redis

    from proxy.store.redis import cluster_url

    plain = cluster_url(url)
    if plain is None:
        with redis.Redis.from_url(url) as client:
            client.flushdb()
        return
    with redis.RedisCluster.from_url(plain) as cluster:
        cluster.flushall(target_nodes=redis.RedisCluster.PRIMARIES)
