"""OpenRouter emulator: a raw ASGI app speaking OpenRouter's 2026 wire format.

Stand-in upstream for tests and load tests (openrouter-api.md and the fixtures in
``data/fixtures`` are the reference).  Serve with uvicorn::

    uvicorn.run(create_app(), host="127.0.0.1", port=8099, loop="uvloop", http="httptools")

and point clients at ``http://127.0.0.1:8099/api/v1``.  Per-request behaviour is chosen by
the body object ``"emulator": {...}`` or ``x-emulator-*`` headers, per model with its
``faults`` entries (``controls.py`` has the table), or by ``emulator/<fault>`` model ids
(``route.py``).  Fault schedules ("fail twice", "down for 60 s", flapping) are
``schedule.py``; every request is recorded (``records.EmulatedRequest``).  TCP resets and
silent peers for tests: ``tests/faultnet.py``.
"""

from proxy.emulator.app import FIXTURES_DIR, Emulator, create_app
from proxy.emulator.records import EmulatedRequest

__all__ = ["FIXTURES_DIR", "EmulatedRequest", "Emulator", "create_app"]
