"""Small factories shared by the tests: a free loopback port, a ``UsageRecord``, and the
README's serve command running in a subprocess."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.types import Usage, UsageRecord

__all__ = ["CHAT_PATH", "ServedCli", "UpstreamLog", "free_port", "served_cli", "usage_record"]


def _ephemeral_ports() -> range:
    """The kernel's range for outgoing connections' local ports (Linux's default when unreadable)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


_EPHEMERAL = _ephemeral_ports()
_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port free right now (released on return, then bound by the caller's server).

    Drawn below the kernel's ephemeral range when there is room, so that no outgoing connection
    (a test's client, a Redis connection) can take it between this release and the caller's
    bind, and never the same port twice in one test session: a server that then fails with
    "address in use" was the cause of a cluster that did not start in CI."""
    low = 10000
    if _EPHEMERAL.start - low >= 2000:
        for _ in range(1000):
            port = random.randrange(low, _EPHEMERAL.start)
            if port in _handed_out:
                continue
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _handed_out.add(port)
            return port
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            chosen: int = sock.getsockname()[1]
        if chosen not in _handed_out:
            _handed_out.add(chosen)
            return chosen


CHAT_PATH = "/api/v1/chat/completions"


def _snapshot(emulator_app: Any) -> list[Any]:
    """The emulator's request log as a list (its server thread may append while we copy)."""
    while True:
        try:
            return list(emulator_app.requests)
        except RuntimeError:  # deque mutated during iteration
            continue


class UpstreamLog:
    """The requests to ``path`` that the emulator received since this object was made,
    oldest first (default: chat completions).

    One path only: the proxy's own background calls (``GET /models`` for prices and the
    catalog) may reach the emulator at any moment, also in the middle of a test. Counted
    from a mark by identity, not by ``len``: the emulator keeps only its last 1000 requests.
    """

    def __init__(self, emulator_app: Any, path: str = CHAT_PATH) -> None:
        self._app = emulator_app
        self._path = path
        items = _snapshot(emulator_app)
        self._mark = items[-1] if items else None

    def sent(self) -> list[Any]:
        items = _snapshot(self._app)
        start = 0
        if self._mark is not None:
            start = next((i + 1 for i in range(len(items) - 1, -1, -1) if items[i] is self._mark), -1)
            if start < 0:
                raise AssertionError("the mark left the emulator's 1000-request log; mark closer to the request")
        return [r for r in items[start:] if r.path == self._path]

    def wait(self, count: int, timeout: float = 3.0) -> list[Any]:
        """``sent()`` once it holds ``count`` requests, or as it is after ``timeout`` seconds:
        the emulator records a request just after its last byte, so a client can see the
        answer a moment before the record exists."""
        deadline = time.monotonic() + timeout
        while True:
            sent = self.sent()
            if len(sent) >= count or time.monotonic() > deadline:
                return sent
            time.sleep(0.005)


def usage_record(
    *,
    key: str = "alice",
    team: str | None = "research",
    model: str = "openai/gpt-4o-mini",
    status: int = 200,
    usage: Usage | None = None,
    generation_id: str | None = "gen-1",
    ts: float | None = None,
    error_code: str | None = None,
    rule: str | None = None,
    extra: dict[str, Any] | None = None,
) -> UsageRecord:
    """A ``UsageRecord`` with sensible defaults (a whole, successful OpenAI answer)."""
    return UsageRecord(
        request_id=f"req-{time.monotonic_ns()}",
        ts=time.time() if ts is None else ts,
        key_name=key,
        team=team,
        requested_model=model,
        routed_model=model,
        rule=rule,
        model=model,
        provider="OpenAI",
        generation_id=generation_id,
        stream=False,
        status=status,
        usage=usage,
        finish_reason="stop",
        latency_s=0.25,
        ttfb_s=0.1,
        error_code=error_code,
        extra=extra,
    )


REPO = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).with_name("openrouter-proxy")


@dataclass
class ServedCli:
    """A running ``openrouter-proxy serve --upstream emulator``: its process, URL and dev key
    (``""`` when an admin key was given: keys then come from the admin API)."""

    proc: subprocess.Popen[bytes]
    url: str
    key: str
    log: Path


@contextmanager
def served_cli(
    folder: Path,
    *args: str,
    startups: int = 1,
    limits: bool = True,
    config: Callable[[str], str] | None = None,
    admin_key: str | None = None,
) -> Iterator[ServedCli]:
    """Run the README's serve command from ``folder`` (a copy of config.yaml, edited by
    ``config`` if given, and policies/, no virtual keys, so it prints a one-time dev key,
    unless ``admin_key`` is given as ``PROXY_ADMIN_KEY``). Output goes to ``folder/proxy.log``.
    On exit the process gets SIGTERM (if still running) and is waited for."""
    text = (REPO / "config.yaml").read_text()
    (folder / "config.yaml").write_text(config(text) if config else text)
    shutil.copytree(REPO / "policies", folder / "policies")
    if not limits:
        (folder / "policies" / "limits.yaml").unlink()
    drop = ("OPENROUTER_API_KEY", "REDIS_URL", "PROXY_DEV_KEY_SHA256", "PROMETHEUS_MULTIPROC_DIR", "PROXY_ADMIN_KEY")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    if admin_key is not None:
        env["PROXY_ADMIN_KEY"] = admin_key
    port = free_port()
    log = folder / "proxy.log"
    command = [
        str(CLI),
        "serve",
        "--upstream",
        "emulator",
        "--port",
        str(port),
        "--config",
        str(folder / "config.yaml"),
    ]
    with (
        log.open("wb") as out,
        subprocess.Popen([*command, *args], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=folder) as proc,
    ):
        try:
            deadline = time.monotonic() + 30
            while log.read_bytes().count(b"Application startup complete") < startups:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(log.read_text(errors="replace"))
                time.sleep(0.05)
            key = re.search(rb"sk-proxy-[A-Za-z0-9_-]+", log.read_bytes())
            assert (key is None) == (admin_key is not None), log.read_text(errors="replace")
            yield ServedCli(proc, f"http://127.0.0.1:{port}", key.group(0).decode() if key else "", log)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
