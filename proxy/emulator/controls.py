"""Per-request emulator controls, read from the body and ``x-emulator-*`` headers.

Sources, later wins: the request body's ``"emulator": {...}`` object (passes through a proxy
untouched; OpenAI SDK: ``extra_body={"emulator": {...}}``), then request headers
``x-emulator-<name>`` (``-`` and ``_`` are interchangeable in ``<name>``).  Unknown names and
bad values raise ``ControlError`` (answered with 400).  Times are milliseconds.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, cast

from proxy.emulator.types import FAULT_NAMES, USAGE_SHAPES, FaultName, UsageShape

__all__ = ["DEFAULT_CONTROLS", "ControlError", "Controls", "parse_controls"]

_MAX_MS: Final = 600_000.0
_HEADER_PREFIX: Final = "x-emulator-"
_FIXTURE_NAME: Final = re.compile(r"(errors/)?[A-Za-z0-9_][A-Za-z0-9_.-]*")


class ControlError(ValueError):
    """An ``emulator`` control is unknown or has an invalid value."""


@dataclass(frozen=True, slots=True)
class Controls:
    """Validated controls of one request; defaults reproduce a normal OpenRouter answer."""

    fixture: str | None = None
    """File inside ``fixtures_dir`` to replay byte for byte (``name`` or ``errors/name``)."""
    fault: FaultName | None = None
    fail_times: int | None = None
    """Apply ``fault`` only to the first N requests sharing ``fault_key``; None = always."""
    fault_key: str | None = None
    """Counter key for ``fail_times``; defaults to the fault name."""
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
    keepalive_interval_ms: float = 0.0
    """``slow-first-token``: repeat a comment this often while waiting; 0 = never."""
    usage_shape: UsageShape = "repeat_finish"
    completion_tokens: int = 10
    """Answer length in content pieces (= completion tokens) before ``max_tokens`` caps."""


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
    values: dict[str, Any] = {}
    for key, value in raw.items():
        convert = _CONVERTERS.get(key)
        if convert is None:
            raise ControlError(f"unknown emulator control {key!r}")
        values[key] = convert(key, value)
    return Controls(**values)


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


def _ms(key: str, value: object) -> float:
    return _number(key, value, 0.0, _MAX_MS)


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


def _fixture(key: str, value: object) -> str:
    name = _text(key, value)
    if ".." in name or not _FIXTURE_NAME.fullmatch(name):
        raise ControlError("fixture must be a file name, optionally prefixed by 'errors/'")
    return name


_CONVERTERS: Final[dict[str, Callable[[str, object], object]]] = {
    "fixture": _fixture,
    "fault": _fault,
    "fail_times": _int(0, 1_000_000_000),
    "fault_key": _text,
    "retry_after": _int(0, 86_400),
    "chunk_delay_ms": _ms,
    "first_byte_delay_ms": _ms,
    "first_token_delay_ms": _ms,
    "keepalive_comments": _int(0, 1_000),
    "keepalive_interval_ms": _ms,
    "usage_shape": _shape,
    "completion_tokens": _int(0, 100_000),
}
