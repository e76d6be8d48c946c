"""The command line: check, keys new, usage, and serve as the README runs it."""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

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
    ]
    report = build_report(lines, ("key", "model"))
    assert report.skipped == 1
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

    with served_cli(tmp_path, config=edit) as served:
        port = int(served.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            for pause in (0.0, 1.2):  # idle for less than the timeout: still open
                time.sleep(pause)
                conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: proxy\r\n\r\n")
                assert _response(conn).startswith(b"HTTP/1.1 200")
            began = time.monotonic()
            assert conn.recv(1) == b""  # then the proxy closes it
            assert 1.5 < time.monotonic() - began < 4  # uvicorn's default would be 5 s


def _response(conn: socket.socket) -> bytes:
    """One whole HTTP/1.1 response with a ``content-length`` body."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        body += conn.recv(65536)
    return data


def test_serve_closes_a_connection_whose_request_head_is_late(tmp_path: Path) -> None:
    """Slow-header defence (``server.header_timeout_s``): silent and byte-at-a-time heads
    are cut; a connection idle between requests is the keep-alive timeout's business."""

    def edit(text: str) -> str:
        assert "header_timeout_s: 30" in text and "keep_alive_timeout_s: 75" in text
        return text.replace("header_timeout_s: 30", "header_timeout_s: 1").replace(
            "keep_alive_timeout_s: 75", "keep_alive_timeout_s: 10"
        )

    with served_cli(tmp_path, config=edit) as served:
        address = ("127.0.0.1", int(served.url.rsplit(":", 1)[1]))
        with (
            socket.create_connection(address, timeout=10) as silent,
            socket.create_connection(address, timeout=10) as slow,
        ):
            began = time.monotonic()
            slow.sendall(b"GET /healthz HTTP/1.1\r\n")
            time.sleep(0.5)
            slow.sendall(b"Host: proxy\r\n")  # ...and the rest never comes
            assert silent.recv(1) == b"" and slow.recv(1) == b""
            assert 0.8 < time.monotonic() - began < 4
        with socket.create_connection(address, timeout=10) as kept:
            kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: proxy\r\n\r\n")
            assert _response(kept).startswith(b"HTTP/1.1 200")
            time.sleep(1.6)  # idle after a response, past header_timeout_s: still open
            kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: proxy\r\n\r\n")
            assert _response(kept).startswith(b"HTTP/1.1 200")
