"""``serve --workers 2``: a ``SO_REUSEPORT`` socket per worker, supervised (``proxy/workers.py``)."""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from proxy import workers as supervisor
from proxy.workers import reuseport_supported
from tests.factories import CLI, free_port, served_cli

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not reuseport_supported(), reason="SO_REUSEPORT is Linux-only"),
]


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                found.append(int(entry))
    return found


def _sockets(port: int, state: str) -> set[str]:
    """Inodes of TCP sockets on local ``port`` in ``state`` (``0A`` listen, ``01`` established)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == state:
                inodes.add(fields[9])
    return inodes


def _held(pid: int, inodes: set[str]) -> int:
    """How many of ``inodes`` process ``pid`` holds (0 once it is gone: a worker reaped meanwhile)."""
    count = 0
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return 0
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        count += link.startswith("socket:[") and link[8:-1] in inodes
    return count


def _workers(pid: int, port: int) -> list[int]:
    """The supervisor's children that listen on ``port`` (not multiprocessing's helper)."""
    listening = _sockets(port, "0A")
    return [child for child in _children(pid) if _held(child, listening)]


def _both_listening(served_pid: int, port: int, timeout_s: float = 30) -> list[int]:
    """The two workers, once both listen (a worker listens a moment after its startup log line)
    and have surely told the supervisor they started (just after they listen): a worker killed
    before that counts as a startup failure of the first set, which stops the service."""
    deadline = time.monotonic() + timeout_s
    while len(workers := _workers(served_pid, port)) < 2:
        assert time.monotonic() < deadline, "the workers never both listened"
        time.sleep(0.05)
    time.sleep(0.3)
    return workers


def test_each_worker_listens_on_its_own_socket_and_takes_a_share(tmp_path: Path) -> None:
    with served_cli(tmp_path, "--workers", "2", startups=2, limits=False) as served:
        port = int(served.url.rsplit(":", 1)[1])
        workers = _both_listening(served.proc.pid, port)
        assert len(workers) == 2
        listening = _sockets(port, "0A")
        assert len(listening) == 2, "the workers share one listening socket"
        assert _held(served.proc.pid, listening) == 0, "the supervisor holds a listening socket"

        conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]
        try:
            for conn in conns:
                conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: proxy\r\n\r\n")
            for conn in conns:
                assert conn.recv(65536).startswith(b"HTTP/1.1 200")
            established = _sockets(port, "01")
            shares = [_held(pid, established) for pid in workers]
            assert sum(shares) == 40 and min(shares) >= 8, shares  # by address hash: ~20 each
        finally:
            for conn in conns:
                conn.close()

        # a worker that dies is replaced, and the port keeps answering meanwhile
        os.kill(workers[0], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now = _workers(served.proc.pid, port)
            if len(now) == 2 and workers[0] not in now:
                break
            assert httpx.get(f"{served.url}/healthz", timeout=5).status_code == 200
            time.sleep(0.1)
        else:
            raise AssertionError(served.log.read_text(errors="replace"))

        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(timeout=30) == 0
    assert not [pid for pid in now if Path(f"/proc/{pid}").exists()], "workers outlived the supervisor"
    log = served.log.read_text(errors="replace")
    assert "starting another" in log and "Stopped supervisor" in log and "killing" not in log


def test_port_zero_gives_every_worker_the_same_free_port(tmp_path: Path) -> None:
    with served_cli(tmp_path, "--workers", "2", "--port", "0", startups=2, limits=False) as served:
        found = re.search(rb"2 workers on http://127\.0\.0\.1:(\d+)", served.log.read_bytes())
        assert found is not None, served.log.read_text(errors="replace")
        port = int(found.group(1))
        assert port != 0 and len(_both_listening(served.proc.pid, port)) == 2
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200


def test_a_taken_port_fails_at_once(tmp_path: Path) -> None:
    port = free_port()
    with socket.create_server(("127.0.0.1", port)):
        (tmp_path / "config.yaml").write_bytes((Path(__file__).parents[1] / "config.yaml").read_bytes())
        done = subprocess.run(
            [str(CLI), "serve", "--upstream", "emulator", "--port", str(port), "--workers", "2"],
            cwd=tmp_path,
            capture_output=True,
            timeout=60,
            env={k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "PROMETHEUS_MULTIPROC_DIR")},
        )
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr.decode()


def _wait_dead(pid: int, timeout_s: float = 10) -> None:
    """Wait until ``pid`` has exited (gone, or a zombie its parent has not reaped yet)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return
        if state in ("Z", "X"):
            return
        assert time.monotonic() < deadline, f"process {pid} did not exit"
        time.sleep(0.01)


def _replaced(served_pid: int, port: int, gone: int, timeout_s: float = 30) -> tuple[list[int], float]:
    """Wait until ``gone`` is no longer a worker and two workers listen again; (workers, seconds)."""
    began = time.monotonic()
    while time.monotonic() - began < timeout_s:
        now = _workers(served_pid, port)
        if len(now) == 2 and gone not in now:
            return now, time.monotonic() - began
        time.sleep(0.05)
    raise AssertionError(f"worker {gone} was not replaced in {timeout_s} s")


def test_a_worker_that_keeps_dying_is_restarted_after_a_growing_wait(tmp_path: Path) -> None:
    with served_cli(tmp_path, "--workers", "2", startups=2, limits=False) as served:
        port = int(served.url.rsplit(":", 1)[1])
        workers = _both_listening(served.proc.pid, port)
        os.kill(workers[0], signal.SIGKILL)  # it ran for less than STABLE_S: a back-off of 1 s
        workers, waited = _replaced(served.proc.pid, port, workers[0])
        assert waited >= 1.0
        fresh = max(workers, key=lambda pid: os.stat(f"/proc/{pid}").st_mtime)
        os.kill(fresh, signal.SIGKILL)  # its replacement died young too: 2 s
        _, waited = _replaced(served.proc.pid, port, fresh)
        assert waited >= 2.0
        assert httpx.get(f"{served.url}/healthz", timeout=5).status_code == 200
    log = served.log.read_text(errors="replace")
    assert "starting another in 1 s" in log and "starting another in 2 s" in log, log


def test_a_replacement_that_cannot_start_is_retried_while_the_others_serve(tmp_path: Path) -> None:
    """A config broken after the start fails the replacement's startup: the supervisor
    keeps the other worker serving and retries until the config is mended."""
    with served_cli(tmp_path, "--workers", "2", startups=2, limits=False) as served:
        port = int(served.url.rsplit(":", 1)[1])
        config = tmp_path / "config.yaml"
        good = config.read_bytes()
        config.write_bytes(good + b"\nserver: [not, a, mapping]\n")
        workers = _both_listening(served.proc.pid, port)
        os.kill(workers[0], signal.SIGKILL)
        _wait_dead(workers[0])  # until then its listening socket may still take (and reset) a probe
        deadline = time.monotonic() + 30
        while b"while starting; starting another" not in served.log.read_bytes():
            assert time.monotonic() < deadline, served.log.read_text(errors="replace")
            assert httpx.get(f"{served.url}/healthz", timeout=5).status_code == 200
            time.sleep(0.1)
        assert served.proc.poll() is None, "the supervisor stopped"
        config.write_bytes(good)
        now, _ = _replaced(served.proc.pid, port, workers[0])
        assert workers[1] in now
        assert httpx.get(f"{served.url}/healthz", timeout=5).status_code == 200


class _Hung:
    """A worker process stub that never finishes its startup."""

    pid = 4242
    exitcode = None

    def __init__(self) -> None:
        self.killed = False

    def is_alive(self) -> bool:
        return not self.killed

    def kill(self) -> None:
        self.killed = True

    def join(self) -> None:
        pass


def test_a_worker_that_overruns_its_startup_is_killed() -> None:
    hung = _Hung()
    slot = supervisor._Slot(proc=hung, started=multiprocessing.Event(), born=time.monotonic() - 5)  # type: ignore[arg-type]
    assert supervisor._watch(slot, startup_timeout_s=10) is False and not hung.killed
    assert supervisor._watch(slot, startup_timeout_s=1) is False and hung.killed
    assert supervisor._watch(slot, startup_timeout_s=1) is True  # now dead: the supervisor takes over


def test_the_back_off_stays_at_its_cap_however_long_a_worker_keeps_failing() -> None:
    dead = _Hung()
    dead.killed = True
    slot = supervisor._Slot(proc=dead, started=multiprocessing.Event(), born=time.monotonic(), failures=5000)  # type: ignore[arg-type]
    supervisor._schedule_restart(slot)
    assert slot.failures == 5001 and slot.proc is None
    assert slot.restart_at - time.monotonic() == pytest.approx(supervisor.BACKOFF_MAX_S, abs=1)


def test_sighup_restarts_the_workers_one_at_a_time_with_the_config_read_again(tmp_path: Path) -> None:
    with served_cli(tmp_path, "--workers", "2", startups=2, limits=False) as served:
        port = int(served.url.rsplit(":", 1)[1])
        before = _both_listening(served.proc.pid, port)
        assert httpx.get(f"{served.url}/metrics", timeout=5).status_code == 200
        config = tmp_path / "config.yaml"
        text = config.read_text()
        assert "metrics:                       # Prometheus, GET /metrics\n  enabled: true\n" in text
        config.write_text(text.replace("enabled: true\n  key_labels", "enabled: false\n  key_labels", 1))
        served.proc.send_signal(signal.SIGHUP)
        deadline, statuses = time.monotonic() + 60, []
        while True:  # never fewer than two listening while the workers are replaced
            now = _workers(served.proc.pid, port)
            if not set(now) & set(before) and len(now) == 2:
                break
            assert time.monotonic() < deadline, served.log.read_text(errors="replace")
            assert len(_sockets(port, "0A")) >= 2
            statuses.append(httpx.get(f"{served.url}/healthz", timeout=5).status_code)
            time.sleep(0.05)
        assert statuses and set(statuses) == {200}
        assert served.proc.poll() is None, "the supervisor stopped"
        assert httpx.get(f"{served.url}/metrics", timeout=5).status_code == 404  # the new config
        for pid in before:
            _wait_dead(pid)
    log = served.log.read_text(errors="replace")
    assert "SIGHUP: restarting 2 workers one at a time" in log and "SIGHUP: the rolling restart is done" in log, log


def test_a_rolling_restart_stops_at_a_broken_config_and_the_old_workers_keep_serving(tmp_path: Path) -> None:
    with served_cli(tmp_path, "--workers", "2", startups=2, limits=False) as served:
        port = int(served.url.rsplit(":", 1)[1])
        before = _both_listening(served.proc.pid, port)
        config = tmp_path / "config.yaml"
        config.write_bytes(config.read_bytes() + b"\nserver: [not, a, mapping]\n")
        served.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while b"the rolling restart stops" not in served.log.read_bytes():
            assert time.monotonic() < deadline, served.log.read_text(errors="replace")
            assert httpx.get(f"{served.url}/healthz", timeout=5).status_code == 200
            time.sleep(0.1)
        assert sorted(_workers(served.proc.pid, port)) == sorted(before)
        assert served.proc.poll() is None


def test_sigttin_adds_a_worker_and_sigttou_drains_one(tmp_path: Path) -> None:
    with served_cli(tmp_path, "--workers", "2", startups=2, limits=False) as served:
        port = int(served.url.rsplit(":", 1)[1])
        before = _both_listening(served.proc.pid, port)
        served.proc.send_signal(signal.SIGTTIN)
        deadline = time.monotonic() + 60
        while len(now := _workers(served.proc.pid, port)) < 3:
            assert time.monotonic() < deadline, served.log.read_text(errors="replace")
            time.sleep(0.05)
        added = (set(now) - set(before)).pop()
        time.sleep(0.3)  # it told the supervisor it started (just after it listens)
        served.proc.send_signal(signal.SIGTTOU)  # the newest goes
        _wait_dead(added)
        assert sorted(_workers(served.proc.pid, port)) == sorted(before)
        for _ in range(3):
            served.proc.send_signal(signal.SIGTTOU)
            time.sleep(0.3)
        deadline = time.monotonic() + 60
        while len(_workers(served.proc.pid, port)) != 1:
            assert time.monotonic() < deadline, served.log.read_text(errors="replace")
            time.sleep(0.05)
        assert httpx.get(f"{served.url}/healthz", timeout=5).status_code == 200
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(timeout=30) == 0
    log = served.log.read_text(errors="replace")
    assert "SIGTTIN: 3 workers" in log and "SIGTTOU: one worker left; keeping it" in log, log


def test_a_worker_that_died_just_before_it_was_retired_is_still_joined_and_forgotten(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    forgotten: list[int] = []
    monkeypatch.setattr(supervisor, "_forget", lambda proc: forgotten.append(proc.pid))
    started: list[supervisor._Slot] = []
    roll = supervisor._Rolling(started.append, startup_timeout_s=10)
    dead, alive = _Hung(), _Hung()
    dead.killed, dead.pid = True, 1111
    slots = [
        supervisor._Slot(proc=alive, started=multiprocessing.Event(), first=False),  # type: ignore[arg-type]
        supervisor._Slot(proc=dead, started=multiprocessing.Event(), first=False),  # type: ignore[arg-type]
    ]
    roll.command(signal.SIGTTOU, slots)  # the last slot goes; its worker had died meanwhile
    assert len(slots) == 1 and roll.retiring == [dead]
    roll.step(slots)
    assert forgotten == [1111] and roll.retiring == []
    roll.command(signal.SIGTTOU, slots)  # never the last one
    assert len(slots) == 1 and not alive.killed
