"""``ReloadingRouter``: a ``Router`` that follows ``policies/routing.yaml`` without a restart.

Each worker process watches for itself: a background task compares the file's
``(mtime_ns, size)`` every ``interval_s`` seconds (default 1), and SIGHUP makes the worker
reload at once (when the worker owns the event loop's main thread; with ``--workers N``
the supervisor answers SIGHUP by restarting its workers one at a time, and they load the
file too: ``proxy.workers``).

A new version is parsed and compiled off the event loop, then swapped in atomically. An
invalid version is rejected with every problem logged, and the last good policy stays in
force until the file changes again; so does a file that disappeared or became empty (a
deploy that deletes and rewrites it, or truncates before writing, must not lift every
rule meanwhile: write ``rules: []`` to clear the policy on purpose). Requests already
decided keep their ``RoutePlan``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path

from proxy.routing.router import ROUTING_FILE, Router, load_policy
from proxy.yamlsrc import ConfigError

__all__ = ["ReloadingRouter"]

log = logging.getLogger("proxy.routing")

Signature = tuple[int, int] | None


def _signature(path: Path) -> Signature:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


class ReloadingRouter(Router):
    """Loads ``policies_dir/routing.yaml`` now (raising ``ConfigError`` if it is invalid)
    and, between ``start()`` and ``stop()``, again whenever it changes or on SIGHUP."""

    def __init__(self, policies_dir: Path, *, interval_s: float = 1.0) -> None:
        self.path = policies_dir / ROUTING_FILE
        self.policies_dir = policies_dir
        self.interval_s = interval_s
        self._seen = _signature(self.path)
        super().__init__(load_policy(policies_dir))
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._hup = False
        self._hup_task: asyncio.Task[bool] | None = None
        self.reloads = 0
        """Policies put in force since start (valid edits only)."""
        self.rejected = 0
        """Invalid edits rejected since start."""

    async def start(self) -> None:
        """Start watching; install the SIGHUP handler when this thread may."""
        if self._task is None:
            self._task = asyncio.create_task(self._watch(), name="routing-policy-watch")
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
            self._hup = True
        except (NotImplementedError, RuntimeError, ValueError, AttributeError):
            log.debug("SIGHUP reload not available in this thread; watching %s only", self.path)

    async def stop(self) -> None:
        """Stop watching and remove the SIGHUP handler."""
        if self._hup:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            self._hup = False
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def reload(self) -> bool:
        """Load the file now. True when a new policy is in force, False when the file was
        rejected (logged; the last good policy stays) or unchanged in meaning."""
        async with self._lock:
            self._seen = _signature(self.path)
            if self._seen is None or self._seen[1] == 0:  # gone or emptied: a deploy mid-write, say
                self.rejected += 1
                state = "missing" if self._seen is None else "empty"
                log.error("routing policy %s is %s; keeping policy %s", self.path, state, self.policy_hash)
                return False
            try:
                compiled = await asyncio.to_thread(load_policy, self.policies_dir)
            except ConfigError as exc:
                self.rejected += 1
                log.error("routing policy %s rejected; keeping policy %s:\n%s", self.path, self.policy_hash, exc)
                return False
            if compiled.policy_hash == self.policy_hash:
                return False
            old = self.policy_hash
            self.swap(compiled)
            self.reloads += 1
            log.info(
                "routing policy reloaded: %s -> %s (%d aliases, %d rules)",
                old,
                compiled.policy_hash,
                len(compiled.aliases),
                len(compiled.rules),
            )
            return True

    def _on_sighup(self) -> None:
        log.info("SIGHUP: reloading %s", self.path)
        self._hup_task = asyncio.get_running_loop().create_task(self.reload())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            if _signature(self.path) != self._seen:
                try:
                    await self.reload()
                except Exception:
                    log.exception("routing policy reload failed")
