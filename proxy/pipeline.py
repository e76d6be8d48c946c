"""``POST /v1/chat/completions``: the hot path, as one lean raw-ASGI endpoint.

The one place that knows the order of the stages::

    authenticate (auth) -> read + validate (parse) -> plan (routing) -> admit (admission)
      -> attempts: model, retries, fallbacks (upstream, retry, breaker)
           -> relay: streamed byte for byte with the commit-point contract, or whole (relay)
      -> settle (admission) -> record sinks (usage log, totals, metrics, ...)

Before a stream's commit point (its first data event) a failed attempt is retried on the
same model or the next model of the plan, on the same client connection (``retry`` says
which); after it, failures end the stream in-band (``relay``). A client that hangs up
cancels the upstream request at once. Settlement runs in ``finally``, whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import re
import time

import orjson

from proxy.admission import Admission
from proxy.asgi import ClientDisconnected, DisconnectWatch, Receive, Scope, Send, read_body, send_error
from proxy.auth import Keyring
from proxy.breaker import Breakers
from proxy.cache import BodyRecorder, ResponseCache
from proxy.config import RetrySettings, ServerSettings, UpstreamSettings
from proxy.deadline import Deadline
from proxy.errors import (
    CircuitOpen,
    InternalError,
    MethodNotAllowed,
    ProxyError,
    RequestTimeout,
    UpstreamCut,
    UpstreamStatusError,
    UpstreamTimeout,
)
from proxy.metrics import Metrics
from proxy.parse import check_caps, parse_chat_request
from proxy.relay import Exchange, end_with_error, relay_stream, relay_whole, send_cached
from proxy.retry import Decision, backoff_s, judge
from proxy.routing import ContextGuard, Router
from proxy.sinks import Activity, RecordSink
from proxy.tokens import estimate_prompt_tokens
from proxy.types import ChatCall, RoutePlan, Usage, UsageRecord
from proxy.upstream import OpenRouterClient

__all__ = ["ChatCompletions"]

log = logging.getLogger("proxy.pipeline")

_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")
_EVENT_STREAM = b"text/event-stream"


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
        server: ServerSettings,
        retries: RetrySettings,
        breakers: Breakers,
        activity: Activity | None = None,
        context_guard: ContextGuard | None = None,
        cache: ResponseCache | None = None,
        metrics: Metrics | None = None,
        capture_content: bool = False,
    ) -> None:
        self.keyring = keyring
        self.router = router
        self.client = client
        self.admission = admission
        self.sinks = sinks
        self.server = server
        self.retries = retries
        self.breakers = breakers
        self.activity = activity or Activity()
        self.context_guard = context_guard
        self.cache = cache
        self.metrics = metrics
        self.capture_content = capture_content  # logging.include_content: messages and answer for the request log
        self.timeouts: UpstreamSettings = client.settings
        self._forward = client.forward_headers
        self._forward_prefixes = client.forward_prefixes
        self._url_target = f"url:{client.base_url}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        t0 = time.perf_counter()
        ts = time.time()
        authorization = request_id_raw = None
        content_length: int | None = None
        forwarded: list[tuple[bytes, bytes]] = []
        prefixes = self._forward_prefixes
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
            elif name == b"x-request-id":
                request_id_raw = value
            elif name == b"content-length":
                content_length = int(value) if value.isdigit() else None
            elif name in self._forward or (prefixes and name.startswith(prefixes)):
                forwarded.append((name, value))
        request_id = (
            request_id_raw.decode() if request_id_raw and _REQUEST_ID.match(request_id_raw) else os.urandom(16).hex()
        )
        ex = Exchange(request_id, t0)
        self.activity.enter()
        try:
            if scope["method"] != "POST":
                raise MethodNotAllowed("Use POST for /v1/chat/completions.")
            ex.principal = self.keyring.authenticate(authorization)
            deadline = Deadline(asyncio.get_running_loop().time() + self.server.body_timeout_s)
            try:
                raw = await read_body(receive, self.server.max_body_bytes, content_length)
            except asyncio.CancelledError:
                if deadline.expired_here():
                    raise RequestTimeout("The request body did not arrive in time.") from None
                raise
            finally:
                deadline.stop()
            call = parse_chat_request(raw)
            check_caps(call, self.server)
            ex.requested_model, ex.stream = call.model, call.stream
            if self.capture_content:
                ex.extra["content"] = {"messages": call.body.get("messages")}
            ex.plan = plan = self.router.plan(call, ex.principal, scope["headers"])
            if self.context_guard is not None:
                ex.plan = plan = await self.context_guard(plan, call)
            ex.ticket = await self.admission.admit(ex.principal, call, plan)
            if plan.cache_ttl_s is not None and self.cache is not None:
                await self._through_cache(self.cache, call, plan, forwarded, ex, scope, receive, send)
            else:
                await self._forward_call(call, plan, forwarded, ex, scope, receive, send)
        except ProxyError as exc:
            ex.error_code = exc.code or str(exc.status_code())
            if not ex.started:
                ex.status = await send_error(send, exc, request_id)
            else:
                metadata = exc.upstream.get("metadata") if isinstance(exc, UpstreamStatusError) else None
                await end_with_error(
                    send, ex, exc.status_code(), exc.message, metadata if isinstance(metadata, dict) else None
                )
        except ClientDisconnected:
            ex.cancelled, ex.status, ex.error_code = True, 499, "client_disconnected"
        except Exception:
            log.exception("internal error in request %s", request_id)
            ex.error_code = "internal_error"
            if not ex.started:
                ex.status = await send_error(send, InternalError("The gateway hit an internal error."), request_id)
            else:
                await end_with_error(send, ex, 500, "The gateway hit an internal error.")
        finally:
            try:
                await self._settle(ex, ts)
            finally:
                self.activity.leave()

    async def _through_cache(
        self,
        cache: ResponseCache,
        call: ChatCall,
        plan: RoutePlan,
        forwarded: list[tuple[bytes, bytes]],
        ex: Exchange,
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        """A cacheable plan: replay a stored answer, or forward and store a clean one."""
        assert ex.principal is not None
        hit = await cache.lookup(plan, call, ex.principal)
        if hit is not None:
            ex.attempt_model = plan.model
            await send_cached(hit, ex, self._headers(plan.model, plan, ex), send)
            return
        recorder = BodyRecorder(send, cache.max_bytes)
        await self._forward_call(call, plan, forwarded, ex, scope, receive, recorder)
        if recorder.body is not None and ex.error_code is None and not ex.cancelled:
            await cache.store(
                plan,
                call,
                ex.principal,
                status=recorder.status,
                headers=recorder.headers,
                body=recorder.body,
                stream=call.stream,
            )

    def _headers(self, model: str, plan: RoutePlan, ex: Exchange) -> list[tuple[bytes, bytes]]:
        """The proxy's own response headers: request id, routing decision, rate limits."""
        headers = [(b"x-request-id", ex.request_id.encode()), (b"x-proxy-model", model.encode())]
        if plan.rule:
            headers.append((b"x-proxy-route", plan.rule.encode()))
        if plan.policy_hash:
            headers.append((b"x-proxy-policy", plan.policy_hash.encode()))
        if ex.ticket is not None:
            headers.extend(ex.ticket.headers)
        return headers

    async def _forward_call(
        self,
        call: ChatCall,
        plan: RoutePlan,
        forwarded: list[tuple[bytes, bytes]],
        ex: Exchange,
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        watch = DisconnectWatch(scope, receive, task)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeouts.total_timeout_s
        total = Deadline(deadline)
        try:
            await self._attempts(call, plan, forwarded, ex, send, deadline)
        except asyncio.CancelledError:
            if total.expired_here():
                ex.error_code = "upstream_timeout"
                if not ex.started:
                    raise UpstreamTimeout("The request did not complete in time.", phase="total") from None
                await end_with_error(send, ex, 504, "The request did not complete in time.")
                return
            if not watch.disconnected:
                ex.error_code = "shutdown"
                raise
            task.uncancel()
            ex.cancelled = True
            ex.error_code = ex.error_code or "client_disconnected"
            if not ex.started:
                ex.status = 499
        finally:
            total.stop()
            watch.stop()
            if ex.committed and ex.usage is None:  # cut, stalled, failed in-band or hung up on
                self._estimate_usage(call, ex)

    async def _attempts(
        self,
        call: ChatCall,
        plan: RoutePlan,
        forwarded: list[tuple[bytes, bytes]],
        ex: Exchange,
        send: Send,
        deadline: float,
    ) -> None:
        """Try the plan's models in order, retrying each per ``proxy.retry``; raise the last error."""
        loop = asyncio.get_running_loop()
        last: ProxyError | None = None
        models = (plan.model, *plan.fallbacks)
        for index, model in enumerate(models):
            if index and self.metrics is not None:
                self.metrics.fallback(models[index - 1], model)
            breakers = self.breakers
            if not (breakers.peek(self._url_target) and breakers.peek(model)):
                ex.attempts.append({"model": model, "error": "circuit_open"})
                last = last or CircuitOpen(f"The circuit breaker for {model} is open; try again shortly.")
                continue
            if index and ex.principal is not None:  # a fallback's own per-model limits (before a probe is claimed)
                held = [t for t in (ex.ticket, *(t for _, t in ex.fallback_tickets)) if t is not None]
                reserving = asyncio.ensure_future(self.admission.admit_fallback(ex.principal, call, plan, model, held))
                try:
                    ticket = await asyncio.shield(reserving)
                except asyncio.CancelledError:  # a hang-up (or the deadline) while the store decides:
                    # wait for its answer, so that what it reserved is settled with the request
                    with contextlib.suppress(Exception):  # refused or failed: nothing is held
                        late = await reserving
                        if late.state is not None:
                            ex.fallback_tickets.append((model, late))
                    raise
                except ProxyError as exc:  # its limit is reached (or the store is down): the next model;
                    # the answer if none is left (a 429 says when this one would take the request)
                    ex.attempts.append({"model": model, "status": exc.status_code(), "error": exc.code or "limited"})
                    last = exc
                    continue
                if ticket.state is not None:
                    ex.fallback_tickets.append((model, ticket))
            if not (breakers.allow(self._url_target) and breakers.allow(model)):  # a half-open probe is taken
                ex.attempts.append({"model": model, "error": "circuit_open"})
                last = last or CircuitOpen(f"The circuit breaker for {model} is open; try again shortly.")
                continue
            body = _body_for(call, plan, index, model)
            retry = 0
            while True:
                began = time.perf_counter()
                seen = ex.generation_id
                try:
                    await self._attempt(model, body, plan, forwarded, ex, send)
                    self.breakers.record(model, ex.error_code is None)  # an in-band error counts too
                    self.breakers.record(self._url_target, True)
                    if ex.attempts:
                        ex.attempts.append({"model": model, "status": ex.status, "s": _since(began)})
                    return
                except ProxyError as exc:
                    verdict = judge(exc)
                    if verdict.breaker_failure is None:  # says nothing of the model's health (a 404)
                        self.breakers.release(model)
                    else:
                        self.breakers.record(model, not verdict.breaker_failure)
                    self.breakers.record(self._url_target, not _transport_failure(exc))
                    status = exc.status_code()
                    attempt = {"model": model, "status": status, "error": exc.code or str(status), "s": _since(began)}
                    if ex.generation_id is not None and ex.generation_id != seen:  # its head came: maybe billed
                        attempt["generation_id"] = ex.generation_id
                    ex.attempts.append(attempt)
                    last = exc
                    if verdict.decision is Decision.STOP:
                        break
                    if verdict.decision is Decision.RETRY and retry + 1 < self.retries.max_attempts:
                        wait = backoff_s(self.retries, retry, verdict.retry_after_s)
                        if wait is not None and loop.time() + wait < deadline:
                            if self.metrics is not None:
                                self.metrics.retry(model, exc.code or str(status))
                            await asyncio.sleep(wait)
                            retry += 1
                            continue
                    break
            if judge(last).decision is Decision.STOP:
                break
        assert last is not None
        last.retries_spent = len(ex.attempts) > 1
        raise last

    async def _attempt(
        self,
        model: str,
        body: bytes,
        plan: RoutePlan,
        forwarded: list[tuple[bytes, bytes]],
        ex: Exchange,
        send: Send,
    ) -> None:
        """One upstream attempt; returns once the response was relayed, raises before commit."""
        timeouts = self.timeouts
        ex.attempt_model = model
        first_byte = Deadline(asyncio.get_running_loop().time() + timeouts.first_byte_timeout_s)
        try:
            response = await self.client.chat(body, forwarded)
        except asyncio.CancelledError:
            if first_byte.expired_here():
                raise UpstreamTimeout(f"{model} sent no response in time.", phase="first_byte") from None
            raise
        finally:
            first_byte.stop()
        try:
            ex.ttfb_s = time.perf_counter() - ex.t0
            ex.generation_id = response.generation_id
            headers = [*response.headers, *self._headers(model, plan, ex)]
            content_type = next((v for n, v in response.headers if n == b"content-type"), b"").lower()
            if content_type.startswith(_EVENT_STREAM) or (ex.stream and not content_type):
                if not content_type:  # strict SSE clients need it
                    headers.append((b"content-type", _EVENT_STREAM))
                first_token_s = plan.first_token_timeout_s or timeouts.first_token_timeout_s
                deadline = asyncio.get_running_loop().time() + first_token_s
                try:
                    await relay_stream(response, ex, headers, send, deadline, self.activity)
                except UpstreamStatusError as exc:  # an error event before the first token
                    exc.redact(self.client.redact)
                    raise
            elif ex.started:  # an earlier attempt's stream head is out: a whole body cannot follow it
                raise UpstreamCut(f"{model} answered a stream request with a non-stream response.")
            else:
                await relay_whole(response, ex, headers, send)
        finally:
            response.close()

    def _estimate_usage(self, call: ChatCall, ex: Exchange) -> None:
        """A stream that ended before its usage chunk (the client hung up, or the upstream cut,
        stalled or failed in-band): estimate tokens, mark the record estimated."""
        prompt = estimate_prompt_tokens(call.body)
        completion = max(0, ex.data_events - 1)
        ex.usage = Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
        ex.extra["estimated"] = True

    async def _settle(self, ex: Exchange, ts: float) -> None:
        principal, plan = ex.principal, ex.plan
        if ex.attempts:
            ex.extra["attempts"] = ex.attempts
        usage = ex.usage
        if ex.ticket is not None and (usage is None or usage.cost_usd is None):  # a cost to reconcile later:
            charge = self.admission.budget_charge(ex.ticket, usage)  # what its budgets are charged now
            if charge is not None:
                ex.extra["budget"] = charge
        record = UsageRecord(
            request_id=ex.request_id,
            ts=ts,
            key_name=principal.name if principal else None,
            team=principal.team if principal else None,
            requested_model=ex.requested_model,
            routed_model=ex.attempt_model or (plan.model if plan else None),
            rule=plan.rule if plan else None,
            model=ex.model,
            provider=ex.provider,
            generation_id=ex.generation_id,
            stream=ex.stream,
            status=ex.status,
            usage=ex.usage,
            finish_reason=ex.finish_reason,
            latency_s=time.perf_counter() - ex.t0,
            ttfb_s=ex.ttfb_s,
            ttft_s=ex.ttft_s,
            done=ex.done,
            cancelled=ex.cancelled,
            error_code=ex.error_code,
            malformed_events=ex.malformed_events,
            extra=ex.extra or None,
        )
        for sink in self.sinks:  # first: synchronous, so the record survives a cancelled settle
            sink.emit(record)
        cancelled: asyncio.CancelledError | None = None
        if ex.ticket is not None:
            try:
                await self.admission.settle(ex.ticket, record)
            except asyncio.CancelledError as exc:  # (shutdown) the fallbacks' tickets are settled still
                cancelled = exc
            except Exception:
                log.exception("settling admission for request %s failed", ex.request_id)
        for model, ticket in ex.fallback_tickets:  # a model that did not answer used no tokens
            try:
                await self.admission.settle(ticket, record if model == record.routed_model else _no_usage(record))
            except asyncio.CancelledError as exc:
                cancelled = exc
            except Exception:
                log.exception("settling admission of %s for request %s failed", model, ex.request_id)
        if cancelled is not None:
            raise cancelled


def _no_usage(record: UsageRecord) -> UsageRecord:
    """``record`` without usage: what a fallback that did not answer settles with."""
    return dataclasses.replace(record, usage=None)


def _body_for(call: ChatCall, plan: RoutePlan, index: int, model: str) -> bytes:
    """The upstream body of attempt ``index``: a fallback replaces ``model`` (and starts the
    native ``models`` list, when the plan sends one, at itself)."""
    if index == 0:
        return plan.body or call.raw
    request = dict(plan.request if plan.request is not None else call.body)
    request["model"] = model
    if "models" in request:  # OpenRouter's own fallback list must not send it back to a failed model
        request["models"] = [model, *plan.fallbacks[index:]]
    return orjson.dumps(request)


def _transport_failure(exc: ProxyError) -> bool:
    """OpenRouter itself could not be reached (counts against the base-URL breaker)."""
    if isinstance(exc, UpstreamTimeout):
        return exc.phase == "connect"
    return exc.code == "upstream_unreachable"


def _since(began: float) -> float:
    return round(time.perf_counter() - began, 4)
