"""A side parser for OpenRouter's SSE stream: it reads, it never changes or delays.

The proxy forwards the upstream bytes to the client as they arrive, whole events at a time
(``proxy.relay``: the unterminated tail of a read waits for the rest of its event), and hands
every chunk to ``SSETap.feed``. The tap splits events (``\\n\\n``-separated, CRLF tolerated),
counts keep-alive comments and data events, and parses JSON only where it must:

* the first data event (generation ``id``, ``model``, ``provider``);
* events that may carry ``usage``, a top-level ``error`` or a non-null ``finish_reason``
  (found by a byte search first; a JSON string cannot contain an unescaped ``"usage"``,
  so the search only ever over-selects).

It understands the three shapes of OpenRouter's final usage chunk (openrouter-api.md
§3.4: a one-choice chunk after a separate finish chunk, ``choices: []``, and the repeated
finish choice) because it keys off the top-level ``usage`` object, not the choices; an
in-band error event (§3.5, top-level ``error``); and streams that end without
``data: [DONE]`` (``finish()``). A malformed event (not a JSON object by a cheap
first/last-byte check, or failing to parse where parsed) is counted in ``malformed`` and
otherwise ignored: the tap never raises from ``feed``.
"""

from __future__ import annotations

from typing import Any

import orjson

__all__ = ["SSETap"]

_MAX_PENDING = 1 << 20  # an "event" longer than 1 MiB without a separator is dropped
_DONE = b"[DONE]"
_CLOSE_BRACE = ord("}")
# An event may name a finish_reason that is not null when it has more "finish_reason" than
# "finish_reason":null (two C-level counts; spaced JSON always may, and is then parsed).
_FINISH = b'"finish_reason"'
_FINISH_NULL = b'"finish_reason":null'


def _raw_offset(raw: bytes, data: bytes, pos: int) -> int:
    """The offset in ``raw`` of ``data[pos]``, where ``data`` is ``raw`` with CRLF made LF and
    ``pos`` follows an LF (so both hold the same number of LFs before it)."""
    at = len(raw)
    for _ in range(data.count(b"\n", pos) + 1):
        at = raw.rfind(b"\n", 0, at)
    return at + 1


class SSETap:
    """Incremental observer of one SSE response. See the module docstring.

    ``capture``: also parse every event and keep the first choice's delta ``content`` in ``text`` (for
    ``logging.include_content``; off, ``text`` is ``None`` and ordinary events are not parsed).
    After the stream: ``generation_id``, ``model``, ``provider`` (from the first data
    event), ``usage`` (the last top-level ``usage`` object seen, a dict), ``error`` (the
    last in-band ``error`` object), ``finish_reason``, ``done`` (``[DONE]`` seen),
    ``data_events``, ``comments``, ``malformed``.
    """

    __slots__ = (
        "_offset",
        "_pending",
        "comments",
        "data_events",
        "done",
        "error",
        "error_end",
        "finish_reason",
        "generation_id",
        "malformed",
        "model",
        "provider",
        "text",
        "usage",
    )

    def __init__(self, capture: bool = False) -> None:
        self.text: list[str] | None = [] if capture else None  # with capture: every delta's content
        self._pending = b""
        self._offset = 0
        self.error_end: int | None = None
        self.comments = 0
        self.data_events = 0
        self.malformed = 0
        self.done = False
        self.generation_id: str | None = None
        self.model: str | None = None
        self.provider: str | None = None
        self.usage: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self.finish_reason: str | None = None

    def feed(self, chunk: bytes) -> None:
        """Observe the next chunk of upstream bytes (any split, any size)."""
        pending = self._pending  # raw bytes, as they came
        base = self._offset - len(pending)  # stream offset of raw[0]
        self._offset += len(chunk)
        raw = pending + chunk if pending else chunk
        crlf = b"\r" in raw
        data = raw.replace(b"\r\n", b"\n") if crlf else raw
        pos = 0
        find, count = data.find, data.count
        while True:
            end = find(b"\n\n", pos)
            if end < 0:
                break
            if end > pos:
                if (  # the usual event: one `data: {...}` line after the first, naming nothing we read
                    self.text is None
                    and self.data_events
                    and data.startswith(b"data: {", pos)
                    and data[end - 1] == _CLOSE_BRACE
                    and find(b"\n", pos, end) < 0
                    and find(b'"usage"', pos, end) < 0
                    and find(b'"error"', pos, end) < 0
                    and count(_FINISH, pos, end) == count(_FINISH_NULL, pos, end)
                ):
                    self.data_events += 1  # what _event would do, without copying the event
                else:
                    self._event(data[pos:end])
                    if self.error is not None and self.error_end is None:
                        self.error_end = base + (_raw_offset(raw, data, end + 2) if crlf else end + 2)
            pos = end + 2
        if pos and crlf:
            pos = _raw_offset(raw, data, pos)
        self._keep(raw[pos:] if pos else raw)

    @property
    def offset(self) -> int:
        """Bytes fed so far."""
        return self._offset

    def finish(self) -> bool:
        """The upstream body ended: read any unterminated tail as a last event.

        Returns whether that tail was a whole event (True when there is none). A tail that is
        not (the start of an event cut off) is not counted in ``malformed``: the caller knows
        whether the stream was cut or merely ended oddly.
        """
        tail, self._pending = self._pending.replace(b"\r\n", b"\n").strip(b"\n"), b""
        if not tail:
            return True
        malformed = self.malformed
        self._event(tail)
        if self.malformed == malformed:
            return True
        self.malformed = malformed
        return False

    def _keep(self, rest: bytes) -> None:
        if len(rest) > _MAX_PENDING:
            self.malformed += 1
            rest = b""
        self._pending = rest

    def _event(self, event: bytes) -> None:
        if event[:1] == b":":
            self.comments += 1
            return
        if event[:6] == b"data: " and b"\n" not in event:  # the usual shape: one data line
            payload: bytes | None = event[6:]
        else:
            payload = None
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    value = line[5:]
                    if value[:1] == b" ":
                        value = value[1:]
                    payload = value if payload is None else payload + b"\n" + value
                elif line[:1] == b":":
                    self.comments += 1
        if payload is None:
            return
        if payload == _DONE:
            self.done = True
            return
        self.data_events += 1
        first = self.data_events == 1
        if payload[:1] != b"{" or payload[-1:] != b"}":
            self.malformed += 1
            return
        if not (
            first
            or self.text is not None
            or b'"usage"' in payload
            or b'"error"' in payload
            or payload.count(_FINISH) != payload.count(_FINISH_NULL)
        ):
            return
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            self.malformed += 1
            return
        if not isinstance(obj, dict):
            self.malformed += 1
            return
        if first:
            self._identity(obj)
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        error = obj.get("error")
        if isinstance(error, dict) and self.error is None:
            self.error = error
        choices = obj.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if isinstance(choice, dict) and isinstance(choice.get("finish_reason"), str):
                    self.finish_reason = choice["finish_reason"]
                if self.text is not None and isinstance(choice, dict) and choice.get("index", 0) == 0:
                    delta = choice.get("delta")
                    if isinstance(delta, dict) and isinstance(delta.get("content"), str):
                        self.text.append(delta["content"])

    def _identity(self, obj: dict[str, Any]) -> None:
        for name in ("id", "model", "provider"):
            value = obj.get(name)
            if isinstance(value, str):
                if name == "id":
                    self.generation_id = value
                else:
                    setattr(self, name, value)
