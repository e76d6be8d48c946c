"""``POST /api/v1/chat/completions``: the one place that knows the order of the steps.

controls → fixture replay (after the first-byte delay) → parse request → route over ``model``
+ ``models`` (``route.py``: per-model controls, context check, scheduled faults; failed
candidates are skipped, the last error is returned when none answers) → first-byte delay →
no-answer fault (``reset``, ``black-hole``) → answer → render → send → record.
``emulator/<fault>`` model ids answer like ``openai/gpt-4o-mini`` with ``<fault>`` applied.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass

import orjson

from proxy.emulator.answer import Answer, compose_answer
from proxy.emulator.controls import DEFAULT_KEEPALIVE_INTERVAL_MS, ControlError, Controls, parse_controls
from proxy.emulator.faults import Tail, shape_stream
from proxy.emulator.fixtures import FixtureError, FixtureStore
from proxy.emulator.records import Exchange, GenerationRecord, GenerationStore
from proxy.emulator.render import render_completion, render_stream
from proxy.emulator.request import RequestError, parse_chat_request
from proxy.emulator.route import DEFAULT_MODEL, Router
from proxy.emulator.sender import STALL_LIMIT_S, ClientWatch, Pacing, send_events, send_reset, send_whole
from proxy.emulator.types import NO_ANSWER_FAULTS, Headers, Receive, Send
from proxy.emulator.wire import JSON_HEADERS, SSE_HEADERS, error_body, new_generation_id

__all__ = ["ChatEndpoint"]


class ChatEndpoint:
    """Chat completions over shared emulator state (router and its schedule, generation store)."""

    def __init__(
        self, router: Router, fixtures: FixtureStore, generations: GenerationStore, rng: random.Random
    ) -> None:
        self._router = router
        self._fixtures = fixtures
        self._generations = generations
        self._rng = rng

    async def handle(self, body: bytes, headers: Mapping[str, str], receive: Receive, send: Send, ex: Exchange) -> None:
        """Answer one request; fills ``ex`` (models, stream, fault, cancelled, generation id)."""
        watch = ClientWatch(receive)
        arrived = (time.time(), time.perf_counter())
        try:
            await self._handle(body, headers, watch, send, ex, arrived)
        finally:
            watch.close()

    async def _handle(
        self,
        body: bytes,
        headers: Mapping[str, str],
        watch: ClientWatch,
        send: Send,
        ex: Exchange,
        arrived: tuple[float, float],
    ) -> None:
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return await _bad_request(send, "Invalid JSON in request body")
        if not isinstance(doc, dict):
            return await _bad_request(send, "Request body must be a JSON object")
        ex.stream = doc.get("stream") is True
        try:
            controls = parse_controls(doc.get("emulator"), headers)
        except ControlError as exc:
            return await _bad_request(send, str(exc))
        gid = new_generation_id(self._rng, int(time.time()))
        if controls.fixture is not None:
            if controls.first_byte_delay_ms and await watch.sleep(controls.first_byte_delay_ms / 1000):
                ex.cancelled = True
                return None
            return await self._replay(controls, gid, watch, send, ex)
        try:
            request = parse_chat_request(doc, DEFAULT_MODEL)
        except RequestError as exc:
            return await _bad_request(send, str(exc))
        ex.model = ex.requested_model = request.models[0]
        route = self._router.route(request, controls, gid)
        scoped, fault = route.controls, route.fault
        ex.fault = fault
        if scoped.first_byte_delay_ms and await watch.sleep(scoped.first_byte_delay_ms / 1000):
            ex.cancelled = True
            return None
        if route.model is None:
            assert route.error is not None
            ex.generation_id = gid if route.error.status == 502 else None
            return await send_whole(send, route.error.status, route.error.headers, route.error.body)
        ex.model = route.model.requested
        if fault in NO_ANSWER_FAULTS:
            return await _no_answer(fault, watch, send, ex)
        answer = compose_answer(request, route.model, scoped.completion_tokens, self._rng)
        ex.generation_id = gid
        call = _Call(scoped, gid, headers, watch, send, ex, arrived)
        await self._answer(call, request.stream, answer, fault)
        return None

    async def _replay(self, controls: Controls, gid: str, watch: ClientWatch, send: Send, ex: Exchange) -> None:
        assert controls.fixture is not None
        try:
            replay = self._fixtures.replay(controls.fixture, gid, controls.retry_after)
        except FixtureError as exc:
            return await _bad_request(send, str(exc))
        if not replay.stream:
            return await send_whole(send, replay.status, replay.headers, replay.chunks[0])
        pacing = Pacing(chunk_delay=controls.chunk_delay_ms / 1000)
        ex.cancelled = not await send_events(send, watch, replay.status, replay.headers, replay.chunks, pacing)
        return None

    async def _answer(self, call: _Call, stream: bool, answer: Answer, fault: str | None) -> None:
        """Send the 200 answer (with a non-error fault, if any) and record the generation."""
        controls = call.controls
        created = int(time.time())
        ids: Headers = [(b"x-generation-id", call.gid.encode()), (b"x-provider-name", answer.provider.encode())]
        head_at = time.perf_counter()
        completed = False
        try:
            if stream:
                plan = render_stream(answer, call.gid, created, controls.keepalive_comments, controls.usage_shape)
                events, tail = shape_stream(plan, fault, controls.cut_after if fault == "cut" else controls.stall_after)
                slow = fault == "slow-first-token"
                interval = controls.keepalive_interval_ms
                pacing = Pacing(
                    chunk_delay=controls.chunk_delay_ms / 1000,
                    pause_at=plan.first_data if slow else -1,
                    pause=controls.first_token_delay_ms / 1000,
                    keepalive_every=(DEFAULT_KEEPALIVE_INTERVAL_MS if interval is None else interval) / 1000,
                )
                headers = [*SSE_HEADERS, *ids]
                completed = await send_events(call.send, call.watch, 200, headers, events, pacing, tail)
            else:
                completed = await _send_body(call, answer, fault, created, ids)
                head_at = time.perf_counter()
        finally:
            call.ex.cancelled = not completed
            wall, clock = call.arrived
            self._generations.add(
                GenerationRecord(
                    id=call.gid,
                    model=answer.model,
                    provider=answer.provider,
                    streamed=stream,
                    cancelled=not completed,
                    finish_reason="error" if fault == "midstream-error" else answer.finish_reason,
                    native_finish_reason=answer.native_finish_reason,
                    usage=answer.usage,
                    created_at=wall,
                    latency_ms=round((head_at - clock) * 1000),
                    generation_time_ms=round((time.perf_counter() - clock) * 1000),
                    user_agent=call.headers.get("user-agent"),
                    http_referer=call.headers.get("http-referer"),
                )
            )


@dataclass(frozen=True, slots=True)
class _Call:
    """Per-request context of the answer step."""

    controls: Controls
    gid: str
    headers: Mapping[str, str]
    watch: ClientWatch
    send: Send
    ex: Exchange
    arrived: tuple[float, float]
    """(unix seconds, perf_counter seconds) when the request arrived."""


async def _send_body(call: _Call, answer: Answer, fault: str | None, created: int, ids: Headers) -> bool:
    """Non-stream 200: whole body, or the fault's non-stream analogue; False if the client left."""
    headers = [*JSON_HEADERS, *ids]
    if fault == "midstream-error":
        keep = midpoint_pieces(answer)
        partial = dataclasses.replace(answer, content=answer.content[:keep], finish_reason="error")
        body = render_completion(partial, call.gid, created, error=True)
    else:
        body = render_completion(answer, call.gid, created)
    if fault == "slow-first-token" and await call.watch.sleep(call.controls.first_token_delay_ms / 1000):
        return False
    if fault == "malformed":
        body = body[: len(body) // 2]
    if fault == "stall" or fault == "cut":
        half = [body[: len(body) // 2]]
        tail: Tail = "stall" if fault == "stall" else "cut"
        return await send_events(call.send, call.watch, 200, headers, half, Pacing(), tail)
    await send_whole(call.send, 200, headers, body)
    return True


async def _no_answer(fault: str, watch: ClientWatch, send: Send, ex: Exchange) -> None:
    """``black-hole``: silence until the client leaves (then, after ``STALL_LIMIT_S``, a reset);
    ``reset``: close at once.  Either way no response head is sent."""
    if fault == "black-hole" and await watch.sleep(STALL_LIMIT_S):
        ex.cancelled = True
        return
    try:
        await send_reset(send)
    finally:
        ex.status = 0


def midpoint_pieces(answer: Answer) -> int:
    """How many content pieces a non-stream ``midstream-error`` keeps (about half)."""
    return max(1, len(answer.content) // 2)


async def _bad_request(send: Send, message: str) -> None:
    await send_whole(send, 400, JSON_HEADERS, error_body(message, 400))
