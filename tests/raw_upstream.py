"""RawUpstream: a bare TCP stand-in for OpenRouter that writes whole raw HTTP responses.

For what an ASGI server will not produce: a body delimited only by the connection's end
(no length, not chunked), or an encoding the proxy did not ask for. Every request is read
(head, then a ``content-length`` body) and answered with ``respond(request_line)``; the
connection is then closed. Paths other than ``/chat/completions`` get a 404.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable


class RawUpstream:
    """``url`` is ``http://127.0.0.1:<port>``; ``respond`` may be replaced between requests."""

    def __init__(self, respond: Callable[[bytes], bytes]) -> None:
        self.respond = respond
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def __enter__(self) -> RawUpstream:
        return self

    def __exit__(self, *exc: object) -> None:
        self._sock.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                more = conn.recv(65536)
                if not more:
                    return
                data += more
            head, _, rest = data.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            length = next((int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length")), 0)
            while len(rest) < length:
                rest += conn.recv(65536)
            if b"/chat/completions" not in lines[0]:
                conn.sendall(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                return
            conn.sendall(self.respond(lines[0]))
