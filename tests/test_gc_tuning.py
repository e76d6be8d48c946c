"""A served worker freezes its startup heap and raises the collector's young threshold;
an app built by tests (many per process) leaves the collector alone."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from proxy.app import ENV_UPSTREAM, app_from_env, create_app
from proxy.config import load_settings
from proxy.gc_tuning import YOUNG_THRESHOLD, tune_gc
from tests.conftest import ALICE_KEY, UPSTREAM_KEY, ServerThread, write_config


@pytest.fixture
def restored_gc() -> Iterator[None]:
    """Undo whatever a test does to the collector (the suite shares one process)."""
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_tune_gc_freezes_the_heap_and_raises_the_young_threshold(restored_gc: None) -> None:
    _, older, oldest = gc.get_threshold()
    kept = {"startup": [object()]}  # a container alive at the call: frozen with the rest

    frozen = tune_gc()

    # frozen objects still die by reference counting (here, or in another test's server
    # thread), which lowers the count: it may only have shrunk since
    assert 0 < gc.get_freeze_count() <= frozen
    assert gc.get_threshold() == (YOUNG_THRESHOLD, older, oldest)
    assert not any(o is kept for o in gc.get_objects())  # frozen objects are walked by no pass
    cycle: list[Any] = []
    cycle.append(cycle)  # made after the freeze: still collected
    del cycle
    assert gc.collect() >= 1


def test_the_served_app_tunes_the_collector_at_startup(
    tmp_path: Path,
    serve: Callable[..., ServerThread],
    emulator: ServerThread,
    monkeypatch: pytest.MonkeyPatch,
    restored_gc: None,
) -> None:
    path = write_config(tmp_path, f"{emulator.url}/api/v1")
    monkeypatch.setenv("PROXY_CONFIG", str(path))
    monkeypatch.setenv("OPENROUTER_API_KEY", UPSTREAM_KEY)
    monkeypatch.delenv(ENV_UPSTREAM, raising=False)
    gc.set_threshold(700, 10, 10)
    app = app_from_env()
    assert gc.get_threshold()[0] == 700  # building the app is not startup

    server = serve(app)
    assert gc.get_threshold()[0] == YOUNG_THRESHOLD
    assert gc.get_freeze_count() > 0
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=ALICE_KEY, max_retries=0)
    answer = client.chat.completions.create(model="fast", messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content


def test_an_app_built_in_process_leaves_the_collector_alone(
    tmp_path: Path, serve: Callable[..., ServerThread], emulator: ServerThread, restored_gc: None
) -> None:
    gc.set_threshold(700, 10, 10)
    frozen = gc.get_freeze_count()
    settings = load_settings(write_config(tmp_path, f"{emulator.url}/api/v1"), {"OPENROUTER_API_KEY": UPSTREAM_KEY})
    serve(create_app(settings))
    assert gc.get_threshold()[0] == 700
    assert gc.get_freeze_count() == frozen
