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
    "NO_ANSWER_FAULTS",
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
    "error-400-context",
    "error-401",
    "error-402",
    "error-403",
    "error-404",
    "error-408",
    "error-429",
    "error-500",
    "error-502",
    "error-503",
    "error-524",
    "error-529",
    "midstream-error",
    "stall",
    "cut",
    "no-done",
    "malformed",
    "slow-first-token",
    "reset",
    "black-hole",
]
FAULT_NAMES: Final[frozenset[str]] = frozenset(get_args(FaultName))
ERROR_FAULTS: Final[frozenset[str]] = frozenset(f for f in FAULT_NAMES if f.startswith("error-"))
"""Faults answered with an HTTP error before any output (these trigger model fallback)."""
NO_ANSWER_FAULTS: Final[frozenset[str]] = frozenset({"reset", "black-hole"})
"""Faults that send no response at all: the connection is closed, or held silent."""

UsageShape = Literal["repeat_finish", "empty_choices", "separate_2025"]
USAGE_SHAPES: Final[frozenset[str]] = frozenset(get_args(UsageShape))
"""Final usage chunk forms of openrouter-api.md §3.4 (newest first)."""
