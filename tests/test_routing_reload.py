"""Hot reload: a changed routing.yaml takes effect, an invalid one is rejected, SIGHUP reloads."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from proxy.parse import parse_chat_request
from proxy.routing import ReloadingRouter
from proxy.types import Principal
from proxy.yamlsrc import ConfigError

ALICE = Principal(key_id="k", name="alice", team="research")
CALL = parse_chat_request(orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}))


def write(folder: Path, target: str) -> None:
    path = folder / "routing.yaml"
    path.write_text(f"aliases:\n  m: {target}\n")
    os.utime(path, ns=(path.stat().st_mtime_ns + 1_000_000, path.stat().st_mtime_ns + 1_000_000))


async def until(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` every 10 ms for up to 3 s (the reload happens in the background)."""
    for _ in range(300):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met within 3 s")


@pytest.mark.asyncio
async def test_edits_apply_invalid_ones_are_rejected_and_plans_in_flight_stay(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write(tmp_path, "x/one")
    router = ReloadingRouter(tmp_path, interval_s=0.02)
    await router.start()
    try:
        in_flight = router.plan(CALL, ALICE)
        first_hash = router.policy_hash
        write(tmp_path, "x/two")
        await until(lambda: router.plan(CALL, ALICE).model == "x/two")
        assert in_flight.model == "x/one" and in_flight.policy_hash == first_hash
        assert router.policy_hash != first_hash and router.reloads == 1
        good_hash = router.policy_hash

        with caplog.at_level(logging.ERROR, logger="proxy.routing"):
            (tmp_path / "routing.yaml").write_text("aliases:\n  m: x/three\nrules:\n  - nmae: oops\n")
            await until(lambda: router.rejected == 1)
            await asyncio.sleep(0.1)  # later polls do not retry or log the same bad file again
        assert router.rejected == 1
        assert router.plan(CALL, ALICE).model == "x/two" and router.policy_hash == good_hash
        (message,) = [r.getMessage() for r in caplog.records if r.name == "proxy.routing"]
        assert f"rejected; keeping policy {good_hash}" in message and "rules.0.nmae: unknown key" in message

        write(tmp_path, "x/four")
        await until(lambda: router.plan(CALL, ALICE).model == "x/four")
        # a deploy deleting and rewriting the file, or truncating it first, lifts no rule meanwhile
        (tmp_path / "routing.yaml").unlink()
        await until(lambda: router.rejected == 2)
        (tmp_path / "routing.yaml").write_text("")
        await until(lambda: router.rejected == 3)
        assert router.plan(CALL, ALICE).model == "x/four"
        (tmp_path / "routing.yaml").write_text("aliases:\n  m: x/four\n  m: x/five\n")  # a repeated key
        await until(lambda: router.rejected == 4)
        (tmp_path / "routing.yaml").write_bytes(b"aliases:\n  m: x/\xff\n")  # not UTF-8
        await until(lambda: router.rejected == 5)
        assert router.plan(CALL, ALICE).model == "x/four"
        (tmp_path / "routing.yaml").write_text("rules: []\n")  # clearing the policy on purpose
        await until(lambda: router.plan(CALL, ALICE).model == "m")
    finally:
        await router.stop()


@pytest.mark.asyncio
async def test_sighup_reloads_at_once(tmp_path: Path) -> None:
    write(tmp_path, "x/one")
    router = ReloadingRouter(tmp_path, interval_s=3600)  # the poll never comes in time
    await router.start()
    try:
        if not router._hup:
            pytest.skip("SIGHUP handlers need the main thread")
        write(tmp_path, "x/two")
        os.kill(os.getpid(), signal.SIGHUP)
        await until(lambda: router.plan(CALL, ALICE).model == "x/two")
    finally:
        await router.stop()
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL  # stop() removed the handler


def test_an_invalid_file_at_startup_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "routing.yaml").write_text("aliases:\n  a: b\n  b: a\n")
    with pytest.raises(ConfigError):
        ReloadingRouter(tmp_path)
