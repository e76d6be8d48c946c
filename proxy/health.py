"""Readiness and upstream health (``/healthz``, liveness, stays in ``proxy.app``).

``GET /readyz`` says whether this instance can serve chat completions::

    {"status": "ready" | "degraded" | "not_ready",
     "store": {"backend": "redis" | "memory", "reachable": bool,
               "nodes": int, "unreachable_nodes": int},
     "limits": {"failure_policy": "fail_open" | "fail_closed", "degraded": bool,
                "down_for_s": float | null, "degraded_total": int},
     "breakers": {...}}

``reachable``: every node answered a ``PING`` (each primary of a Redis Cluster, since a dead
primary leaves its slots' counters unreachable). The status:

* ``ready`` (200): every node answers;
* ``degraded`` (200): some do not, or none under ``limits.failure_policy: fail_open``. The
  instance still serves (on local limits), and every replica shares the store, so a 503
  would take them all out of the load balancer at once. (A partial outage under
  ``fail_closed`` is ``degraded`` too, though the limiter then answers 503 to more than the
  dead node's teams: after any request fails to reach the store, it decides every request
  by the failure policy for ``limits.store_retry_s``.)
* ``not_ready`` (503): no node answers under ``fail_closed`` (chat completions would be
  503s), or the store refused the password or its host does not resolve and has not
  answered since this worker started (a wrong ``REDIS_URL`` must fail a rollout; an
  outage, a refused or silent connection, must not take out workers restarted meanwhile).

A probe result serves ``PROBE_TTL_S`` (1 s), one probe runs at a time on connections of
its own (``proxy.store.redis_probe``, each node bounded to 0.4 s) and is never cancelled,
and ``/readyz`` waits for it at most ``PROBE_WAIT_S`` (0.5 s, under Kubernetes' default 1 s
probe timeout). Past that, the previous answer serves if it is at most ``PROBE_STALE_S``
(5 s) old; otherwise every node counts as not answering. ``limits``: the limiter's view from
the requests (``degraded`` while it decides without the store; no I/O). ``breakers``: how
many circuit breakers are ``open`` and ``half_open`` (informational: an open breaker does
not make the instance unready, since every replica would share it; which ones is in the
metrics, ``breaker_state``, behind their token). No address, model name, key or error text
is returned (the endpoint is unauthenticated: a breaker's name is a model some tenant asked
for, or the upstream's base URL); the names of unreachable nodes are logged when they change.

``GET /health/upstream``: is OpenRouter reachable and the proxy's key valid? Checked with
``GET /key`` (openrouter-api.md §6.4) and cached ``ttl_s`` seconds (30), so probes never
hammer OpenRouter; one check at a time. 200 ``{"status": "ok", "reachable": true,
"key_valid": true, "exhausted": false, "checked_at", "age_s"}``; 503 with ``status``
``unavailable`` (unreachable), ``key_rejected`` (401), ``out_of_credits`` (402, or the key's
``limit_remaining`` is 0) or ``error`` (another status; ``error`` holds its code). No
money amounts, labels or keys are returned: the endpoint is unauthenticated.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.errors import ProxyError, UpstreamKeyRejected, UpstreamOutOfCredits, UpstreamTimeout, UpstreamUnreachable
from proxy.store import Reachability, Store

__all__ = ["BreakerSnapshot", "Health", "LimitsState", "health_routes"]

log = logging.getLogger("proxy.health")

BreakerSnapshot = Callable[[], Mapping[str, Any]]
LimitsState = Callable[[], Mapping[str, Any]]
_LIMITS_FIELDS = ("failure_policy", "degraded", "down_for_s", "degraded_total")
PROBE_TTL_S = 1.0  # seconds a store probe's result serves
PROBE_WAIT_S = 0.5  # the longest /readyz waits on a probe (seconds)
PROBE_STALE_S = 5.0  # meanwhile, an answer this recent (seconds) still serves


class Health:
    """Readiness of one worker and the cached upstream check."""

    def __init__(
        self,
        store: Store,
        fetch_key: Callable[[], Awaitable[Any]],
        breakers: BreakerSnapshot | None = None,
        *,
        limits: LimitsState | None = None,
        ttl_s: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.fetch_key = fetch_key
        self.breakers = breakers
        self.limits = limits
        self.ttl_s = ttl_s
        self._probe: asyncio.Task[None] | None = None
        self._probed: tuple[float, Reachability] | None = None  # (monotonic s, answer)
        self._answered = False  # some node answered since this worker started
        self._clock = clock
        self._checked: tuple[float, int, dict[str, Any]] | None = None
        self._check: asyncio.Task[tuple[int, dict[str, Any]]] | None = None

    async def ready(self) -> tuple[int, dict[str, Any]]:
        """``(status, body)`` of ``/readyz`` (see the module docstring)."""
        nodes, unreachable, misconfigured = await self._reachability()
        store = {
            "backend": self.store.name,
            "reachable": not unreachable,
            "nodes": nodes,
            "unreachable_nodes": len(unreachable),
        }
        body: dict[str, Any] = {"status": "ready", "store": store}
        policy = "fail_closed"
        if self.limits is not None:
            state = self.limits()
            body["limits"] = {name: state[name] for name in _LIMITS_FIELDS}
            policy = state["failure_policy"]
        if (misconfigured and not self._answered) or (len(unreachable) >= nodes and policy != "fail_open"):
            body["status"] = "not_ready"
        elif unreachable:
            body["status"] = "degraded"
        if self.breakers is not None:
            states = [breaker["state"] for breaker in self.breakers().values()]
            body["breakers"] = {state: states.count(state) for state in ("open", "half_open")}
        return (503 if body["status"] == "not_ready" else 200), body

    async def _reachability(self) -> Reachability:
        """The latest probe's answer. While a probe runs past ``PROBE_WAIT_S``, the previous
        answer if it is at most ``PROBE_STALE_S`` old, else every node unreachable."""
        probed = self._probed
        now = time.monotonic()
        if self._probe is None and (probed is None or now - probed[0] >= PROBE_TTL_S):
            self._probe = asyncio.ensure_future(self._run_probe())
        if self._probe is not None:
            await asyncio.wait({self._probe}, timeout=PROBE_WAIT_S)  # waits, never cancels
            if self._probe is not None:  # still running
                if probed is not None and now - probed[0] <= PROBE_STALE_S:
                    return probed[1]
                nodes = probed[1].nodes if probed is not None else 1
                return Reachability(nodes, ["(no answer in time)"] * nodes)
        assert self._probed is not None
        return self._probed[1]

    async def _run_probe(self) -> None:
        try:
            found = await self.store.ping_nodes()
        except Exception:  # a probe must never break /readyz
            log.exception("readiness: store probe failed")
            found = Reachability(1, ["(probe failed)"])
        finally:
            self._probe = None
        before = set(self._probed[1].unreachable) if self._probed is not None else set()
        if set(found.unreachable) != before:
            if found.unreachable:
                how = " (check the store's URL and password)" if found.misconfigured else ""
                log.warning("readiness: store node(s) not answering%s: %s", how, ", ".join(sorted(found.unreachable)))
            elif self._probed is not None:
                log.warning("readiness: every store node answers again")
        self._answered = self._answered or len(found.unreachable) < found.nodes
        self._probed = (time.monotonic(), found)

    async def upstream(self) -> tuple[int, dict[str, Any]]:
        """``(status, body)`` of ``/health/upstream``, from the cache when fresh."""
        now = self._clock()
        if self._checked is None or now - self._checked[0] >= self.ttl_s:
            if self._check is None:
                self._check = asyncio.ensure_future(self._run_check())
            check = self._check
            status, body = await asyncio.shield(check)
            if self._check is check:
                self._check = None
                self._checked = (self._clock(), status, body)
        assert self._checked is not None
        checked_at, status, body = self._checked
        return status, {**body, "age_s": round(self._clock() - checked_at, 3)}

    async def _run_check(self) -> tuple[int, dict[str, Any]]:
        checked_at = datetime.fromtimestamp(self._clock(), UTC).isoformat(timespec="seconds")
        body: dict[str, Any] = {"reachable": True, "key_valid": True, "exhausted": False, "checked_at": checked_at}
        try:
            key = await self.fetch_key()
        except UpstreamKeyRejected:
            body.update(status="key_rejected", key_valid=False)
            return 503, body
        except UpstreamOutOfCredits:
            body.update(status="out_of_credits", exhausted=True)
            return 503, body
        except (UpstreamUnreachable, UpstreamTimeout) as exc:
            body.update(status="unavailable", reachable=False, key_valid=None, error=exc.code)
            return 503, body
        except ProxyError as exc:
            body.update(status="error", key_valid=None, error=exc.code or str(exc.status_code()))
            return 503, body
        data = key.get("data") if isinstance(key, dict) else None
        remaining = data.get("limit_remaining") if isinstance(data, dict) else None
        if isinstance(remaining, int | float) and not isinstance(remaining, bool) and remaining <= 0:
            body.update(status="out_of_credits", exhausted=True)
            return 503, body
        body["status"] = "ok"
        return 200, body


def health_routes(health: Callable[[], Health]) -> list[Route]:
    """Starlette routes; ``health()`` returns the running worker's ``Health`` (or raises)."""

    async def readyz(request: Request) -> Response:
        try:
            current = health()
        except ProxyError:
            return JSONResponse({"status": "not_ready", "reason": "starting or stopping"}, status_code=503)
        status, body = await current.ready()
        return JSONResponse(body, status_code=status)

    async def upstream(request: Request) -> Response:
        status, body = await health().upstream()
        return JSONResponse(body, status_code=status)

    return [
        Route("/readyz", readyz, methods=["GET"]),
        Route("/health/upstream", upstream, methods=["GET"]),
    ]
