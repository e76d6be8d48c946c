"""``POST /v1/chat/completions``: the hot path, as one lean raw-ASGI endpoint.

The one place that knows the order of the stages::

    authenticate (auth) -> read + validate (parse) -> plan (routing) -> admit (admission)
      -> forward (upstream) -> relay: streamed byte for byte (SSETap on the side) or whole
      -> meter (metering) -> settle (admission) -> record sinks (usage log, totals, ...)

Streaming: upstream bytes are sent to the client as they arrive, unchanged; the tap only
reads them. A client that hangs up cancels the upstream request at once. If the upstream
body breaks off after the first byte, the client gets one in-band error event in
OpenRouter's mid-stream shape (openrouter-api.md §3.5) and no ``[DONE]``, so SDKs raise
instead of returning a truncated answer. Settlement (usage record, store totals) runs in
``finally``, whatever happened.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson

from proxy.admission import Admission
from proxy.asgi import ClientDisconnected, DisconnectWatch, Receive, Scope, Send, read_body, send_error
from proxy.auth import Keyring
from proxy.errors import InternalError, MethodNotAllowed, ProxyError, UpstreamCut
from proxy.metering import usage_from
from proxy.parse import parse_chat_request
from proxy.routing import Router
from proxy.sinks import Activity, RecordSink
from proxy.sse import SSETap
from proxy.types import Principal, RoutePlan, Ticket, Usage, UsageRecord
from proxy.upstream import OpenRouterClient, UpstreamResponse

__all__ = ["ChatCompletions"]

log = logging.getLogger("proxy.pipeline")

_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")
_EVENT_STREAM = b"text/event-stream"
_STREAM_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


@dataclass(slots=True)
class _Outcome:
    """What one request did; turned into its ``UsageRecord`` at the end."""

    status: int = 500
    started: bool = False
    principal: Principal | None = None
    requested_model: str | None = None
    plan: RoutePlan | None = None
    ticket: Ticket | None = None
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
    extra: dict[str, Any] = field(default_factory=dict)


class ChatCompletions:
    """The raw ASGI endpoint. Built once per worker with its collaborators."""

    def __init__(
        self,
        *,
        keyring: Keyring,
        router: Router,
        client: OpenRouterClient,
        admission: Admission,
        sinks: list[RecordSink],
        max_body_bytes: int,
        activity: Activity | None = None,
    ) -> None:
        self.keyring = keyring
        self.router = router
        self.client = client
        self.admission = admission
        self.sinks = sinks
        self.max_body_bytes = max_body_bytes
        self.activity = activity or Activity()
        self._forward = client.forward_headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        ts = time.time()
        authorization = request_id_raw = None
        content_length: int | None = None
        forwarded: list[tuple[bytes, bytes]] = []
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
            elif name == b"x-request-id":
                request_id_raw = value
            elif name == b"content-length":
                content_length = int(value) if value.isdigit() else None
            elif name in self._forward:
                forwarded.append((name, value))
        request_id = (
            request_id_raw.decode() if request_id_raw and _REQUEST_ID.match(request_id_raw) else uuid.uuid4().hex
        )
        out = _Outcome()
        self.activity.enter()
        try:
            if scope["method"] != "POST":
                raise MethodNotAllowed("Use POST for /v1/chat/completions.")
            out.principal = self.keyring.authenticate(authorization)
            call = parse_chat_request(await read_body(receive, self.max_body_bytes, content_length))
            out.requested_model, out.stream = call.model, call.stream
            out.plan = plan = self.router.plan(call, out.principal)
            out.ticket = await self.admission.admit(out.principal, call, plan)
            await self._forward_call(plan.body or call.raw, forwarded, plan, request_id, started, out, receive, send)
        except ProxyError as exc:
            out.error_code = exc.code or str(exc.status_code())
            out.status = await send_error(send, exc, request_id)
        except ClientDisconnected:
            out.cancelled, out.status, out.error_code = True, 499, "client_disconnected"
        except Exception:
            log.exception("internal error in request %s", request_id)
            out.error_code = "internal_error"
            if not out.started:
                out.status = await send_error(send, InternalError("The gateway hit an internal error."), request_id)
        finally:
            self.activity.leave()
            await self._settle(out, request_id, ts, started)

    async def _forward_call(
        self,
        body: bytes,
        forwarded: list[tuple[bytes, bytes]],
        plan: RoutePlan,
        request_id: str,
        started: float,
        out: _Outcome,
        receive: Receive,
        send: Send,
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        watch = DisconnectWatch(receive, task)
        response: UpstreamResponse | None = None
        try:
            response = await self.client.chat(body, forwarded)
            out.ttfb_s = time.perf_counter() - started
            out.generation_id = response.generation_id
            headers = [
                *response.headers,
                (b"x-request-id", request_id.encode()),
                (b"x-proxy-model", plan.model.encode()),
            ]
            if plan.rule:
                headers.append((b"x-proxy-route", plan.rule.encode()))
            if out.ticket is not None:
                headers.extend(out.ticket.headers)
            content_type = next((v for n, v in response.headers if n == b"content-type"), b"")
            if content_type.startswith(_EVENT_STREAM):
                await self._relay_stream(response, headers, started, out, watch, send)
            else:
                await self._relay_whole(response, headers, out, watch, send)
        except asyncio.CancelledError:
            if not watch.disconnected:
                raise
            task.uncancel()
            out.cancelled = True
            if out.status == 500:
                out.status, out.error_code = 499, "client_disconnected"
        finally:
            watch.stop()
            if response is not None:
                response.close()

    async def _relay_whole(
        self,
        response: UpstreamResponse,
        headers: list[tuple[bytes, bytes]],
        out: _Outcome,
        watch: DisconnectWatch,
        send: Send,
    ) -> None:
        body = await response.read()
        headers.append((b"content-length", str(len(body)).encode()))
        _meter_body(body, out)
        watch.stop()
        out.status, out.started = response.status, True
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _relay_stream(
        self,
        response: UpstreamResponse,
        headers: list[tuple[bytes, bytes]],
        started: float,
        out: _Outcome,
        watch: DisconnectWatch,
        send: Send,
    ) -> None:
        headers.extend(_STREAM_HEADERS)
        out.status, out.started = response.status, True
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        tap = SSETap()
        self.activity.stream_open()
        try:
            async for chunk in response.chunks():
                tap.feed(chunk)
                if out.ttft_s is None and tap.data_events:
                    out.ttft_s = time.perf_counter() - started
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            tap.finish()
            watch.stop()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except UpstreamCut as exc:
            tap.finish()
            out.error_code = exc.code
            watch.stop()
            if tap.error is None:
                await send({"type": "http.response.body", "body": _cut_event(tap, exc), "more_body": False})
            else:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self.activity.stream_close()
            out.done = tap.done
            out.usage = usage_from(tap.usage)
            out.model, out.provider, out.finish_reason = tap.model, tap.provider, tap.finish_reason
            out.generation_id = out.generation_id or tap.generation_id
            out.malformed_events = tap.malformed
            if tap.error is not None and out.error_code is None:
                out.error_code = str(tap.error.get("code", "stream_error"))

    async def _settle(self, out: _Outcome, request_id: str, ts: float, started: float) -> None:
        principal = out.principal
        plan = out.plan
        record = UsageRecord(
            request_id=request_id,
            ts=ts,
            key_name=principal.name if principal else None,
            team=principal.team if principal else None,
            requested_model=out.requested_model,
            routed_model=plan.model if plan else None,
            rule=plan.rule if plan else None,
            model=out.model,
            provider=out.provider,
            generation_id=out.generation_id,
            stream=out.stream,
            status=out.status,
            usage=out.usage,
            finish_reason=out.finish_reason,
            latency_s=time.perf_counter() - started,
            ttfb_s=out.ttfb_s,
            ttft_s=out.ttft_s,
            done=out.done,
            cancelled=out.cancelled,
            error_code=out.error_code,
            malformed_events=out.malformed_events,
            extra=out.extra or None,
        )
        if out.ticket is not None:
            try:
                await self.admission.settle(out.ticket, record)
            except Exception:
                log.exception("settling admission for request %s failed", request_id)
        for sink in self.sinks:
            sink.emit(record)


def _meter_body(body: bytes, out: _Outcome) -> None:
    """Read usage, ids and finish reason from a whole JSON response (never raises)."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        out.malformed_events = 1
        return
    if not isinstance(obj, dict):
        return
    out.usage = usage_from(obj.get("usage"))
    for name in ("model", "provider"):
        if isinstance(obj.get(name), str):
            setattr(out, name, obj[name])
    if out.generation_id is None and isinstance(obj.get("id"), str):
        out.generation_id = obj["id"]
    choices = obj.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        choice = choices[0]
        if isinstance(choice.get("finish_reason"), str):
            out.finish_reason = choice["finish_reason"]
        if isinstance(choice.get("error"), dict):
            out.error_code = str(choice["error"].get("code", "provider_error"))
    if isinstance(obj.get("error"), dict):
        out.error_code = str(obj["error"].get("code", "provider_error"))


def _cut_event(tap: SSETap, exc: UpstreamCut) -> bytes:
    """One in-band error event in OpenRouter's mid-stream shape (§3.5), ending the stream."""
    event = {
        "id": tap.generation_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": tap.model,
        "provider": tap.provider,
        "error": {"code": 502, "message": exc.message, "metadata": {"error_type": "provider_unavailable"}},
        "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}],
    }
    return b"data: " + orjson.dumps(event) + b"\n\n"
