"""``loadtests/instructions.py``: reading callgrind's totals, the report, the request loop.

valgrind itself is not needed here: the dumps are synthetic, the server is a stdlib one.
"""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "loadtests"))

import instructions
from instructions import Count, dump_total, instructions_of, render, send_requests

DUMP = b"""# callgrind format
version: 1
creator: callgrind-3.19.0
pid: 4242
cmd:  python -m proxy.cli serve
part: 2

desc: I1 cache:
events: Ir
summary: 2581000123

fn=(1) main
0 12

totals: 2581000999
"""


def test_the_total_is_read_from_the_summary_line() -> None:
    assert instructions_of(DUMP) == 2_581_000_123


def test_a_totals_line_is_read_when_there_is_no_summary() -> None:
    assert instructions_of(DUMP.replace(b"summary: 2581000123\n", b"")) == 2_581_000_999


def test_a_file_that_is_no_dump_is_refused() -> None:
    with pytest.raises(ValueError, match="not a callgrind dump"):
        instructions_of(b"events: Ir\nfn=(1) main\n")


def test_the_report_gives_instructions_per_request_idle_share_and_ratio_to_the_floor() -> None:
    counts = [
        Count("floor (aiohttp)", "non-stream", 200, 100_000_000, 10.0, 60_000.0),
        Count("proxy (all features)", "non-stream", 200, 500_000_000, 20.0, 2_000_000.0),
    ]
    args = argparse.Namespace(warmup=100, requests=200, admission="leased")
    table = render(counts, args)
    assert "| floor (aiohttp) | non-stream | 0.500 | 0.003 | - |" in table  # 60,000/s x 10 s / 200
    # 2.5 M per request; idle timers 2 M/s x 20 s / 200 requests = 0.2 M; 2.5 / 0.5 = 5x
    assert "| proxy (all features) | non-stream | 2.500 | 0.200 | 5.00x |" in table


def fake_vgdb(monkeypatch: pytest.MonkeyPatch, workdir: Path, pid: int, totals: list[int]) -> list[tuple[str, ...]]:
    """``control`` replaced: each ``dump`` writes ``callgrind.<pid>.<n>`` with the next total."""
    sent: list[tuple[str, ...]] = []

    def control(to: int, *command: str) -> None:
        assert to == pid
        sent.append(command)
        if command == ("dump",):
            n = sum(1 for c in sent if c == ("dump",))
            (workdir / f"callgrind.{pid}.{n}").write_bytes(DUMP.replace(b"2581000123", str(totals[n - 1]).encode()))

    monkeypatch.setattr(instructions, "control", control)
    return sent


def test_a_dump_is_read_and_removed_and_the_empty_startup_file_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "callgrind.77").write_bytes(b"")  # callgrind makes it at startup; read, it would not parse
    fake_vgdb(monkeypatch, tmp_path, 77, [1_000, 2_000])
    assert dump_total(77, tmp_path) == 1_000
    assert dump_total(77, tmp_path) == 2_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["callgrind.77"]


def test_a_dump_that_counted_nothing_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_vgdb(monkeypatch, tmp_path, 77, [0])
    with pytest.raises(RuntimeError, match="no instructions"):
        dump_total(77, tmp_path)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: ClassVar[list[tuple[str, str, bytes]]] = []
    status = 200

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        type(self).seen.append((self.path, self.headers["authorization"], body))
        payload = b'{"ok": true}'
        self.send_response(type(self).status)
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass


@pytest.fixture
def server() -> Iterator[str]:
    _Handler.seen, _Handler.status = [], 200
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_requests_rotate_bodies_and_keys(server: str) -> None:
    send_requests(server, "/v1/chat/completions", [b"a", b"bb"], ["k1", "k2", "k3"], 4)
    assert _Handler.seen == [
        ("/v1/chat/completions", "Bearer k1", b"a"),
        ("/v1/chat/completions", "Bearer k2", b"bb"),
        ("/v1/chat/completions", "Bearer k3", b"a"),
        ("/v1/chat/completions", "Bearer k1", b"bb"),
    ]


def test_only_the_counted_requests_fall_between_the_reset_and_the_first_dump(
    server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = fake_vgdb(monkeypatch, tmp_path, 77, [5_000_000, 300_000])
    real = instructions.control
    calls: list[tuple[int, tuple[str, ...]]] = []  # (requests the server had seen, command)

    def watched(pid: int, *command: str) -> None:
        calls.append((len(_Handler.seen), command))
        real(pid, *command)

    monkeypatch.setattr(instructions, "control", watched)
    total, seconds, idle_per_s = instructions.count_requests(
        77, server, "/v1/chat/completions", [b"a"], ["k"], warmup=3, requests=5, workdir=tmp_path, idle_s=0.2
    )
    assert calls == [
        (3, ("instrumentation", "on")),
        (3, ("zero",)),
        (8, ("dump",)),
        (8, ("dump",)),
        (8, ("instrumentation", "off")),
    ]
    assert fake == [c for _, c in calls]
    assert total == 5_000_000 and seconds > 0
    assert 300_000 / 0.4 < idle_per_s <= 300_000 / 0.2  # the idle window is at least idle_s long


def test_a_status_other_than_200_stops_the_count(server: str) -> None:
    _Handler.status = 429
    with pytest.raises(RuntimeError, match="answered 429"):
        send_requests(server, "/v1/chat/completions", [b"a"], ["k1"], 3)
    assert len(_Handler.seen) == 1
