"""Relaying one upstream response to the client, and the stream-integrity contract.

``Exchange`` is the per-request state the pipeline and the relay share. The contract
(README, "Resilience"):

* The **commit point** is the first ``data:`` event sent to the client. Before it the relay
  may send the response head and keep-alive comments and still give up on an attempt
  (``relay_stream`` raises, and the pipeline retries or falls back on the same connection).
* After it, a cut, a stall (``read_timeout_s`` of silence) or an upstream in-band error ends
  the stream with exactly one error event in OpenRouter's mid-stream shape
  (openrouter-api.md §3.5) and **no** ``data: [DONE]``, so SDKs raise instead of returning
  a truncated answer. An upstream error event is forwarded byte for byte and the stream is
  ended right after it (OpenRouter's trailing ``[DONE]`` is dropped).
* A stream that ends without ``[DONE]`` after its answer finished (a ``finish_reason``) is
  forwarded as it came and finalised. One that ends before (no ``finish_reason``, no
  ``[DONE]``, no error) was cut, even when its framing looked clean (a body delimited by
  the connection's close has no framing to break): its unterminated tail is dropped and it
  ends with the error event.
* Only **whole events** leave: the unterminated tail of a chunk (an event split across
  upstream reads) waits for the rest of its event, which costs a complete event no time.
  So a retry before the commit point, or the error event after a cut, never lands in the
  middle of half an event the client already has (which SDKs fail to parse). A tail over
  ``_MAX_HELD`` bytes without a separator is sent as it is, so memory stays bounded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from proxy.asgi import Send
from proxy.cache import CachedResponse
from proxy.deadline import Deadline
from proxy.errors import UpstreamCut, UpstreamStatusError, UpstreamTimeout
from proxy.metering import usage_from
from proxy.sinks import Activity
from proxy.sse import SSETap
from proxy.types import Principal, RoutePlan, Ticket, Usage
from proxy.upstream import UpstreamResponse

__all__ = ["Exchange", "end_with_error", "error_event", "relay_stream", "relay_whole", "send_cached"]

_STREAM_HEADERS = ((b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no"))
_MAX_HELD = 1 << 20  # bytes of an unterminated event held back at most


@dataclass(slots=True)
class Exchange:
    """What one request did so far; becomes its ``UsageRecord`` at the end.

    ``started`` (the response head went out), ``committed`` (a data event went out) and
    ``finished`` (the response body ended) only ever go from False to True.
    """

    request_id: str
    t0: float
    status: int = 500
    started: bool = False
    committed: bool = False
    finished: bool = False
    principal: Principal | None = None
    requested_model: str | None = None
    plan: RoutePlan | None = None
    ticket: Ticket | None = None
    attempt_model: str | None = None
    stream: bool = False
    usage: Usage | None = None
    model: str | None = None
    provider: str | None = None
    generation_id: str | None = None
    finish_reason: str | None = None
    ttfb_s: float | None = None
    ttft_s: float | None = None
    done: bool | None = None
    cancelled: bool = False
    error_code: str | None = None
    malformed_events: int = 0
    data_events: int = 0
    attempts: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    fallback_tickets: list[tuple[str, Ticket]] = field(default_factory=list)  # (model, its own limits)


async def _start(send: Send, ex: Exchange, status: int, headers: list[tuple[bytes, bytes]]) -> None:
    ex.status, ex.started = status, True
    await send({"type": "http.response.start", "status": status, "headers": headers})


async def _end(send: Send, ex: Exchange, body: bytes = b"") -> None:
    ex.finished = True
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def relay_whole(response: UpstreamResponse, ex: Exchange, headers: list[tuple[bytes, bytes]], send: Send) -> None:
    """Read the whole body (``UpstreamCut`` if it breaks off: nothing was sent), then send it."""
    body = await response.read()
    headers.append((b"content-length", str(len(body)).encode()))
    _meter_body(body, ex)
    await _start(send, ex, response.status, headers)
    await _end(send, ex, body)


async def relay_stream(
    response: UpstreamResponse,
    ex: Exchange,
    headers: list[tuple[bytes, bytes]],
    send: Send,
    first_token_deadline: float,
    activity: Activity,
) -> None:
    """Relay an SSE response byte for byte; see the module docstring for the contract.

    Before the commit point raises ``UpstreamTimeout`` (phase ``first_token``: no data event
    by ``first_token_deadline``, loop time) or ``UpstreamCut``. The response head goes out
    with the first bytes relayed (a keep-alive comment or the first event), so an attempt
    that fails before sending any leaves the client nothing to be stuck with: the next
    attempt's head carries its own generation id, provider and model, and a last failure is
    an ordinary HTTP error. Once out, the head and any comments stay sent.
    """
    head = None if ex.started else (response.status, [*headers, *_STREAM_HEADERS])
    content = ex.extra.get("content")
    tap = SSETap(capture=content is not None)
    out = _WholeEvents()
    chunks = response.chunks().__aiter__()
    activity.stream_open()
    try:
        first_token = Deadline(first_token_deadline)
        try:
            while not ex.committed:
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    raise UpstreamCut("The upstream stream ended before its first event.") from None
                tap.feed(chunk)
                if tap.data_events == 1 and tap.error is not None:
                    # the provider failed before its first token: nothing is committed yet
                    raise _error_status(tap.error)
                if tap.data_events:
                    ex.committed = True
                    ex.ttft_s = time.perf_counter() - ex.t0
                if await _forward(send, ex, tap, out, chunk, head):
                    return
        except asyncio.CancelledError:
            if first_token.expired_here():
                raise UpstreamTimeout("No first token in time.", phase="first_token") from None
            raise
        finally:
            first_token.stop()
        if not ex.started and head is not None:  # (committed: the first event went out with it)
            await _start(send, ex, *head)
        try:
            async for chunk in chunks:
                tap.feed(chunk)
                if await _forward(send, ex, tap, out, chunk, head):
                    return
            whole = tap.finish()
            if not (tap.done or tap.finish_reason or tap.error):  # it ended mid-answer: a cut, whatever
                # the framing said (a connection-close body has none to break)
                raise UpstreamCut("The upstream stream ended before the answer finished.")
            if not whole:
                tap.malformed += 1
            await _end(send, ex, out.rest())  # a last event without its blank line goes as it came
        except UpstreamCut as exc:  # the tail of an event that will never end is dropped, not counted
            ex.error_code = exc.code
            if tap.error is None:
                await _end(send, ex, error_event(tap.generation_id, tap.model, tap.provider, 502, exc.message))
            else:
                await _end(send, ex)
    finally:
        activity.stream_close()
        ex.done = tap.done and tap.error_end is None  # a [DONE] after an error event is not sent
        ex.data_events += tap.data_events
        ex.malformed_events += tap.malformed
        if ex.committed:
            ex.usage = usage_from(tap.usage)
            ex.model, ex.provider, ex.finish_reason = tap.model, tap.provider, tap.finish_reason
            ex.generation_id = tap.generation_id or ex.generation_id
            if tap.error is not None and ex.error_code is None:
                ex.error_code = str(tap.error.get("code", "stream_error"))
            if content is not None and tap.text is not None:
                content["answer"] = "".join(tap.text)


class _WholeEvents:
    """Splits the upstream bytes so that only whole SSE events are sent (module docstring)."""

    __slots__ = ("held",)

    def __init__(self) -> None:
        self.held = b""  # the start of an event whose end has not arrived

    def take(self, chunk: bytes) -> bytes:
        """What of ``held + chunk`` may go now: up to the last event separator."""
        data = self.held + chunk if self.held else chunk
        if data.endswith(b"\n\n"):  # the usual chunk: whole events
            self.held = b""
            return data
        lf, crlf = data.rfind(b"\n\n"), data.rfind(b"\r\n\r\n")
        end = max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)
        if len(data) - end > _MAX_HELD:
            end = len(data)
        self.held = data[end:]
        return data[:end]

    def rest(self) -> bytes:
        held, self.held = self.held, b""
        return held


async def _forward(
    send: Send,
    ex: Exchange,
    tap: SSETap,
    out: _WholeEvents,
    chunk: bytes,
    head: tuple[int, list[tuple[bytes, bytes]]] | None,
) -> bool:
    """Send the whole events ``chunk`` completes (the response ``head`` first, if not sent
    yet); after an upstream error event, send up to its end and finish (True)."""
    if tap.error_end is None:
        body = out.take(chunk)
        if body:
            if not ex.started and head is not None:
                await _start(send, ex, *head)
            await send({"type": "http.response.body", "body": body, "more_body": True})
        return False
    data = out.rest() + chunk
    keep = max(0, min(len(data), tap.error_end - (tap.offset - len(data))))
    if not ex.started and head is not None:
        await _start(send, ex, *head)
    await _end(send, ex, data[:keep])
    return True


def _error_status(error: dict[str, Any]) -> UpstreamStatusError:
    code = error.get("code")
    status = code if isinstance(code, int) and 400 <= code <= 599 else 502
    return UpstreamStatusError(status, error)


def error_event(
    generation_id: str | None,
    model: str | None,
    provider: str | None,
    code: int,
    message: str,
    metadata: dict[str, Any] | None = None,
) -> bytes:
    """One SSE error event in OpenRouter's mid-stream shape (§3.5); ``metadata`` defaults to
    ``{"error_type": "provider_unavailable"}``."""
    event = {
        "id": generation_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "provider": provider,
        "error": {"code": code, "message": message, "metadata": metadata or {"error_type": "provider_unavailable"}},
        "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}],
    }
    return b"data: " + orjson.dumps(event) + b"\n\n"


async def end_with_error(
    send: Send, ex: Exchange, code: int, message: str, metadata: dict[str, Any] | None = None
) -> None:
    """Finish a response whose head is already out with one in-band error event (an
    upstream error's own ``metadata`` kept, e.g. its ``error_type``)."""
    if not ex.finished:
        model = ex.model or ex.attempt_model
        await _end(send, ex, error_event(ex.generation_id, model, ex.provider, code, message, metadata))


async def send_cached(hit: CachedResponse, ex: Exchange, headers: list[tuple[bytes, bytes]], send: Send) -> None:
    """Answer from the response cache: the stored bytes, metered at zero upstream cost."""
    if hit.stream:
        headers.extend(_STREAM_HEADERS)
        content = ex.extra.get("content")
        tap = SSETap(capture=content is not None)
        tap.feed(hit.body)
        tap.finish()
        if content is not None and tap.text is not None:
            content["answer"] = "".join(tap.text)
        ex.usage, ex.model, ex.provider = usage_from(tap.usage), tap.model, tap.provider
        ex.finish_reason, ex.done = tap.finish_reason, tap.done
    else:
        headers.append((b"content-length", str(len(hit.body)).encode()))
        _meter_body(hit.body, ex)
    if ex.usage is not None:
        ex.usage = dataclasses.replace(ex.usage, cost_usd=0.0)
    ex.generation_id = None  # that generation belongs to the request that was cached
    ex.extra["cache"] = "hit"
    await _start(send, ex, hit.status, [*hit.headers, *headers])
    await _end(send, ex, hit.body)


def _meter_body(body: bytes, ex: Exchange) -> None:
    """Read usage, ids and finish reason from a whole JSON response (never raises)."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        ex.malformed_events += 1
        return
    if not isinstance(obj, dict):
        return
    ex.usage = usage_from(obj.get("usage"))
    for name in ("model", "provider"):
        if isinstance(obj.get(name), str):
            setattr(ex, name, obj[name])
    if isinstance(obj.get("id"), str):
        ex.generation_id = obj["id"]
    choices = obj.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        choice = choices[0]
        if isinstance(choice.get("finish_reason"), str):
            ex.finish_reason = choice["finish_reason"]
        content = ex.extra.get("content")
        message = choice.get("message")
        if content is not None and isinstance(message, dict) and isinstance(message.get("content"), str):
            content["answer"] = message["content"]
        if isinstance(choice.get("error"), dict):
            ex.error_code = str(choice["error"].get("code", "provider_error"))
    if isinstance(obj.get("error"), dict):
        ex.error_code = str(obj["error"].get("code", "provider_error"))
