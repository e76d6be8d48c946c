"""When a scripted fault applies: attempt counters and time windows per fault key.

Every attempt whose controls carry a schedule (``Controls.scheduled``) is counted under its
key; the fault applies when every limit that is set allows it:

==================  ===========================================================================
``fail_times: N``   attempt number (0-based) < N: "fail N times, then succeed"
``fail_pattern``    ``pattern[attempt % len(pattern)] == "1"``: ``"1100"`` flaps per attempt
``fail_for_ms: T``  less than T ms since the key's first attempt: "down for T ms, then healthy"
``+ fail_period_ms``  the window repeats: down for T ms in every P ms since the first attempt
==================  ===========================================================================

Without a schedule the fault always applies and nothing is counted.  Keys live until
``clear()`` (``POST /_emulator/reset``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from proxy.emulator.controls import Controls

__all__ = ["FaultSchedule"]


class FaultSchedule:
    """Attempt count and first-attempt time per key; ``clock`` returns monotonic seconds."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._keys: dict[str, tuple[int, float]] = {}

    def applies(self, key: str, controls: Controls) -> bool:
        """Count one attempt under ``key``; True if the fault applies to it."""
        if not controls.scheduled:
            return True
        now = self._clock()
        attempt, since = self._keys.get(key, (0, now))
        self._keys[key] = (attempt + 1, since)
        if controls.fail_times is not None and attempt >= controls.fail_times:
            return False
        pattern = controls.fail_pattern
        if pattern is not None and pattern[attempt % len(pattern)] == "0":
            return False
        if controls.fail_for_ms is not None:
            elapsed_ms = (now - since) * 1000
            if controls.fail_period_ms is not None:
                elapsed_ms %= controls.fail_period_ms
            if elapsed_ms >= controls.fail_for_ms:
                return False
        return True

    def attempts(self) -> dict[str, int]:
        """Attempts counted so far, per key (``GET /_emulator/attempts``)."""
        return {key: attempt for key, (attempt, _) in self._keys.items()}

    def clear(self) -> None:
        self._keys.clear()
