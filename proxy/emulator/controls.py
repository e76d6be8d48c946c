"""Per-request emulator controls, read from the body and ``x-emulator-*`` headers.

Sources, later wins: the request body's ``"emulator": {...}`` object (passes through a proxy
untouched; OpenAI SDK: ``extra_body={"emulator": {...}}``), then request headers
``x-emulator-<name>`` (``-`` and ``_`` are interchangeable in ``<name>``; ``faults`` as JSON
text).  Unknown names and bad values raise ``ControlError`` (answered with 400).  Times are
milliseconds.

======================  ===================================================================
control                 meaning
======================  ===================================================================
``fault``               one of ``types.FaultName`` (below); also by model id ``emulator/<fault>``
``fail_times``          the fault applies to the first N attempts under ``fault_key``
``fail_for_ms``         ... during the first T ms after the key's first attempt
``fail_period_ms``      with ``fail_for_ms``: that window repeats every P ms (flapping in time)
``fail_pattern``        ``"1100"``: per attempt under the key, cycling (flapping per attempt)
``fault_key``           counter key (default: the fault name; ``<model>:<fault>`` in ``faults``)
``faults``              per-model scripts ``{"<model id>": {<controls>}}`` (below)
``retry_after``         ``Retry-After`` seconds on error-402/429/503 (503 has 30 otherwise)
``first_byte_delay_ms`` silence before the response head (any reply, errors included)
``first_token_delay_ms`` ``slow-first-token``: head and comments, then this long to the first data
``keepalive_interval_ms`` ``slow-first-token``: a comment this often while waiting (default 1000;
                        0 = none)
``keepalive_comments``  ``: OPENROUTER PROCESSING`` comments right after the head (default 2)
``chunk_delay_ms``      between stream events
``stall_after``         ``stall``: data events sent before going silent (default: about half)
``cut_after``           ``cut``: data events sent before the connection drops (default: half)
``completion_tokens``   answer length (content deltas)
``usage_shape``         ``repeat_finish`` (2026), ``empty_choices``, ``separate_2025``
``fixture``             replay a fixture file byte for byte (flat form only)
======================  ===================================================================

Faults: ``error-400`` … ``error-503`` (OpenRouter's fixture bodies and headers),
``error-400-context`` (typed ``context_length_exceeded``), ``error-524``, ``error-529``;
``midstream-error``, ``stall``, ``cut``, ``no-done``, ``malformed``, ``slow-first-token``;
``reset`` (connection closed before any byte) and ``black-hole`` (request read, never
answered).  The schedule (``fail_*``, all that are set must allow it) is ``schedule.py``.

``faults`` scripts models one by one.  The entry of the model being answered is laid over
the flat controls (``Controls.for_model``); an entry that names a ``fault`` brings its own
schedule (unset ``fail_*`` are off, not inherited) and counter key (default
``<model id>:<fault>``), so a proxy that only rewrites ``model`` when it falls back meets a
different script on each model.  Precedence of the fault: ``emulator/<fault>`` id, then the
model's entry, then the flat ``fault``.  Entries take every control except ``fixture`` and
``faults``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, cast

import orjson

from proxy.emulator.types import FAULT_NAMES, USAGE_SHAPES, FaultName, UsageShape

__all__ = ["DEFAULT_CONTROLS", "DEFAULT_KEEPALIVE_INTERVAL_MS", "ControlError", "Controls", "parse_controls"]

_MAX_MS: Final = 600_000.0
_HEADER_PREFIX: Final = "x-emulator-"
_FIXTURE_NAME: Final = re.compile(r"(errors/)?[A-Za-z0-9_][A-Za-z0-9_.-]*")
_PATTERN: Final = re.compile(r"[01]{1,1000}")
DEFAULT_KEEPALIVE_INTERVAL_MS: Final = 1000.0
"""``slow-first-token`` repeats a keep-alive comment this often unless told otherwise."""
_SCHEDULE_OFF: Final[Mapping[str, object]] = {
    "fail_times": None,
    "fail_for_ms": None,
    "fail_period_ms": None,
    "fail_pattern": None,
}


class ControlError(ValueError):
    """An ``emulator`` control is unknown or has an invalid value."""


@dataclass(frozen=True, slots=True)
class Controls:
    """Validated controls of one request; defaults reproduce a normal OpenRouter answer."""

    fixture: str | None = None
    """File inside ``fixtures_dir`` to replay byte for byte (``name`` or ``errors/name``)."""
    fault: FaultName | None = None
    fail_times: int | None = None
    """Apply the fault only to the first N attempts counted under ``fault_key``."""
    fail_for_ms: float | None = None
    """Apply the fault only during this long after the first attempt under ``fault_key``."""
    fail_period_ms: float | None = None
    """With ``fail_for_ms``: the window repeats with this period (down, up, down, ...)."""
    fail_pattern: str | None = None
    """``0``/``1`` per attempt under ``fault_key``, cycling: ``"1100"`` fails 2, passes 2, ..."""
    fault_key: str | None = None
    """Counter key of the schedule; defaults to the fault name (``<model>:<fault>`` in entries)."""
    retry_after: int | None = None
    """Seconds for a ``Retry-After`` header on error-402/429/503 faults."""
    chunk_delay_ms: float = 0.0
    """Pause between consecutive stream events."""
    first_byte_delay_ms: float = 0.0
    """Pause before the response head."""
    first_token_delay_ms: float = 20_000.0
    """``slow-first-token``: pause before the first data event."""
    keepalive_comments: int = 2
    """``: OPENROUTER PROCESSING`` comments before the first data event."""
    keepalive_interval_ms: float | None = None
    """``slow-first-token``: repeat a comment this often while waiting; 0 = never;
    None = ``DEFAULT_KEEPALIVE_INTERVAL_MS``."""
    stall_after: int | None = None
    """``stall``: data events sent before going silent; None = about half the answer."""
    cut_after: int | None = None
    """``cut``: data events sent before the connection is dropped; None = about half."""
    usage_shape: UsageShape = "repeat_finish"
    completion_tokens: int = 10
    """Answer length in content pieces (= completion tokens) before ``max_tokens`` caps."""
    faults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Per-model entries: model id -> validated control values (see the module docstring)."""

    @property
    def scheduled(self) -> bool:
        """Some ``fail_*`` limit is set: attempts are counted under the fault key."""
        return self.fail_times is not None or self.fail_for_ms is not None or self.fail_pattern is not None

    def for_model(self, model_id: str) -> Controls:
        """These controls with the ``faults`` entry of ``model_id`` (if any) laid over them."""
        entry = self.faults.get(model_id)
        if entry is None:
            return self
        values: dict[str, Any] = {"faults": {}}
        if "fault" in entry:
            values.update(_SCHEDULE_OFF, fault_key=f"{model_id}:{entry['fault']}")
        values.update(entry)
        return dataclasses.replace(self, **values)


DEFAULT_CONTROLS: Final = Controls()


def parse_controls(body_controls: object, headers: Mapping[str, str]) -> Controls:
    """Merge body ``emulator`` object and ``x-emulator-*`` headers into ``Controls``."""
    raw: dict[str, object] = {}
    if body_controls is not None:
        if not isinstance(body_controls, dict):
            raise ControlError("emulator must be an object")
        raw.update(body_controls)
    for name, text in headers.items():
        if name.startswith(_HEADER_PREFIX):
            raw[name[len(_HEADER_PREFIX) :].replace("-", "_")] = text
    if not raw:
        return DEFAULT_CONTROLS
    return Controls(**_convert(raw, _CONVERTERS))


def _convert(raw: Mapping[str, object], converters: Mapping[str, Callable[[str, object], object]]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, value in raw.items():
        convert = converters.get(key)
        if convert is None:
            raise ControlError(f"unknown emulator control {key!r}")
        values[key] = convert(key, value)
    if values.get("fail_period_ms") is not None and values.get("fail_for_ms") is None:
        raise ControlError("emulator control 'fail_period_ms' needs 'fail_for_ms'")
    return values


def _number(key: str, value: object, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ControlError(f"emulator control {key!r} must be a number")
    try:
        number = float(value)
    except ValueError:
        raise ControlError(f"emulator control {key!r} must be a number") from None
    if not low <= number <= high:
        raise ControlError(f"emulator control {key!r} must be within [{low:g}, {high:g}]")
    return number


def _int(low: int, high: int) -> Callable[[str, object], int]:
    def convert(key: str, value: object) -> int:
        number = _number(key, value, low, high)
        if number != int(number):
            raise ControlError(f"emulator control {key!r} must be an integer")
        return int(number)

    return convert


def _number_within(low: float, high: float) -> Callable[[str, object], float]:
    def convert(key: str, value: object) -> float:
        return _number(key, value, low, high)

    return convert


_ms: Final = _number_within(0.0, _MAX_MS)


def _text(key: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ControlError(f"emulator control {key!r} must be a non-empty string")
    return value


def _fault(key: str, value: object) -> FaultName:
    if value not in FAULT_NAMES:
        raise ControlError(f"unknown fault {value!r}; known: {', '.join(sorted(FAULT_NAMES))}")
    return cast(FaultName, value)


def _shape(key: str, value: object) -> UsageShape:
    if value not in USAGE_SHAPES:
        raise ControlError(f"usage_shape must be one of {', '.join(sorted(USAGE_SHAPES))}")
    return cast(UsageShape, value)


def _pattern(key: str, value: object) -> str:
    if not isinstance(value, str) or not _PATTERN.fullmatch(value):
        raise ControlError(f"emulator control {key!r} must be 1-1000 characters '0' or '1'")
    return value


def _faults(key: str, value: object) -> dict[str, dict[str, Any]]:
    if isinstance(value, str):  # from a header
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            raise ControlError("emulator control 'faults' must be a JSON object") from None
    if not isinstance(value, dict):
        raise ControlError("emulator control 'faults' must be an object: model id -> controls")
    entries: dict[str, dict[str, Any]] = {}
    for model_id, entry in value.items():
        if not isinstance(entry, dict):
            raise ControlError(f"emulator faults entry for {model_id!r} must be an object")
        entries[model_id] = _convert(entry, _ENTRY_CONVERTERS)
    return entries


def _fixture(key: str, value: object) -> str:
    name = _text(key, value)
    if ".." in name or not _FIXTURE_NAME.fullmatch(name):
        raise ControlError("fixture must be a file name, optionally prefixed by 'errors/'")
    return name


_CONVERTERS: Final[dict[str, Callable[[str, object], object]]] = {
    "fixture": _fixture,
    "fault": _fault,
    "fail_times": _int(0, 1_000_000_000),
    "fail_for_ms": _ms,
    "fail_period_ms": _number_within(1.0, _MAX_MS),
    "fail_pattern": _pattern,
    "fault_key": _text,
    "retry_after": _int(0, 86_400),
    "chunk_delay_ms": _ms,
    "first_byte_delay_ms": _ms,
    "first_token_delay_ms": _ms,
    "keepalive_comments": _int(0, 1_000),
    "keepalive_interval_ms": _ms,
    "stall_after": _int(0, 100_000),
    "cut_after": _int(0, 100_000),
    "usage_shape": _shape,
    "completion_tokens": _int(0, 100_000),
    "faults": _faults,
}
_ENTRY_CONVERTERS: Final = {k: v for k, v in _CONVERTERS.items() if k not in ("fixture", "faults")}
