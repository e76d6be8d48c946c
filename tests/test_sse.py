"""The SSE side parser against OpenRouter's fixture streams, split every way."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.metering import usage_from
from proxy.sse import SSETap

from .conftest import SHARED_FIXTURES

BASIC = (SHARED_FIXTURES / "stream_basic.sse").read_bytes()
EMPTY_CHOICES = (SHARED_FIXTURES / "stream_basic_usage_empty_choices.sse").read_bytes()


def tap_of(data: bytes, sizes: list[int] | None = None) -> SSETap:
    tap = SSETap()
    if sizes is None:
        tap.feed(data)
    else:
        pos = 0
        for size in sizes:
            tap.feed(data[pos : pos + size])
            pos += size
        tap.feed(data[pos:])
    tap.finish()
    return tap


def separate_2025_form(stream: bytes) -> bytes:
    """The ≤Dec-2025 shape (§3.4): the usage chunk has one empty-delta choice, finish null."""
    events = stream.split(b"\n\n")
    for i, event in enumerate(events):
        if b'"usage"' in event:
            events[i] = event.replace(
                b'"choices":[{"index":0,"delta":{"content":"","role":"assistant"},"finish_reason":"stop",'
                b'"native_finish_reason":"stop"}]',
                b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null,'
                b'"native_finish_reason":null,"logprobs":null}]',
            )
    return b"\n\n".join(events)


@pytest.mark.parametrize("name", ["basic", "empty_choices", "separate_2025"])
def test_usage_in_all_three_shapes(name: str) -> None:
    data = {"basic": BASIC, "empty_choices": EMPTY_CHOICES, "separate_2025": separate_2025_form(BASIC)}[name]
    tap = tap_of(data)
    usage = usage_from(tap.usage)
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (14, 9, 23)
    assert usage.cost_usd == pytest.approx(0.0000075)
    assert tap.done is True
    assert tap.generation_id == "gen-1787300412-Kq7RmZtW2pXv9LcN4bHd"
    assert tap.model == "openai/gpt-4o-mini"
    assert tap.provider == "OpenAI"
    assert tap.finish_reason == "stop"
    assert tap.comments == 2
    assert tap.malformed == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=200), max_size=60))
def test_any_split_gives_the_same_result(sizes: list[int]) -> None:
    whole = tap_of(BASIC)
    split = tap_of(BASIC, sizes)
    assert split.usage == whole.usage
    assert (split.data_events, split.comments, split.done) == (whole.data_events, whole.comments, whole.done)
    assert split.generation_id == whole.generation_id


_EVENTS = [
    b'data: {"id":"gen-1","model":"m","provider":"P","choices":[{"delta":{"content":"hi"}}]}',
    b'data: {"id":"gen-1","choices":[{"delta":{"content":"a \\"usage\\" word"}}]}',
    b'data: {"id":"gen-1","choices":[{"delta":{},"finish_reason":"length"}]}',
    b'data: {"id":"gen-1","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}',
    b'data: {"id":"gen-1","error":{"code":502,"message":"cut"},"choices":[]}',
    b": OPENROUTER PROCESSING",
    b'data: {"id":"gen-1",\ndata: "choices":[]}',
    b"data: not json",
    b'data: {"cut off":',
    b'data: {"a":1}\n: a comment line inside the event',
    b"",
    b"data: [DONE]",
]


def _observed(tap: SSETap, crlf: bool = False) -> tuple[object, ...]:
    """What a tap reports; with CRLF ``error_end`` is only as exact as the chunking (by design)."""
    return (
        tap.data_events,
        tap.comments,
        tap.malformed,
        tap.done,
        tap.usage,
        tap.error,
        None if crlf else tap.error_end,
        tap.finish_reason,
        tap.generation_id,
        tap.model,
        tap.provider,
    )


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(range(len(_EVENTS))), max_size=40),
    st.lists(st.integers(min_value=1, max_value=400), max_size=8),
    st.booleans(),
)
def test_any_mix_of_events_in_any_split_reads_as_byte_by_byte(picks: list[int], sizes: list[int], crlf: bool) -> None:
    """Whole chunks of many events give what feeding one byte at a time gives, for any mix
    of usual, final, error, comment, multi-line, malformed and empty events."""
    stream = b"".join(_EVENTS[i] + b"\n\n" for i in [0, *picks])
    if crlf:
        stream = stream.replace(b"\n", b"\r\n")
    reference = tap_of(stream, [1] * len(stream))
    assert _observed(tap_of(stream), crlf) == _observed(reference, crlf)
    assert _observed(tap_of(stream, sizes), crlf) == _observed(reference, crlf)


def test_reasoning_and_tool_call_streams() -> None:
    reasoning = tap_of((SHARED_FIXTURES / "stream_reasoning.sse").read_bytes())
    usage = usage_from(reasoning.usage)
    assert usage is not None and usage.reasoning_tokens > 0
    assert reasoning.comments == 3
    tools = tap_of((SHARED_FIXTURES / "stream_tool_call.sse").read_bytes())
    assert tools.finish_reason == "tool_calls"
    assert usage_from(tools.usage) is not None


def test_midstream_error_is_captured_with_where_its_event_ends() -> None:
    data = (SHARED_FIXTURES / "stream_midstream_error.sse").read_bytes()
    for size in (1, 7, 64, len(data)):
        tap = tap_of(data, [size] * (len(data) // size))
        assert tap.error_end == data.index(b"data: [DONE]")
    tap = tap_of(data)
    assert tap.error is not None
    assert tap.error["code"] == 502
    assert tap.error["metadata"]["error_type"] == "provider_unavailable"
    assert tap.finish_reason == "error"
    assert tap.done is True


def test_stream_without_done_and_without_final_separator() -> None:
    body = BASIC.replace(b"data: [DONE]\n\n", b"").rstrip(b"\n")
    tap = tap_of(body)
    assert tap.done is False
    assert usage_from(tap.usage) is not None


def test_malformed_event_is_counted_not_raised() -> None:
    events = BASIC.split(b"\n\n")
    events.insert(4, b'data: {"id": "broken", "usage": {')
    events.insert(5, b'data: ["usage", 2]')
    tap = tap_of(b"\n\n".join(events))
    assert tap.malformed == 2
    assert usage_from(tap.usage) is not None
    assert tap.done is True


def test_crlf_line_endings_split_anywhere() -> None:
    crlf = BASIC.replace(b"\n", b"\r\n")
    for cut in range(1, 40):
        tap = tap_of(crlf, [cut] * (len(crlf) // cut))
        assert tap.done and usage_from(tap.usage) is not None


def test_content_that_mentions_usage_is_not_mistaken() -> None:
    event = (
        b'data: {"id":"g","choices":[{"index":0,"delta":{"content":"usage","role":"assistant"},'
        b'"finish_reason":null}]}\n\n'
    )
    tap = tap_of(event + event)
    assert tap.usage is None
    assert tap.data_events == 2


def test_events_after_the_first_are_read_only_when_they_can_carry_something() -> None:
    """Later one-line ``data: {...}`` events are counted without parsing; anything else
    (finish reason, a multi-line event, a payload that is not an object) is still read."""
    first = b'data: {"id":"g","model":"m","choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'
    plain = b'data: {"choices":[{"index":0,"delta":{"content":"b"},"finish_reason":null}]}\n\n'
    two_lines = b'data: {"choices":[{"index":0,\ndata: "delta":{"content":"c"}}]}\n\n'
    finish = b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}\n\n'
    not_object = b"data: {not json\n\n"
    tap = tap_of(first + plain * 3 + two_lines + finish + not_object + b"data: [DONE]\n\n")
    assert (tap.generation_id, tap.model) == ("g", "m")
    assert tap.data_events == 7 and tap.malformed == 1
    assert tap.finish_reason == "length" and tap.done


def test_oversized_event_without_separator_is_dropped() -> None:
    tap = SSETap()
    tap.feed(b"data: " + b"x" * (2 << 20))
    tap.feed(b"\n\n" + BASIC)
    tap.finish()
    assert tap.malformed >= 1
    assert tap.done is True


def test_fixture_dir_exists() -> None:
    assert Path(SHARED_FIXTURES).is_dir(), "shared/openrouter/fixtures must sit beside the repository"


def test_finish_reason_is_read_from_spaced_json_and_a_null_one_is_not_taken() -> None:
    spaced = (
        b'data: {"id": "g", "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": null}]}\n\n'
        b'data: {"id": "g", "choices": [{"index": 0, "delta": {}, "finish_reason" : "length"}]}\n\n'
    )
    tap = tap_of(spaced)
    assert tap.finish_reason == "length" and tap.data_events == 2


def test_finish_reports_whether_the_tail_was_a_whole_event() -> None:
    whole = SSETap()
    whole.feed(b'data: {"id":"g","choices":[]}\n\ndata: {"id":"g","choices":[],"usage":{"prompt_tokens":1}}')
    assert whole.finish() is True and whole.usage == {"prompt_tokens": 1} and whole.malformed == 0
    cut = SSETap()
    cut.feed(b'data: {"id":"g","choices":[]}\n\ndata: {"id":"g","cho')
    assert cut.finish() is False and cut.malformed == 0 and cut.data_events == 2


@pytest.mark.parametrize("size", [1, 7, 64, 10_000])
def test_error_end_is_exact_with_crlf_line_endings(size: int) -> None:
    lf = BASIC.split(b"\n\n")
    error = b'data: {"id":"g","error":{"code":502,"message":"x"},"choices":[]}\n\n'
    head = (lf[0] + b"\n\n" + lf[1] + b"\n\n").replace(b"\n", b"\r\n")
    stream = head + error.replace(b"\n", b"\r\n") + b"data: [DONE]\r\n\r\n"
    tap = tap_of(stream, [size] * (len(stream) // size))
    assert tap.error is not None
    assert tap.error_end == len(head) + len(error) + 2  # two CRs more than LF


def test_capture_keeps_the_first_choice_s_text_only() -> None:
    events = b"".join(
        b'data: {"id":"g","choices":[{"index":%d,"delta":{"content":"%s"},"finish_reason":null}]}\n\n' % (i, word)
        for i, word in ((0, b"Hello"), (1, b"Bonjour"), (0, b" world"), (1, b" le monde"))
    )
    tap = SSETap(capture=True)
    tap.feed(events + b"data: [DONE]\n\n")
    assert tap.text == ["Hello", " world"]
    assert SSETap().text is None
