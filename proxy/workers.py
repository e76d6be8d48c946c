"""``serve --workers N``: N uvicorn servers, each listening on its own ``SO_REUSEPORT`` socket.

uvicorn's own multi-worker mode shares one listening socket among its workers. Under a
burst of new connections the first worker to wake accepts most of them (an event loop
accepts every pending connection per wake-up), and as clients keep their connections
alive, the load stays where it landed: ``loadtests/bench.py`` measured two workers at
0.90 + 0.35 cores with 64 connections. With one socket per worker bound with
``SO_REUSEPORT`` the kernel spreads new connections across the workers by address hash.

The supervisor (this process) checks that the port is free, starts the workers (spawned
processes, so each imports the app afresh), starts a new one when one exits on its own
(dropping the dead one's live gauges from ``/metrics``), and on SIGTERM or SIGINT passes
one SIGTERM on and waits for their graceful shutdown; a second signal kills them. A
worker's socket listens only once its app has started, so no connection waits on a
worker that cannot answer yet.

* A worker of the first set that exits before its startup completed (a bad config, the
  store's scripts refused, a port taken) is a startup failure: the supervisor stops every
  worker and exits 1.
* A replacement is started at once after a worker that ran ``STABLE_S`` seconds or more;
  after one that died sooner, or that failed to start (a config broken since), the next
  start waits 1, 2, 4 ... up to ``BACKOFF_MAX_S`` seconds, so a crash loop cannot spin,
  while the other workers keep serving.
* A worker that has not started after ``startup_timeout_s`` is killed (and counts as
  failed to start).

Signals, as uvicorn's own supervisor takes them:

* SIGHUP: a rolling restart. One worker at a time, a new worker starts (reading the config
  and policies afresh); once it listens, the old one gets SIGTERM and drains. If a new one
  fails to start (say the config is broken), the restart stops there and the old workers
  keep serving.
* SIGTTIN / SIGTTOU: one worker more / one fewer (never fewer than one); the one removed
  drains as on SIGTERM.

Linux only (``SO_REUSEPORT``); elsewhere ``serve`` keeps uvicorn's shared socket.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event as EventType
from types import FrameType
from typing import Any

from proxy.metrics import mark_worker_dead

__all__ = ["BACKOFF_MAX_S", "STABLE_S", "bound_socket", "reuseport_supported", "serve_workers"]

log = logging.getLogger("uvicorn.error")

STABLE_S = 30.0  # a worker that ran this long (seconds) is replaced at once
BACKOFF_MAX_S = 30.0  # the longest wait before restarting a worker that keeps failing
STARTUP_TIMEOUT_S = 120.0
_POLL_S = 0.2
_STOP = (signal.SIGTERM, signal.SIGINT)
_COMMANDS = (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU)


def reuseport_supported() -> bool:
    """``SO_REUSEPORT`` spreads connections over the sockets of a port (Linux 3.9+)."""
    return hasattr(socket, "SO_REUSEPORT") and os.uname().sysname == "Linux"


def bound_socket(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    """A TCP socket bound to ``(host, port)``, not yet listening. Raises ``OSError`` (port taken)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _orphan_watch(parent: int) -> None:
    """Stop this worker (SIGTERM to itself) once its supervisor is gone (killed with -9)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


def _reporting_server(config: Any, started: EventType) -> Any:
    """A ``uvicorn.Server`` that sets ``started`` the moment its startup completed (it then
    listens), so the supervisor never takes a worker that served for its first set's
    startup failure (a polling thread left a window of up to 50 ms)."""
    import uvicorn

    class _Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:
                started.set()

    return _Server(config)


def _worker(config_kwargs: Mapping[str, Any], parent: int, started: EventType) -> None:
    """One worker process: its own socket on the shared port, then uvicorn until stopped.

    It leaves the terminal's process group, so a Ctrl-C reaches the supervisor alone,
    which passes on exactly one SIGTERM (a second signal would make uvicorn skip draining).
    """
    import uvicorn

    os.setpgrp()
    threading.Thread(target=_orphan_watch, args=(parent,), daemon=True).start()
    config = uvicorn.Config(**config_kwargs)
    # bound, not listening: the kernel gives it connections only once uvicorn's server
    # listens on it, after the app's startup, never while this worker cannot answer
    sock = bound_socket(config.host, config.port, reuse_port=True)
    _reporting_server(config, started).run(sockets=[sock])


@dataclass(eq=False)  # slots are told apart by identity
class _Slot:
    """One worker's place: its process (None while a restart waits until ``restart_at``,
    monotonic seconds), when it was started, and its count of consecutive failures."""

    proc: BaseProcess | None = None
    started: EventType | None = None
    born: float = 0.0
    first: bool = True  # of the first set: failing to start stops the supervisor
    failures: int = 0
    restart_at: float = 0.0


def serve_workers(
    config_kwargs: Mapping[str, Any], workers: int, *, startup_timeout_s: float = STARTUP_TIMEOUT_S
) -> int:
    """Run ``workers`` uvicorn servers with ``config_kwargs`` (``uvicorn.Config`` arguments,
    ``host`` and ``port`` included; port 0 picks one free port for all) until SIGTERM or
    SIGINT (a second one kills the workers at once); the exit code (0, or 1 when a worker
    of the first set failed to start or the port is taken). Restarts as the module says."""
    host, port = str(config_kwargs["host"]), int(config_kwargs["port"])
    try:  # a plain bind fails if anything (another proxy's reuse-port sockets too) holds the port
        probe = bound_socket(host, port, reuse_port=False)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", host, port, exc.strerror or exc)
        return 1
    port = probe.getsockname()[1]
    probe.close()
    config_kwargs = {**config_kwargs, "port": port}
    ctx = multiprocessing.get_context("spawn")
    # the handler only appends: anything more could deadlock the loop below
    signals: list[int] = []  # SIGTERM, SIGINT: stop
    commands: list[int] = []  # SIGHUP, SIGTTIN, SIGTTOU

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        (signals if signum in _STOP else commands).append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (*_STOP, *_COMMANDS)}

    def start(slot: _Slot) -> None:
        slot.started = ctx.Event()
        slot.proc = ctx.Process(
            target=_worker, args=(config_kwargs, os.getpid(), slot.started), name="openrouter-proxy-worker"
        )
        slot.born = time.monotonic()
        slot.proc.start()

    slots = [_Slot() for _ in range(workers)]
    roll = _Rolling(start, startup_timeout_s)
    code = 0
    try:
        for slot in slots:
            start(slot)
        scheme = "http://[%s]:%d" if ":" in host else "http://%s:%d"
        log.info("Supervisor [%d]: %d workers on " + scheme + " (SO_REUSEPORT)", os.getpid(), workers, host, port)
        while not signals:
            time.sleep(_POLL_S)
            while commands:
                roll.command(commands.pop(0), slots)
            roll.step(slots)
            for slot in slots:
                if not _watch(slot, startup_timeout_s):
                    continue
                if slot.proc is None:
                    start(slot)
                    continue
                if slot.first:
                    log.error("worker [%s] exited with %s while starting; stopping", slot.proc.pid, slot.proc.exitcode)
                    code = 1
                    signals.append(signal.SIGTERM)
                    break
                _schedule_restart(slot)
    finally:
        running = [slot for slot in slots if slot.proc and slot.started]
        if roll.incoming is not None and roll.incoming[1].proc is not None:
            running.append(roll.incoming[1])
        _stop([(slot.proc, slot.started) for slot in running if slot.proc and slot.started], signals, roll.retiring)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("Stopped supervisor [%d]", os.getpid())
    return code


class _Rolling:
    """SIGHUP's rolling restart and SIGTTIN/SIGTTOU's scaling, one poll at a time.

    ``queue``: the slots still to replace; ``incoming``: ``(old slot, its replacement)``
    while the replacement starts; ``retiring``: workers told to drain (one SIGTERM each),
    joined once they exit."""

    def __init__(self, start: Callable[[_Slot], None], startup_timeout_s: float) -> None:
        self.start = start
        self.startup_timeout_s = startup_timeout_s
        self.queue: list[_Slot] = []
        self.incoming: tuple[_Slot, _Slot] | None = None
        self.retiring: list[BaseProcess] = []

    def command(self, signum: int, slots: list[_Slot]) -> None:
        if signum == signal.SIGHUP:
            if self.queue or self.incoming is not None:
                log.warning("SIGHUP: a rolling restart is already under way")
                return
            self.queue = list(slots)
            log.info("SIGHUP: restarting %d workers one at a time", len(slots))
        elif signum == signal.SIGTTIN:
            slot = _Slot(first=False)
            self.start(slot)
            slots.append(slot)
            log.info("SIGTTIN: %d workers", len(slots))
        elif len(slots) > 1:  # SIGTTOU
            slot = slots.pop()
            if slot in self.queue:
                self.queue.remove(slot)
            self.retire(slot)
            log.info("SIGTTOU: %d workers", len(slots))
        else:
            log.warning("SIGTTOU: one worker left; keeping it")

    def step(self, slots: list[_Slot]) -> None:
        """Join workers that finished draining; move the rolling restart on."""
        for proc in [p for p in self.retiring if not p.is_alive()]:
            proc.join()
            _forget(proc)
            self.retiring.remove(proc)
        if self.incoming is None:
            while self.queue and self.incoming is None:
                old = self.queue.pop(0)
                if old in slots:  # not removed by SIGTTOU meanwhile
                    new = _Slot(first=False)
                    self.start(new)
                    self.incoming = (old, new)
            return
        old, new = self.incoming
        assert new.proc is not None and new.started is not None
        if new.started.is_set():
            self.incoming = None
            if old in slots:
                slots[slots.index(old)] = new
                self.retire(old)
            else:  # removed by SIGTTOU while its replacement started
                self.retire(new)
            if not self.queue:
                log.info("SIGHUP: the rolling restart is done")
        elif _watch(new, self.startup_timeout_s):
            log.error(
                "SIGHUP: a new worker exited with %s while starting; the rolling restart stops and "
                "the %d running workers keep serving",
                new.proc.exitcode,
                len(slots),
            )
            self.incoming = None
            self.queue.clear()

    def retire(self, slot: _Slot) -> None:
        """One SIGTERM: the worker drains and exits; joined (its gauges dropped) by ``step``,
        or at stop. One that died a moment ago is joined the same way."""
        proc = slot.proc
        if proc is None:
            return
        if proc.is_alive() and proc.pid is not None:
            os.kill(proc.pid, signal.SIGTERM)
        self.retiring.append(proc)


def _watch(slot: _Slot, startup_timeout_s: float) -> bool:
    """True when ``slot`` needs the supervisor: its restart is due, or its worker is gone
    (joined, its gauges dropped). Kills a worker that overran its startup."""
    proc, now = slot.proc, time.monotonic()
    if proc is None:
        return now >= slot.restart_at
    started = slot.started is not None and slot.started.is_set()
    if started:
        slot.first = False
    if proc.is_alive():
        if not started and now - slot.born > startup_timeout_s:
            log.error("worker [%s] did not start within %.0f s; killing it", proc.pid, startup_timeout_s)
            proc.kill()
        return False
    proc.join()
    _forget(proc)
    return True


def _schedule_restart(slot: _Slot) -> None:
    """Start the dead worker's replacement at once after a stable run, else after a back-off."""
    assert slot.proc is not None and slot.started is not None
    now = time.monotonic()
    stable = slot.started.is_set() and now - slot.born >= STABLE_S
    slot.failures = 0 if stable else slot.failures + 1
    delay = 0.0 if stable else min(BACKOFF_MAX_S, 2.0 ** min(slot.failures - 1, 16))  # no float overflow
    how = "" if slot.started.is_set() else " while starting"
    log.warning(
        "worker [%s] exited with %s%s; starting another in %.0f s", slot.proc.pid, slot.proc.exitcode, how, delay
    )
    slot.proc, slot.started, slot.restart_at = None, None, now + delay


def _stop(procs: list[tuple[BaseProcess, EventType]], signals: list[int], draining: list[BaseProcess]) -> None:
    """One SIGTERM to each worker, then wait for their graceful shutdown (uvicorn's drain
    and the app's own: usage log, ledger, settlements) however long it takes, unless a
    second signal arrives: then kill them. ``draining`` workers had their SIGTERM already
    (a second one would make uvicorn skip its drain)."""
    first = len(signals)
    for proc, _ in procs:
        if proc.is_alive() and proc.pid is not None:
            os.kill(proc.pid, signal.SIGTERM)
    every = [proc for proc, _ in procs] + draining
    while any(proc.is_alive() for proc in every):
        if len(signals) > max(first, 1):
            log.warning("second signal: killing the workers")
            for proc in every:
                proc.kill()
            break
        time.sleep(0.1)
    for proc in every:
        proc.join()
        _forget(proc)


def _forget(proc: BaseProcess) -> None:
    """Drop a dead worker's live gauges (in-flight requests, breaker states) from /metrics."""
    if proc.pid is not None:
        mark_worker_dead(proc.pid)
