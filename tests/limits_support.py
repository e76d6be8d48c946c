"""Factories for the limits tests: limiters over either store, fake clocks, a Redis we can kill."""

from __future__ import annotations

import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import orjson
import redis

from proxy.catalog import ModelCatalog
from proxy.config import LimitsSettings
from proxy.limits import Limiter, LimitsPolicy, open_limiter
from proxy.limits.policy import LimitsFile
from proxy.store import Store, open_store
from proxy.types import ChatCall, Principal, RoutePlan, Usage, UsageRecord

from .factories import free_port, usage_record
from .redis_server import flush, redis_binary

if TYPE_CHECKING:
    from .conftest import ProxyUnderTest

MODELS = orjson.loads((Path(__file__).resolve().parents[1] / "proxy/emulator/data/models.json").read_bytes())
MINI = "openai/gpt-4o-mini"  # 0.15 USD / M prompt tokens, 0.60 USD / M completion tokens
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z


class FakeClock:
    """A settable Unix clock (seconds)."""

    def __init__(self, now: float = T0 + 3600) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def catalog() -> ModelCatalog:
    async def fetch() -> Any:
        return MODELS

    return ModelCatalog(fetch, 3600)


def policy(spec: dict[str, Any]) -> LimitsPolicy:
    return LimitsPolicy(LimitsFile.model_validate(spec))


def limiter(store: Store, spec: dict[str, Any], clock: Any = time.time, **settings: Any) -> Limiter:
    return open_limiter(LimitsSettings(**settings), policy(spec), store, catalog(), clock=clock)


def principal(name: str = "alice", team: str | None = None, tier: str | None = "t") -> Principal:
    return Principal(key_id=f"{name:x<12}"[:12], name=name, team=team, tier=tier)


def call(model: str = MINI, content: str = "hello there", **body: Any) -> ChatCall:
    data = {"model": model, "messages": [{"role": "user", "content": content}], **body}
    return ChatCall(body=data, raw=orjson.dumps(data), model=model, stream=False)


def plan(model: str = MINI) -> RoutePlan:
    return RoutePlan(model=model)


def record(usage: Usage | None = None, status: int = 200) -> UsageRecord:
    return usage_record(team=None, model=MINI, status=status, usage=usage, generation_id=None)


def open_test_store(url: str | None) -> Store:
    """A store; a Redis one is flushed first so every test starts from zero."""
    if url is not None:
        flush(url)
    return open_store(url)


class RestartableRedis:
    """A ``redis-server`` on a fixed port that tests can kill, freeze and start again."""

    def __init__(self) -> None:
        self.binary = redis_binary()
        self.port = free_port()
        self.workdir = tempfile.TemporaryDirectory()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RestartableRedis:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen([*args, "--dir", self.workdir.name], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                with redis.Redis(port=self.port, socket_timeout=0.2) as client:
                    if client.ping():
                        return self
            except redis.RedisError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def freeze(self, frozen: bool) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP if frozen else signal.SIGCONT)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
        self.kill()
        self.workdir.cleanup()


def scraped(proxy: ProxyUnderTest, series: str) -> float:
    """A series' value from ``GET /metrics``."""
    for line in httpx.get(f"{proxy.url}/metrics").text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[1])
    raise AssertionError(f"{series} is not exported")
