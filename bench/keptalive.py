"""A blocking HTTP/1.1 client for one kept-alive connection: the tracker benches' load side.

Why not httpx: the relayed and lease rows of bench/tracker_mtls.py measure the
tracker's CPU per request on kept-alive connections, and a tracker that is not
saturated spends part of each request waiting in `epoll` for the next one
(docs/BENCHMARKS.md, "Where a relayed request's time goes"). httpx costs the
load core about as much per request as the tracker spends answering it, so 16
workers on that core kept the tracker 60 to 66 % busy. This client sends a
request as one buffer and reads the answer by its Content-Length, so the same
workers keep the tracker saturated, as a serving replica is through a big
pull (docs/BENCHMARKS.md, "The requests at their measured cost"). It speaks only what the tracker
answers (Content-Length framing, keep-alive); anything else is an error.
"""

from __future__ import annotations

import socket
import ssl
from urllib.parse import urlsplit

MAX_HEAD_BYTES = 16 * 1024


def post_bytes(host: str, path: str, body: bytes, content_type: str, fields: str = "") -> bytes:
    """A POST of `body` to `path`, whole; `fields`: more header lines, each with its CRLF."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n{fields}\r\n"
    )
    return head.encode() + body


def answer_head(head: bytes) -> tuple[int, int, bool]:
    """An answer's head (without its blank line): its status, its Content-Length, and
    whether it closes the connection. OSError for an answer not framed by a length."""
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    pairs = (line.partition(b":") for line in lines[1:])
    fields = {k.strip().lower(): v.strip() for k, _, v in pairs}
    if b"content-length" not in fields:
        raise OSError("an answer without Content-Length")
    closes = fields.get(b"connection", b"").lower() == b"close"
    return status, int(fields[b"content-length"]), closes


class KeptAlive:
    """One connection to `url`'s host and port (https with `context`), opened on first
    use and again after a close; `headers` go with every request."""

    def __init__(
        self,
        url: str,
        context: ssl.SSLContext | None,
        timeout_s: float,
        headers: dict[str, str] | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.hostname is None or parts.port is None or (parts.scheme == "https") != bool(
            context
        ):
            raise ValueError(f"{url}: host and port, and https exactly when given a context")
        self._address = (parts.hostname, parts.port)
        self._context = context
        self._timeout_s = timeout_s
        self._fields = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self._sock: socket.socket | None = None
        self._buffer = b""

    def post(self, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
        """POST `body` to `path`: (status, answer body). OSError if the connection fails."""
        request = post_bytes(self._address[0], path, body, content_type, self._fields)
        sock = self._connection()
        try:
            sock.sendall(request)
            return self._answer(sock)
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock, self._buffer = None, b""

    def _connection(self) -> socket.socket:
        if self._sock is None:
            raw = socket.create_connection(self._address, timeout=self._timeout_s)
            # No Nagle stall behind a small write (bench/tracker_mtls.py's _Conn).
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock = raw
            if self._context is not None:
                self._sock = self._context.wrap_socket(raw, server_hostname=self._address[0])
        return self._sock

    def _answer(self, sock: socket.socket) -> tuple[int, bytes]:
        while b"\r\n\r\n" not in self._buffer:
            self._fill(sock)
            if len(self._buffer) > MAX_HEAD_BYTES:
                raise OSError("an answer's head larger than 16 KiB")
        head, _, self._buffer = self._buffer.partition(b"\r\n\r\n")
        status, length, closes = answer_head(head)
        while len(self._buffer) < length:
            self._fill(sock)
        body, self._buffer = self._buffer[:length], self._buffer[length:]
        if closes:
            self.close()
        return status, body

    def _fill(self, sock: socket.socket) -> None:
        chunk = sock.recv(65536)
        if not chunk:
            raise OSError("the tracker closed the connection mid-answer")
        self._buffer += chunk
