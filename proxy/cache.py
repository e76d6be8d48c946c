"""The response cache: a rule's ``cache: {ttl_s: N}`` answers repeated requests from the store.

Key: SHA-256 over the caller's scope and the canonical JSON (sorted keys) of the upstream
body, i.e. after routing (model, variants, caps and defaults applied), minus the fields
that do not change the answer: ``user``, ``metadata``, ``session_id``, ``trace``,
``stream_options``, ``usage``, ``prompt_cache_key``. ``stream`` is part of the key
(``true``/``false``), so a streamed and a whole answer are cached separately and each is
replayed in its own form: SSE bytes exactly as they came, or the JSON body. The scope is
the caller's team (the key id for keys without a team): teams never see each other's
cached answers. Request headers (``x-anthropic-beta`` ...) are not part of the key.

Only clean answers are stored: status 200, at most ``max_bytes``, a whole body that is a
JSON object with choices and no ``error``, or a stream that ended with ``data: [DONE]``
and carried no in-band error. Cut streams, errors and streams without ``[DONE]`` never
are. The store may fail: a lookup then misses and a store is skipped (logged), never
failing the request. Each store call is bounded by ``timeout_s``, and after a failure the
cache is not used for ``retry_s`` (then the next request tries again), so a stalled Redis
costs requests neither a timeout each nor a hang (while it is down, one request per
``retry_s`` probes it, and the outage is logged once).

Stored value: ``ORPC1\\n`` + a JSON line ``{"s": stream, "h": [[name, value], ...]}`` +
the body bytes. Hits carry ``x-proxy-cache: hit``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.asgi import Message, Send
from proxy.sse import SSETap
from proxy.store import Store, StoreUnavailable
from proxy.types import ChatCall, Principal, RoutePlan

__all__ = ["CACHE_HIT", "CACHE_MISS", "IGNORED_FIELDS", "BodyRecorder", "CachedResponse", "ResponseCache"]

log = logging.getLogger("proxy.cache")

CACHE_HIT = (b"x-proxy-cache", b"hit")
CACHE_MISS = (b"x-proxy-cache", b"miss")
IGNORED_FIELDS = frozenset({"user", "metadata", "session_id", "trace", "stream_options", "usage", "prompt_cache_key"})
_KEPT_HEADERS = frozenset({b"content-type", b"x-provider-name"})
_MAGIC = b"ORPC1\n"
_PREFIX = "orp:cache:"


@dataclass(frozen=True, slots=True)
class CachedResponse:
    """A stored answer: ``status`` (200), ``headers`` (content type, provider, the hit
    marker), ``body`` (the JSON body or the SSE bytes), ``stream`` (SSE or not)."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    stream: bool


class ResponseCache:
    """Cache lookups and stores over ``store`` (``cache_get``/``cache_set``)."""

    def __init__(
        self, store: Store, *, max_bytes: int = 1 << 20, timeout_s: float = 0.25, retry_s: float = 1.0
    ) -> None:
        self._backend = store
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self._skip_until = 0.0  # monotonic time: the store failed, it is not used until then
        self._down = False

    def _usable(self) -> bool:
        """Whether to call the store now. While it is down, one caller per ``retry_s`` probes."""
        now = time.monotonic()
        if now < self._skip_until:
            return False
        if self._down:
            self._skip_until = now + self.retry_s  # this caller is the probe; the others skip
        return True

    def _answered(self) -> None:
        if self._down:
            self._down = False
            log.warning("response cache store is reachable again")

    def _failed(self, what: str, exc: BaseException) -> None:
        self._skip_until = time.monotonic() + self.retry_s
        if not self._down:  # logged once per outage
            self._down = True
            reason = str(exc) or type(exc).__name__
            log.warning("response cache %s failed (tried again every %.1f s): %s", what, self.retry_s, reason)

    def key(self, plan: RoutePlan, call: ChatCall, principal: Principal) -> str | None:
        """The store key of this request, or ``None`` when its plan does not cache."""
        if plan.cache_ttl_s is None:
            return None
        body = plan.request if plan.request is not None else call.body
        canonical = {k: v for k, v in body.items() if k not in IGNORED_FIELDS}
        canonical["stream"] = call.stream
        scope = f"team:{principal.team}" if principal.team else f"key:{principal.key_id}"
        digest = hashlib.sha256(scope.encode() + b"\x1f" + orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS))
        return _PREFIX + digest.hexdigest()

    async def lookup(self, plan: RoutePlan, call: ChatCall, principal: Principal) -> CachedResponse | None:
        """The cached answer for this request, or ``None`` (not cacheable, a miss, or the
        store failed)."""
        key = self.key(plan, call, principal)
        if key is None or not self._usable():
            return None
        try:
            async with asyncio.timeout(self.timeout_s):
                raw = await self._backend.cache_get(key)
        except (StoreUnavailable, TimeoutError) as exc:
            self._failed("lookup", exc)
            return None
        self._answered()
        return _decode(raw) if raw is not None else None

    async def store(
        self,
        plan: RoutePlan,
        call: ChatCall,
        principal: Principal,
        *,
        status: int,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
        stream: bool,
    ) -> bool:
        """Store a finished answer when the plan caches and it is clean (see the module
        docstring). ``headers``: the upstream response headers; ``body``: every byte sent
        to the client. True when stored."""
        key = self.key(plan, call, principal)
        if key is None or plan.cache_ttl_s is None or status != 200 or len(body) > self.max_bytes:
            return False
        if not self._usable():
            return False
        if not (_clean_stream(body) if stream else _clean_body(body)):
            return False
        kept = [[n.decode("latin-1"), v.decode("latin-1")] for n, v in headers if n.lower() in _KEPT_HEADERS]
        value = _MAGIC + orjson.dumps({"s": stream, "h": kept}) + b"\n" + body
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._backend.cache_set(key, value, plan.cache_ttl_s)
        except (StoreUnavailable, TimeoutError) as exc:
            self._failed("store", exc)
            return False
        self._answered()
        return True


class BodyRecorder:
    """An ASGI ``send`` that passes every message on and keeps a copy of the response:
    ``status`` and ``headers`` of the head, and ``body`` (all body bytes, ``None`` until
    the last body message was sent, or when the body outgrew ``max_bytes``)."""

    def __init__(self, send: Send, max_bytes: int = 1 << 20) -> None:
        self._send = send
        self._max_bytes = max_bytes
        self._parts: list[bytes] | None = []
        self._size = 0
        self._complete = False
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status, self.headers = message["status"], list(message.get("headers", ()))
        elif message["type"] == "http.response.body" and self._parts is not None:
            chunk = bytes(message.get("body", b""))
            self._size += len(chunk)
            if self._size > self._max_bytes:
                self._parts = None
            else:
                self._parts.append(chunk)
                self._complete = not message.get("more_body", False)
        await self._send(message)

    @property
    def body(self) -> bytes | None:
        return b"".join(self._parts) if self._complete and self._parts is not None else None


def _clean_stream(body: bytes) -> bool:
    tap = SSETap()
    tap.feed(body)
    return tap.finish() and tap.done and tap.error is None and tap.malformed == 0 and tap.data_events > 0


def _clean_body(body: bytes) -> bool:
    try:
        obj: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    if not isinstance(obj, dict) or "error" in obj:
        return False
    choices = obj.get("choices")
    if not isinstance(choices, list) or not choices:
        return False
    return all(isinstance(c, dict) and "error" not in c and c.get("finish_reason") != "error" for c in choices)


def _decode(raw: bytes) -> CachedResponse | None:
    if not raw.startswith(_MAGIC):
        return None
    meta_end = raw.find(b"\n", len(_MAGIC))
    if meta_end == -1:
        return None
    try:
        meta = orjson.loads(raw[len(_MAGIC) : meta_end])
        headers = tuple((n.encode("latin-1"), v.encode("latin-1")) for n, v in meta["h"])
        stream = bool(meta["s"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
    return CachedResponse(200, (*headers, CACHE_HIT), raw[meta_end + 1 :], stream)
