"""The limiter's script lane against a real redis-server: pipelining, deferral, recovery."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from proxy.deadline import Deadline
from proxy.limits.lane import ScriptLane

from .limits_support import RestartableRedis

ECHO = "return ARGV[1]"
INCR = "return redis.call('INCRBY', KEYS[1], ARGV[1])"


@contextlib.asynccontextmanager
async def lane_on(
    server: RestartableRedis, socket_timeout: float, stall_s: float
) -> AsyncIterator[tuple[aioredis.Redis, ScriptLane]]:
    """A client of ``server`` and a lane over it, closed after use."""
    client = aioredis.Redis.from_url(server.url, socket_timeout=socket_timeout)
    lane = ScriptLane(client, stall_s=stall_s)
    try:
        yield client, lane
    finally:
        await lane.aclose()
        await client.aclose()


@pytest.fixture
def server() -> Iterator[RestartableRedis]:
    proc = RestartableRedis().start()
    yield proc
    proc.close()


@pytest.mark.asyncio
async def test_replies_reach_their_callers_in_order_and_deferred_calls_share_the_next_write(
    server: RestartableRedis,
) -> None:
    client = aioredis.Redis.from_url(server.url)
    lane = ScriptLane(client, defer_s=5.0)  # a deferred call alone would wait 5 s
    echo, incr = client.register_script(ECHO), client.register_script(INCR)
    try:
        replies = await asyncio.gather(*(lane.evalsha(echo, [], [f"r{i}"], 2.0) for i in range(200)))
        assert replies == [f"r{i}".encode() for i in range(200)]
        deferred = asyncio.ensure_future(lane.evalsha(incr, ["n"], [5], 10.0, defer=True))
        await asyncio.sleep(0.05)
        assert not deferred.done()  # still waiting for a write to share
        assert await client.get("n") is None
        await asyncio.wait_for(lane.evalsha(echo, [], ["now"], 2.0), 1.0)
        assert await asyncio.wait_for(deferred, 1.0) == 5  # written before the immediate call
        with pytest.raises(ResponseError):
            await lane.evalsha(client.register_script("return redis.call('NOPE')"), [], [], 2.0)
        assert await lane.evalsha(echo, [], ["after an error reply"], 2.0) == b"after an error reply"
    finally:
        await lane.aclose()
        await client.aclose()


@pytest.mark.asyncio
async def test_scripts_are_loaded_again_after_a_flush_and_a_restart(server: RestartableRedis) -> None:
    client = aioredis.Redis.from_url(server.url)
    lane = ScriptLane(client)
    incr = client.register_script(INCR)
    try:
        assert await lane.evalsha(incr, ["n"], [1], 2.0) == 1
        await client.script_flush()
        assert await lane.evalsha(incr, ["n"], [1], 2.0) == 2  # NOSCRIPT answered by loading it
        server.kill()
        with pytest.raises((ConnectionError, OSError, TimeoutError)):
            await lane.evalsha(incr, ["n"], [1], 2.0)
        server.start()
        assert await lane.evalsha(incr, ["n"], [1], 2.0) == 1  # a new server: new connection, script loaded
    finally:
        await lane.aclose()
        await client.aclose()


@pytest.mark.asyncio
async def test_a_frozen_server_times_calls_out_and_replies_stay_in_step_after_it_thaws(
    server: RestartableRedis,
) -> None:
    client = aioredis.Redis.from_url(server.url)
    lane = ScriptLane(client)
    echo = client.register_script(ECHO)
    try:
        assert await lane.evalsha(echo, [], ["warm"], 2.0) == b"warm"
        server.freeze(True)
        try:
            with pytest.raises(TimeoutError):
                await lane.evalsha(echo, [], ["lost"], 0.1)
        finally:
            server.freeze(False)
        # the late reply to "lost" is read and dropped: the next caller gets its own reply
        assert await lane.evalsha(echo, [], ["mine"], 2.0) == b"mine"
    finally:
        await lane.aclose()
        await client.aclose()


@pytest.mark.asyncio
async def test_deadline_cancels_only_what_it_timed_and_tells_other_cancellations_apart() -> None:
    async def wait_with(deadline_s: float) -> str:
        deadline = Deadline(asyncio.get_running_loop().time() + deadline_s)
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            if deadline.expired_here():
                return "timed out"
            raise
        finally:
            deadline.stop()
        return "finished"

    assert await wait_with(0.01) == "timed out"
    task = asyncio.ensure_future(wait_with(5.0))
    await asyncio.sleep(0.01)
    task.cancel()  # someone else's cancellation (a hang-up, a shutdown) is not a timeout
    with pytest.raises(asyncio.CancelledError):
        await task

    async def quick() -> int:
        deadline = Deadline(asyncio.get_running_loop().time() + 5.0)
        try:
            await asyncio.sleep(0)
        finally:
            deadline.stop()
        await asyncio.sleep(0.02)  # a stopped deadline never fires
        return asyncio.current_task().cancelling()  # type: ignore[union-attr]

    assert await quick() == 0


@pytest.mark.asyncio
async def test_a_stall_outlived_by_a_frozen_server_leaves_no_call_written_that_its_caller_gave_up(
    server: RestartableRedis,
) -> None:
    """Frozen past the stall limit: the lane drops its connection, and the reconnection's
    handshake is bounded (it gives up while the server is frozen, failing the queued calls).
    No call given up on is written when the server thaws; deferred ones are."""
    async with lane_on(server, socket_timeout=0.3, stall_s=0.2) as (client, lane):
        incr = client.register_script(INCR)
        await lane.connect()
        assert await lane.evalsha(incr, ["held"], [0], 2.0) == 0
        server.freeze(True)
        try:
            with pytest.raises(TimeoutError):
                await lane.evalsha(incr, ["in-flight"], [1], 0.1)  # written before the stall
            await asyncio.sleep(0.3)
            with pytest.raises((TimeoutError, ConnectionError)):
                await lane.evalsha(incr, ["held"], [1], 0.1)  # the stall is noticed: connection dropped
            given_up = [asyncio.ensure_future(lane.evalsha(incr, ["held"], [1], 0.05)) for _ in range(3)]
            released = asyncio.ensure_future(lane.evalsha(incr, ["released"], [1], 5.0, defer=True))
            await asyncio.sleep(0.6)  # the new connection's handshake gives up (socket_timeout 0.3 s)
            for call in given_up:
                assert isinstance(call.exception(), TimeoutError | ConnectionError)
        finally:
            server.freeze(False)
        assert await lane.evalsha(incr, ["after"], [1], 2.0) == 1
        await asyncio.wait_for(asyncio.gather(released, return_exceptions=True), 2.0)
        assert await client.get("held") == b"0"  # no call given up on was written late


@pytest.mark.asyncio
async def test_calls_given_up_while_the_connection_opens_are_not_written_when_it_opens(
    server: RestartableRedis,
) -> None:
    """The reconnection's handshake succeeds only after the server thaws; meanwhile some
    callers gave up (their timeout passed) and one still waits. Only the waiting one is
    written: the others' callers decided without them."""
    async with lane_on(server, socket_timeout=3.0, stall_s=0.2) as (client, lane):
        incr = client.register_script(INCR)
        assert await lane.evalsha(incr, ["warm"], [1], 2.0) == 1  # the script is loaded (no NOSCRIPT later)
        server.freeze(True)
        try:
            with pytest.raises(TimeoutError):
                await lane.evalsha(incr, ["in-flight"], [1], 0.1)
            await asyncio.sleep(0.3)
            with pytest.raises((TimeoutError, ConnectionError)):
                await lane.evalsha(incr, ["stalled"], [1], 0.1)  # the stall is noticed: connection dropped
            waiting = asyncio.ensure_future(lane.evalsha(incr, ["waited"], [1], 5.0))
            given_up = [asyncio.ensure_future(lane.evalsha(incr, ["given-up"], [1], 0.05)) for _ in range(3)]
            await asyncio.sleep(0.3)  # they time out; the handshake is still waiting
            assert all(isinstance(call.exception(), TimeoutError) for call in given_up)
        finally:
            server.freeze(False)
        assert await asyncio.wait_for(waiting, 4.0) == 1
        assert await client.get("given-up") is None
