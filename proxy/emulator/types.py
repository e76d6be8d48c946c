"""Shared types of the emulator; imports nothing from the project.

ASGI aliases follow ``starlette.types``.  ``FaultName`` and ``UsageShape`` are the
closed vocabularies of the ``emulator`` controls (see ``controls.py``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final, Literal, get_args

__all__ = [
    "ERROR_FAULTS",
    "FAULT_NAMES",
    "USAGE_SHAPES",
    "FaultName",
    "Headers",
    "Message",
    "Receive",
    "Scope",
    "Send",
    "UsageShape",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]
"""ASGI response headers: lower-case name, value; both latin-1 bytes."""

FaultName = Literal[
    "error-400",
    "error-401",
    "error-402",
    "error-403",
    "error-404",
    "error-408",
    "error-429",
    "error-500",
    "error-502",
    "error-503",
    "midstream-error",
    "stall",
    "cut",
    "no-done",
    "malformed",
    "slow-first-token",
]
FAULT_NAMES: Final[frozenset[str]] = frozenset(get_args(FaultName))
ERROR_FAULTS: Final[frozenset[str]] = frozenset(f for f in FAULT_NAMES if f.startswith("error-"))
"""Faults answered with an HTTP error before any output (these trigger model fallback)."""

UsageShape = Literal["repeat_finish", "empty_choices", "separate_2025"]
USAGE_SHAPES: Final[frozenset[str]] = frozenset(get_args(UsageShape))
"""Final usage chunk forms of openrouter-api.md §3.4 (newest first)."""
