"""Timestamps along one request's path, for ``loadtests/phases.py`` (never loaded by the proxy itself).

``phases.py`` puts this folder on a child process's ``PYTHONPATH`` and sets
``PHASE_PROBE`` to a folder; Python then imports this module at start-up, and it wraps,
in that process only:

* ``HttpToolsProtocol.data_received`` (uvicorn): ``recv``, bytes arrived from a client;
* ``RequestResponseCycle.run_asgi``: ``app`` (the ASGI app called) and ``done`` (it returned);
* ``RequestResponseCycle.send``: ``last``, the response's last body message handed to uvicorn;
* ``aiohttp.ClientSession._request``: ``up`` (the upstream request begins) and ``head``
  (its response head arrived).

Times are ``perf_counter_ns``. A thread polls the folder: ``reset-<pid>`` clears the
lists, ``dump-<pid>`` writes them to ``phases-<pid>.json``. The wrappers cost a few
hundred nanoseconds each; they bend nothing ``phases.py`` reports by more than that.
"""

from __future__ import annotations

import os

_FOLDER = os.environ.get("PHASE_PROBE")

if _FOLDER:
    import json
    import threading
    import time
    from pathlib import Path
    from time import perf_counter_ns
    from typing import Any

    import aiohttp
    from uvicorn.protocols.http import httptools_impl

    _marks: dict[str, list[int]] = {name: [] for name in ("recv", "app", "last", "done", "up", "head")}
    _recv, _app, _last, _done = (
        _marks["recv"].append,
        _marks["app"].append,
        _marks["last"].append,
        _marks["done"].append,
    )
    _up, _head = _marks["up"].append, _marks["head"].append

    _Protocol = httptools_impl.HttpToolsProtocol
    _Cycle = httptools_impl.RequestResponseCycle
    _data_received, _run_asgi, _send = _Protocol.data_received, _Cycle.run_asgi, _Cycle.send
    _request = aiohttp.ClientSession._request

    def data_received(self: Any, data: bytes) -> None:
        _recv(perf_counter_ns())
        _data_received(self, data)

    async def run_asgi(self: Any, app: Any) -> None:
        _app(perf_counter_ns())
        try:
            await _run_asgi(self, app)
        finally:
            _done(perf_counter_ns())

    async def send(self: Any, message: Any) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            _last(perf_counter_ns())
        await _send(self, message)

    async def request(self: Any, *args: Any, **kwargs: Any) -> Any:
        _up(perf_counter_ns())
        response = await _request(self, *args, **kwargs)
        _head(perf_counter_ns())
        return response

    _Protocol.data_received = data_received  # type: ignore[method-assign]
    _Cycle.run_asgi = run_asgi  # type: ignore[method-assign]
    _Cycle.send = send  # type: ignore[method-assign]
    aiohttp.ClientSession._request = request  # type: ignore[method-assign]

    def _serve(folder: Path, pid: int) -> None:
        reset, dump = folder / f"reset-{pid}", folder / f"dump-{pid}"
        while True:
            time.sleep(0.05)
            if reset.exists():
                for marks in _marks.values():
                    marks.clear()
                reset.unlink()
            if dump.exists():
                (folder / f"phases-{pid}.json").write_text(json.dumps(_marks))
                dump.unlink()

    threading.Thread(target=_serve, args=(Path(_FOLDER), os.getpid()), daemon=True).start()
