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

from instructions import Count, instructions_of, render, send_requests

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
"""


def test_the_total_is_read_from_the_summary_line() -> None:
    assert instructions_of(DUMP) == 2_581_000_123


def test_a_totals_line_is_read_when_there_is_no_summary() -> None:
    assert instructions_of(DUMP.replace(b"summary:", b"totals:")) == 2_581_000_123


def test_a_file_that_is_no_dump_is_refused() -> None:
    with pytest.raises(ValueError, match="not a callgrind dump"):
        instructions_of(b"events: Ir\nfn=(1) main\n")


def test_the_report_gives_instructions_per_request_idle_share_and_ratio_to_the_floor() -> None:
    counts = [
        Count("floor (aiohttp)", "non-stream", 200, 100_000_000, 10.0, 50_000.0),
        Count("proxy (all features)", "non-stream", 200, 500_000_000, 20.0, 2_000_000.0),
    ]
    args = argparse.Namespace(warmup=100, requests=200, admission="leased")
    table = render(counts, args)
    assert "| floor (aiohttp) | non-stream | 0.500 | 0.003 | - |" in table
    # 2.5 M per request; idle timers 2 M/s x 20 s / 200 requests = 0.2 M; 2.5 / 0.5 = 5x
    assert "| proxy (all features) | non-stream | 2.500 | 0.200 | 5.00x |" in table


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


def test_a_status_other_than_200_stops_the_count(server: str) -> None:
    _Handler.status = 429
    with pytest.raises(RuntimeError, match="answered 429"):
        send_requests(server, "/v1/chat/completions", [b"a"], ["k1"], 3)
    assert len(_Handler.seen) == 1
