"""The command line: check, keys new, usage, and serve as the README runs it."""

from __future__ import annotations

import re
import select
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from proxy.auth import hash_key
from proxy.cli import main
from proxy.config import load_settings
from proxy.report import build_report, parse_since, render

from .factories import served_cli

REPO = Path(__file__).resolve().parents[1]


def test_check_accepts_the_shipped_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--config", str(REPO / "config.yaml")]) == 0
    assert "ok" in capsys.readouterr().out


def test_check_lists_every_problem_with_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "routing.yaml").write_text("aliases:\n  x: y\n  y: x\n")
    config = tmp_path / "config.yaml"
    config.write_text("server:\n  port: -1\n")
    assert main(["check", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert f"{config}:2: server.port" in out
    config.write_text("server:\n  port: 8080\n")
    assert main(["check", "--config", str(config)]) == 1
    assert "routing.yaml:2: aliases: alias cycle x -> y -> x" in capsys.readouterr().out


def test_keys_new_prints_a_key_and_its_hash(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "new", "--name", "alice", "--team", "research"]) == 0
    out = capsys.readouterr().out
    key = re.search(r"sk-proxy-[A-Za-z0-9_-]+", out)
    assert key is not None
    assert f"sha256: {hash_key(key.group(0))}" in out
    assert "team: research" in out


def test_usage_report_groups_totals_and_skips_bad_lines() -> None:
    lines = [
        orjson.dumps(
            {
                "ts": 1_000_000.0,
                "key": "a",
                "routed_model": "m1",
                "status": 200,
                "prompt_tokens": 3,
                "completion_tokens": 2,
                "total_tokens": 5,
                "cost_usd": 0.1,
                "latency_s": 1.0,
            }
        ),
        orjson.dumps(
            {
                "ts": 1_000_001.0,
                "key": "a",
                "routed_model": "m1",
                "status": 502,
                "cost_usd": None,
                "error_code": "502",
                "latency_s": 3.0,
            }
        ),
        orjson.dumps({"ts": 1_000_002.0, "key": "b", "routed_model": "m2", "status": 200, "cost_usd": 0.2}),
        b"not json",
        orjson.dumps({"ts": 1_000_003.0, "key": "c", "status": 200, "cost_usd": "abc"}),  # corrupt: skipped
        orjson.dumps({"ts": 1_000_003.0, "key": "c", "status": 200, "cost_usd": "inf"}),
    ]
    report = build_report(lines, ("key", "model"))
    assert report.skipped == 3
    a = report.rows[("a", "m1")]
    assert (a.requests, a.errors, a.total_tokens, a.latency_s) == (2, 1, 5, 4.0)
    assert str(report.total.cost_usd) == "0.3"  # exact decimal sum, not 0.30000000000000004
    table = render(report)
    assert table.splitlines()[-1].startswith("TOTAL") and "0.30000000" in table
    assert render(report, "csv").splitlines()[0].startswith("key,model,requests")
    assert orjson.loads(render(report, "json"))["total"]["requests"] == "3"
    assert build_report(lines, ("key",), since=1_000_001.5).total.requests == 1
    assert parse_since("2d", now=200_000.0) == 200_000.0 - 2 * 86400
    with pytest.raises(ValueError):
        parse_since("yesterday")
    for huge in ("9" * 400 + "d", "9" * 5000 + "d"):  # no OverflowError, no int-to-str limit
        with pytest.raises(ValueError, match="--since takes"):
            parse_since(huge)


@pytest.mark.parametrize("flags", [["--port", "70000"], ["--port", "x"], ["--workers", "0"], ["--workers", "65"]])
def test_serve_flags_out_of_range_are_usage_errors(flags: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", *flags])
    assert info.value.code == 2 and "error: argument" in capsys.readouterr().err


@pytest.mark.parametrize("tz", ["UTC", "Europe/Berlin", "America/New_York"])
def test_since_a_date_is_midnight_utc_in_any_time_zone_and_never_before_1970(
    tz: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TZ", tz)
    time.tzset()
    try:
        assert parse_since("2026-07-15") == 1_784_073_600.0  # summer: daylight saving in both zones
        assert parse_since("2026-01-15") == 1_768_435_200.0
        assert parse_since("0001-01-01") == 0.0
        assert parse_since("999999999999d", now=1e9) == 0.0
    finally:
        monkeypatch.undo()
        time.tzset()


def test_serve_with_the_emulator_prints_a_dev_key_that_works(tmp_path: Path) -> None:
    """What README's run command does: no keys configured, emulator upstream."""
    with served_cli(tmp_path) as served:
        client = openai.OpenAI(base_url=f"{served.url}/v1", api_key=served.key, max_retries=0)
        chunks = list(
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
            )
        )
        assert any(c.usage for c in chunks)
    log = tmp_path / "var" / "usage.jsonl"
    (rec,) = [orjson.loads(line) for line in log.read_bytes().splitlines()]
    assert rec["key"] == "dev" and rec["routed_model"] == "openai/gpt-4o-mini" and rec["cost_usd"] > 0


def test_serve_with_the_admin_api_mints_no_dev_key_and_its_keys_work(tmp_path: Path) -> None:
    """With ``PROXY_ADMIN_KEY`` keys come from the admin API: no development key, which
    nobody could revoke, is printed into the logs."""
    admin = "adm-" + "x" * 40
    with served_cli(tmp_path, admin_key=admin) as served:
        assert b"sk-proxy-" not in served.log.read_bytes()
        created = httpx.post(
            f"{served.url}/admin/keys", json={"name": "ci"}, headers={"Authorization": f"Bearer {admin}"}, timeout=10
        )
        assert created.status_code == 201
        client = openai.OpenAI(base_url=f"{served.url}/v1", api_key=created.json()["key"], max_retries=0)
        answer = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        assert answer.choices[0].message.content


def test_serve_refuses_the_admin_api_on_several_workers_without_redis(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runtime keys live in the store; each worker's embedded store is its own."""
    monkeypatch.setenv("PROXY_ADMIN_KEY", "adm-" + "y" * 40)
    monkeypatch.delenv("REDIS_URL", raising=False)
    command = ["serve", "--config", str(REPO / "config.yaml"), "--upstream", "emulator", "--workers", "2"]
    assert main(command) == 2
    assert "REDIS_URL" in capsys.readouterr().err


def test_serve_refuses_to_start_without_an_upstream_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENROUTER_API_KEY", raising=False)
    monkeypatch.delenv("OPENROUTER_BASE_URL", raising=False)
    assert main(["serve", "--config", str(REPO / "config.yaml")]) == 2
    assert "--upstream emulator" in capsys.readouterr().err


def test_serve_keeps_idle_connections_open_for_keep_alive_timeout_s(tmp_path: Path) -> None:
    """The balancer in front must close idle connections first (docs/deploy.md): the
    proxy keeps them ``server.keep_alive_timeout_s``, not uvicorn's 5 s."""
    assert load_settings(REPO / "config.yaml", {}).server.keep_alive_timeout_s > 60  # nginx's and ALB's 60 s

    def edit(text: str) -> str:
        assert "keep_alive_timeout_s: 75" in text
        return text.replace("keep_alive_timeout_s: 75", "keep_alive_timeout_s: 2")

    with served_cli(tmp_path, config=edit) as served, _connect(served.url) as conn:
        for pause in (0.0, 1.2):  # idle for less than the timeout: still open
            time.sleep(pause)
            conn.sendall(HEALTHZ)
            assert _response(conn).startswith(b"HTTP/1.1 200")
        began = time.monotonic()
        assert conn.recv(1) == b""  # then the proxy closes it
        assert 1.5 < time.monotonic() - began < 4  # uvicorn's default would be 5 s


HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: proxy\r\n\r\n"


def _connect(url: str) -> socket.socket:
    """A raw connection to ``url``'s port; retried a moment, as uvicorn logs its startup
    just before it listens."""
    address = ("127.0.0.1", int(url.rsplit(":", 1)[1]))
    deadline = time.monotonic() + 10
    while True:
        try:
            return socket.create_connection(address, timeout=10)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _read(conn: socket.socket) -> bytes:
    chunk = conn.recv(65536)
    if not chunk:
        raise AssertionError("the proxy closed the connection")
    return chunk


def _response(conn: socket.socket) -> bytes:
    """One whole HTTP/1.1 response, with a ``content-length`` or a chunked body."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += _read(conn)
    head, _, body = data.partition(b"\r\n\r\n")
    found = re.search(rb"(?i)content-length: *(\d+)", head)
    if found is None:  # chunked: until the last chunk
        while not body.endswith(b"0\r\n\r\n"):
            body += _read(conn)
        return head + b"\r\n\r\n" + body
    while len(body) < int(found.group(1)):
        body += _read(conn)
    return head + b"\r\n\r\n" + body


def test_serve_closes_a_connection_whose_request_head_is_late(tmp_path: Path) -> None:
    """Slow-header defence (``server.header_timeout_s``): silent and byte-at-a-time heads,
    and bytes that start no request after a response, are cut; a connection idle between
    requests is the keep-alive timeout's business, and a response is never cut for a
    pipelined head that waits behind it."""

    def edit(text: str) -> str:
        assert "header_timeout_s: 30" in text and "keep_alive_timeout_s: 75" in text
        return text.replace("header_timeout_s: 30", "header_timeout_s: 1").replace(
            "keep_alive_timeout_s: 75", "keep_alive_timeout_s: 10"
        )

    def closed_after(conn: socket.socket, began: float) -> float:
        assert conn.recv(65536) == b""
        return time.monotonic() - began

    with served_cli(tmp_path, config=edit) as served:
        with _connect(served.url) as silent, _connect(served.url) as slow, _connect(served.url) as second:
            began = time.monotonic()
            slow.sendall(b"GET /healthz HTTP/1.1\r\n")
            second.sendall(HEALTHZ)
            assert _response(second).startswith(b"HTTP/1.1 200")
            second.sendall(b"GET /healthz HTTP/1.1\r\n")  # a second request's head, never finished
            time.sleep(0.5)
            slow.sendall(b"Host: proxy\r\n")  # bytes do not move the deadline
            assert 0.8 < closed_after(silent, began) < 4
            assert 0.8 < closed_after(slow, began) < 4
            assert 0.8 < closed_after(second, began) < 4
        with _connect(served.url) as crlf:
            crlf.sendall(HEALTHZ)
            assert _response(crlf).startswith(b"HTTP/1.1 200")
            began = time.monotonic()
            crlf.sendall(b"\r\n")  # skipped by the parser, and it stops the keep-alive timer
            assert 0.8 < closed_after(crlf, began) < 4
        with _connect(served.url) as kept:
            kept.sendall(HEALTHZ)
            assert _response(kept).startswith(b"HTTP/1.1 200")
            time.sleep(1.6)  # idle after a response, past header_timeout_s: still open
            kept.sendall(HEALTHZ)
            assert _response(kept).startswith(b"HTTP/1.1 200")
        # a stream of ~1.5 s, with the next request's head started behind it (pipelined)
        body = orjson.dumps(
            {
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": "hi"}],
                "stream": True,
                "emulator": {"completion_tokens": 30, "chunk_delay_ms": 50},
            }
        )
        head = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
            + b"Authorization: Bearer "
            + served.key.encode()
            + b"\r\n"
            + b"Content-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
        )
        with _connect(served.url) as piped:
            began = time.monotonic()
            piped.sendall(head + body + b"GET /healthz HTTP/1.1\r\n")
            streamed = _response(piped)
            assert b"data: [DONE]" in streamed and time.monotonic() - began > 1.2  # not cut
            assert 0.8 < closed_after(piped, time.monotonic()) < 4  # then the late head is


def test_serve_answers_431_and_closes_when_a_request_head_grows_past_the_limit(tmp_path: Path) -> None:
    """``server.max_header_bytes``: httptools keeps a header line of any length in memory
    until it ends, so a head that keeps growing is cut with 431 in OpenAI's envelope; a head
    under the limit passes, also when it arrives over many reads."""

    def edit(text: str) -> str:
        assert "max_header_bytes: 65536" in text
        return text.replace("max_header_bytes: 65536", "max_header_bytes: 8192")

    with served_cli(tmp_path, config=edit) as served:
        with _connect(served.url) as fine:
            fine.sendall(b"GET /healthz HTTP/1.1\r\nHost: proxy\r\n")
            for _ in range(6):  # about 6 KB of headers, in separate reads
                time.sleep(0.02)
                fine.sendall(b"X-Pad: " + b"a" * 1000 + b"\r\n")
            fine.sendall(b"\r\n")
            assert _response(fine).startswith(b"HTTP/1.1 200")
        with _connect(served.url) as endless:
            endless.sendall(b"GET /healthz HTTP/1.1\r\nHost: proxy\r\nX-Big: ")
            sent = 0
            while sent < 4 * 2**20 and not select.select([endless], [], [], 0.005)[0]:
                endless.sendall(b"a" * 16384)  # one header line that never ends
                sent += 16384
            assert sent < 2**20  # cut long before a MB
            answer = b""
            while chunk := endless.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 431 Request Header Fields Too Large")
        assert b"connection: close" in head and b"content-type: application/json" in head
        error = orjson.loads(body)["error"]
        assert error["code"] == "request_header_fields_too_large" and error["type"] == "invalid_request_error"
        assert "8192" in error["message"]
        with _connect(served.url) as after:  # the worker is unharmed
            after.sendall(HEALTHZ)
            assert _response(after).startswith(b"HTTP/1.1 200")


def test_a_store_report_reads_at_most_the_days_rollups_live() -> None:
    """``since=99999d`` must not become 100,000 store calls (one per day); rollups older
    than ``ledger.rollup_ttl_days`` are gone anyway."""
    import asyncio

    from proxy.report_sources import facts_from_store

    days: list[str] = []

    class CountingLedger:
        async def totals(self, day: str, key: str | None = None) -> list[Any]:
            days.append(day)
            return []

    asyncio.run(facts_from_store(CountingLedger(), 0.0, now=1_784_073_600.0, max_days=30))  # type: ignore[arg-type]
    assert len(days) == 31 and days[-1] == "2026-07-15"


def test_environment_overrides_are_checked_like_the_file(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in (("REDIS_URL", "garbage://x"), ("OPENROUTER_BASE_URL", "notaurl")):
        with monkeypatch.context() as env:
            env.setenv(name, value)
            assert main(["check", "--config", str(REPO / "config.yaml")]) == 1
            assert f"environment: {name}: must start with" in capsys.readouterr().out


def test_serve_refuses_an_output_file_it_cannot_write(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config = tmp_path / "config.yaml"
    config.write_text(f"usage:\n  log_path: {blocker}/usage.jsonl\n")
    assert main(["serve", "--config", str(config), "--upstream", "emulator"]) == 2
    assert "usage.log_path" in capsys.readouterr().err


def test_output_files_are_made_private_and_check_sees_a_file_in_the_way(tmp_path: Path) -> None:
    from proxy.cli import _open_outputs, _unwritable

    config = tmp_path / "config.yaml"
    config.write_text("usage:\n  log_path: var/usage.jsonl\nlogging:\n  request_log: logs/requests.jsonl\n")
    settings = load_settings(config, {})
    assert _unwritable(settings, "c") == [] and _open_outputs(settings, "c") == []
    for made in (tmp_path / "var/usage.jsonl", tmp_path / "logs/requests.jsonl"):
        assert made.stat().st_mode & 0o777 == 0o640  # request lines may hold content: not world-readable
    (tmp_path / "blocker").write_text("")
    config.write_text("usage:\n  log_path: blocker/usage.jsonl\n")
    blocked = load_settings(config, {})
    assert [p.message.split(":")[0] for p in _unwritable(blocked, "c")] == ["usage.log_path"]


def test_usage_from_a_log_that_is_not_there_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["usage", "--log", str(tmp_path / "typo.jsonl")]) == 2
    assert "no usage log at" in capsys.readouterr().err
