"""Shared fixtures: real uvicorn servers on free loopback ports, run in threads.

Factories, not globals: ``serve(app)`` starts any ASGI app and returns its base URL;
``proxy_server(...)`` builds a proxy with test keys in front of the emulator.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn
import yaml

from proxy.app import ProxyApp, create_app
from proxy.auth import hash_key
from proxy.config import Settings, load_settings

from .redis_server import flush, redis_cluster, redis_server

REPO = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = REPO.parent / "shared" / "openrouter" / "fixtures"
UPSTREAM_KEY = "sk-or-test-upstream-secret-key-do-not-leak"
ALICE_KEY = "sk-proxy-test-alice-0000000000000000000000000"
BOB_KEY = "sk-proxy-test-bob-11111111111111111111111111111"


@pytest.fixture(autouse=True)
def _close_openai_clients(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every sync ``openai.OpenAI`` a test creates is closed after it (no leaked sockets)."""
    import openai

    made: list[openai.OpenAI] = []

    class Tracked(openai.OpenAI):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(openai, "OpenAI", Tracked)
    yield
    for client in made:
        client.close()


class ServerThread:
    """uvicorn serving ``app`` on 127.0.0.1:<free port> in a daemon thread, with the HTTP
    protocol ``openrouter-proxy serve`` uses (``http``: another, e.g. uvicorn's own
    ``"httptools"``)."""

    def __init__(self, app: Any, *, lifespan: str = "on", http: Any = None) -> None:
        from proxy.http_protocol import head_guard_protocol

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(
            app,
            lifespan=lifespan,
            log_config=None,
            log_level=None,
            access_log=False,
            loop="uvloop",
            http=http or head_guard_protocol(30.0, 65536),
            timeout_graceful_shutdown=2,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


@pytest.fixture
def fresh_redis(redis_url: str) -> str:
    """The module's redis-server, emptied for this test."""
    flush(redis_url)
    return redis_url


@pytest.fixture(scope="session")
def redis_cluster_url() -> Iterator[str]:
    """``redis+cluster://...``: a three-node Redis Cluster for the whole session."""
    with redis_cluster() as url:
        yield url


@pytest.fixture
def fresh_cluster(redis_cluster_url: str) -> str:
    """The session's Redis Cluster, emptied for this test."""
    flush(redis_cluster_url)
    return redis_cluster_url


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
def store_url(request: pytest.FixtureRequest) -> str | None:
    """Run a test against the in-memory store, a real, emptied redis-server and a real,
    emptied three-node Redis Cluster."""
    if request.param == "memory":
        return None
    url: str = request.getfixturevalue("fresh_redis" if request.param == "redis" else "fresh_cluster")
    return url


@pytest.fixture
def serve() -> Iterator[Callable[..., ServerThread]]:
    started: list[ServerThread] = []

    def _serve(app: Any, **kwargs: Any) -> ServerThread:
        server = ServerThread(app, **kwargs).start()
        started.append(server)
        return server

    yield _serve
    for server in reversed(started):
        server.stop()


@pytest.fixture(scope="session")
def emulator_app() -> Any:
    from proxy.emulator import create_app as create_emulator

    return create_emulator(fixtures_dir=SHARED_FIXTURES if SHARED_FIXTURES.is_dir() else None, api_key=UPSTREAM_KEY)


@pytest.fixture(scope="session")
def emulator(emulator_app: Any) -> Iterator[ServerThread]:
    server = ServerThread(emulator_app, lifespan="off").start()
    yield server
    server.stop()


DEFAULT_ROUTING = (
    "aliases:\n  gpt-4o-mini: openai/gpt-4o-mini\n  fast: gpt-4o-mini\n  claude: anthropic/claude-haiku-4.5\n"
)


def write_config(
    tmp_path: Path,
    upstream_url: str,
    extra: str = "",
    read_timeout_s: float = 5,
    upstream_extra: str = "",
    routing: str | None = None,
) -> Path:
    """A config.yaml in ``tmp_path`` with two keys (alice/research, bob/web), and
    ``policies/routing.yaml`` (``routing``, default: three aliases). ``extra`` (YAML) adds
    keys to the base sections or new sections; ``upstream_extra`` is lines inside ``upstream:``."""
    policies = tmp_path / "policies"
    policies.mkdir(exist_ok=True)
    (policies / "routing.yaml").write_text(DEFAULT_ROUTING if routing is None else routing)
    base = yaml.safe_load(
        f"""
server:
  max_body_bytes: 65536
upstream:
  base_url: {upstream_url}
  app_url: https://example.test/app
  app_title: proxy-tests
  read_timeout_s: {read_timeout_s}
{upstream_extra}
usage:
  log_path: usage.jsonl
  flush_interval_s: 0.05
retries:
  backoff_base_s: 0.01
  backoff_cap_s: 0.05
breaker:
  min_requests: 1000
keys:
  - name: alice
    team: research
    sha256: {hash_key(ALICE_KEY)}
  - name: bob
    team: web
    sha256: {hash_key(BOB_KEY)}
"""
    )
    for section, values in (yaml.safe_load(extra) or {}).items():  # ``extra`` adds to a section
        if isinstance(values, dict) and isinstance(base.get(section), dict):
            base[section] = {**base[section], **values}
        else:
            base[section] = values
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(base, sort_keys=False))
    return path


@dataclass
class ProxyUnderTest:
    server: ServerThread
    app: ProxyApp
    settings: Settings

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def base_url(self) -> str:
        return f"{self.server.url}/v1"

    @property
    def usage_log(self) -> Path:
        path = self.settings.usage.log_path
        assert path is not None
        return path

    def records(self, count: int | None = None, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Usage records written so far; waits until ``count`` exist (the log flushes async)."""
        import orjson

        deadline = time.monotonic() + timeout
        while True:
            lines = self.usage_log.read_bytes().splitlines() if self.usage_log.exists() else []
            records = [orjson.loads(line) for line in lines if line.strip()]
            if count is None or len(records) >= count or time.monotonic() > deadline:
                return records
            time.sleep(0.02)


@pytest.fixture
def proxy_server(
    tmp_path: Path, serve: Callable[..., ServerThread], emulator: ServerThread
) -> Callable[..., ProxyUnderTest]:
    def _make(
        *,
        upstream_url: str | None = None,
        extra: str = "",
        api_key: str = UPSTREAM_KEY,
        read_timeout_s: float = 5,
        upstream_extra: str = "",
        router: Any = None,
        routing: str | None = None,
        http: Any = None,
    ) -> ProxyUnderTest:
        path = write_config(
            tmp_path, upstream_url or f"{emulator.url}/api/v1", extra, read_timeout_s, upstream_extra, routing
        )
        settings = load_settings(path, {"OPENROUTER_API_KEY": api_key})
        app = create_app(settings)
        if router is not None:
            app.router = router
        return ProxyUnderTest(serve(app, http=http), app, settings)

    return _make


class FixedRouter:
    """A stand-in router for pipeline tests: fixed fallback chains and per-model TTFT limits."""

    def __init__(self, fallbacks: dict[str, tuple[str, ...]], first_token_timeout_s: float | None = None) -> None:
        self.fallbacks = fallbacks
        self.first_token_timeout_s = first_token_timeout_s

    def plan(self, call: Any, principal: Any, headers: Any = ()) -> Any:
        from proxy.types import RoutePlan

        chain = self.fallbacks.get(call.model, ())
        return RoutePlan(
            model=call.model,
            rule="test-chain" if chain else None,
            fallbacks=chain,
            first_token_timeout_s=self.first_token_timeout_s,
        )

    def model_aliases(self) -> dict[str, str]:
        return {}

    async def start(self) -> None:
        """The app's lifespan starts and stops its router (policy hot reload)."""

    async def stop(self) -> None:
        pass


@pytest.fixture
def proxy(proxy_server: Callable[..., ProxyUnderTest]) -> ProxyUnderTest:
    return proxy_server()
