"""Compiled ``match`` conditions and the lazy view of a request they read.

``RequestView`` computes the costly facts (image parts, the prompt-token estimate, the
last user message, header values) at most once per request and only when a condition
asks. A ``user_text`` regex runs only when the text holds one of its required literals
(``prefilter``). ``compile_match`` splits a ``Match`` into its ``Static`` part (model, key,
team, tier: fixed per requested model and caller, so the engine pre-selects rules by
them) and a tuple of per-request checks ordered cheapest first; a rule matches when it
is admitted and every check returns true.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from proxy.routing.patterns import Patterns, as_list
from proxy.routing.prefilter import required_literals
from proxy.routing.schema import Match, TokenRange
from proxy.tokens import estimate_prompt_tokens, last_user_text
from proxy.types import ChatCall, Principal

__all__ = ["Check", "RequestView", "Static", "compile_match", "model_forms"]

Headers = Sequence[tuple[bytes, bytes]]
Check = Callable[["RequestView"], bool]

_IMAGE_PARTS = frozenset({"image_url", "input_image", "image"})
_UNSET = -1


class RequestView:
    """One request as the conditions see it: the call, the caller, the raw headers.

    ``headers`` are ASGI headers (lower-case names, bytes). Derived facts are computed
    lazily and kept for the other rules of the same decision.
    """

    __slots__ = ("_gate", "_images", "_lowered", "_text", "_tokens", "call", "headers", "principal")

    def __init__(
        self, call: ChatCall, principal: Principal, headers: Headers, gate: re.Pattern[str] | None = None
    ) -> None:
        self.call = call
        self.principal = principal
        self.headers = headers
        self._gate = gate
        self._tokens = _UNSET
        self._text: str | None = None
        self._images: bool | None = None
        self._lowered: str | bool | None = False

    @property
    def prompt_tokens(self) -> int:
        """Estimated prompt tokens (``proxy.tokens.estimate_prompt_tokens``)."""
        if self._tokens == _UNSET:
            self._tokens = estimate_prompt_tokens(self.call.body)
        return self._tokens

    @property
    def user_text(self) -> str:
        """Text of the last user message ('' when there is none)."""
        if self._text is None:
            self._text = last_user_text(self.call.body)
        return self._text

    @property
    def lowered_ascii(self) -> str | None:
        """The last user message lower-cased when it is ASCII and holds some literal of the
        policy's gate (``prefilter.literal_gate``); ``""`` when it holds none (no prefiltered
        regex can match); ``None`` for non-ASCII text (prefilters do not apply)."""
        if self._lowered is False:
            text = self.user_text
            lowered = text.lower() if text.isascii() else None
            if lowered is not None and self._gate is not None and self._gate.search(lowered) is None:
                lowered = ""
            self._lowered = lowered
        return self._lowered if isinstance(self._lowered, str) else None

    @property
    def has_images(self) -> bool:
        """True when any message has an image content part."""
        if self._images is None:
            self._images = _has_images(self.call.body.get("messages"))
        return self._images

    def header(self, name: bytes) -> str | None:
        """The first value of header ``name`` (lower case), decoded as latin-1."""
        for key, value in self.headers:
            if key == name:
                return value.decode("latin-1")
        return None


def _has_images(messages: Any) -> bool:
    if not isinstance(messages, list):
        return False
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") in _IMAGE_PARTS:
                    return True
    return False


@dataclass(frozen=True, slots=True)
class Static:
    """The conditions fixed by the requested model and the caller (``None``: any)."""

    model: Patterns | None
    key: Patterns | None
    team: Patterns | None
    tier: Patterns | None

    def admits(self, names: Sequence[str], principal: Principal, *, bases: bool = False) -> bool:
        """True when a request by ``principal`` for the first of ``names`` (then the aliases
        it goes through, its target last) passes. ``bases``: a variant id also matches as
        its base model (``model_forms``), for deny rules."""
        model = self.model
        if model is not None and not any(model(form) for name in names for form in model_forms(name, bases)):
            return False
        if self.key is not None and not self.key(principal.name):
            return False
        if self.team is not None and not self.team(principal.team):
            return False
        return self.tier is None or self.tier(principal.tier)


def model_forms(name: str, bases: bool = False) -> tuple[str, ...]:
    """The forms a model condition tries for ``name``: itself and without a leading ``~``,
    so ``anthropic/*`` covers ``~anthropic/claude-sonnet-latest``; with ``bases``, also
    without its variant suffixes (openrouter-api.md §1.4), so a deny on ``openai/gpt-4o``
    covers ``openai/gpt-4o:nitro`` (as a per-model limit does) and cannot be stepped around
    by a suffix. (Only denies: a rule that sets the model would drop the client's suffix.)"""
    bare = name[1:] if name[:1] == "~" else name
    base = bare.split(":", 1)[0] if bases else bare
    if base == name:
        return (name,)
    return tuple(dict.fromkeys((name, bare, base)))


def _patterns(value: str | list[str] | None) -> Patterns | None:
    return Patterns.compile(as_list(value)) if value is not None else None


def compile_match(match: Match) -> tuple[Static, tuple[Check, ...]]:
    """(the static conditions, the per-request checks, cheapest first)."""
    static = Static(_patterns(match.model), _patterns(match.key), _patterns(match.team), _patterns(match.tier))
    checks: list[Check] = []
    if match.stream is not None:
        checks.append(_stream_check(match.stream))
    if match.tools is not None:
        checks.append(_present_check("tools", match.tools))
    if match.response_format is not None:
        checks.append(_format_check(match.response_format))
    for name, value in (match.header or {}).items():
        checks.append(_header_check(name.encode("latin-1"), Patterns.compile(as_list(value))))
    if match.images is not None:
        checks.append(_images_check(match.images))
    if match.prompt_tokens is not None:
        checks.append(_tokens_check(match.prompt_tokens))
    if match.user_text is not None:
        checks.append(_text_check(re.compile(match.user_text), required_literals(match.user_text)))
    return static, tuple(checks)


def _stream_check(wanted: bool) -> Check:
    return lambda view: view.call.stream is wanted


def _present_check(field: str, wanted: bool) -> Check:
    return lambda view: bool(view.call.body.get(field)) is wanted


def _format_check(wanted: bool | str) -> Check:
    if isinstance(wanted, bool):
        return lambda view: (view.call.body.get("response_format") is not None) is wanted

    def check(view: RequestView) -> bool:
        value = view.call.body.get("response_format")
        return isinstance(value, dict) and value.get("type") == wanted

    return check


def _header_check(name: bytes, patterns: Patterns) -> Check:
    return lambda view: patterns(view.header(name))


def _images_check(wanted: bool) -> Check:
    return lambda view: view.has_images is wanted


def _tokens_check(limits: TokenRange) -> Check:
    low = limits.min or 0
    high = limits.max if limits.max is not None else float("inf")
    return lambda view: low <= view.prompt_tokens <= high


def _text_check(regex: re.Pattern[str], literals: frozenset[str] | None) -> Check:
    if literals is None:
        return lambda view: regex.search(view.user_text) is not None
    needles = tuple(literals)

    def check(view: RequestView) -> bool:
        lowered = view.lowered_ascii
        if lowered is not None:
            for needle in needles:
                if needle in lowered:
                    break
            else:
                return False
        return regex.search(view.user_text) is not None

    return check
