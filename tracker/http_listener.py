"""The tracker's TCP listener: announces answered inline, everything else to hypercorn.

Why not let hypercorn take every connection: measured on this machine with a
new connection per request (what libtorrent does), quart-trio on hypercorn
answers about 540 requests/s and even `trio.serve_tcp` with a task per
connection about 3,600/s, while accepting in a loop and answering a complete
`GET /announce` straight from the first `recv` — no task, no stream object —
reaches about 13,000/s (docs/BENCHMARKS.md). So this loop accepts, reads the
request head, and when it is a GET of a BitTorrent path (`answer` returns a
response) writes it and closes. Any other request — the control API,
/healthz, /metrics, a head that did not arrive in one piece and turns out not to
be an announce — is handed, with the bytes already read, to `hand_off` (the
hypercorn connection handler), which then owns the connection for good,
keep-alive and all. This module owns sockets and the request head only; it
must not interpret queries (announce.py) or know the app.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Awaitable, Callable

import trio

# A BitTorrent client's GET fits in one segment; more is not an announce.
MAX_HEAD_BYTES = 16 * 1024
HEAD_TIMEOUT_S = 10.0
# Connections accepted per wake-up before letting other tasks run.
ACCEPT_BATCH = 64
_ACCEPT_RETRY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}

# (request target, client ip) → full HTTP response, or None: not ours to answer.
Answer = Callable[[bytes, str], bytes | None]
HandOff = Callable[[trio.abc.HalfCloseableStream], Awaitable[None]]


def http_response(body: bytes, status: bytes = b"200 OK") -> bytes:
    """A complete HTTP/1.1 response that closes the connection after it."""
    return (
        b"HTTP/1.1 "
        + status
        + b"\r\nContent-Type: text/plain\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\nConnection: close\r\n\r\n"
        + body
    )


def get_target(data: bytes) -> bytes | None:
    """The target of a complete, bodiless GET request head in `data`, else None."""
    end = data.find(b"\r\n\r\n")
    if end < 0 or not data.startswith(b"GET "):
        return None
    head = data[:end]
    line_end = head.find(b"\r\n")
    request_line = head if line_end < 0 else head[:line_end]
    parts = request_line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return None
    if end + 4 != len(data):
        return None  # a body or a pipelined request: let hypercorn handle it
    lowered = head.lower()
    if b"\ncontent-length:" in lowered or b"\ntransfer-encoding:" in lowered:
        return None
    return parts[1]


class ReplayStream(trio.abc.HalfCloseableStream):
    """A socket stream that first yields bytes already read from it.

    hypercorn's connection handler reads `.socket` for the peer address, so the
    real client address reaches the app unchanged.
    """

    def __init__(self, stream: trio.SocketStream, prefix: bytes) -> None:
        self.transport = stream
        self.socket = stream.socket
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            await trio.lowlevel.checkpoint()
            data, self._prefix = self._prefix, b""
            return data
        return bytes(await self.transport.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.transport.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.transport.send_eof()

    async def aclose(self) -> None:
        await self.transport.aclose()


def _fast_answer(answer: Answer, data: bytes, ip: str) -> bytes | None:
    target = get_target(data)
    return None if target is None else answer(target, ip)


async def serve_http(
    sock: socket.socket,
    answer: Answer,
    hand_off: HandOff,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve on `sock` (bound and listening) until cancelled; closes it at the end."""
    sock.setblocking(False)
    async with trio.open_nursery() as nursery:
        task_status.started()
        try:
            while True:
                await trio.lowlevel.wait_readable(sock)
                for _ in range(ACCEPT_BATCH):
                    try:
                        conn, addr = sock.accept()
                    except BlockingIOError:
                        break
                    except OSError as e:
                        if e.errno not in _ACCEPT_RETRY_ERRNOS:
                            raise
                        await trio.sleep(0.1)  # out of descriptors: let some close
                        break
                    conn.setblocking(False)
                    ip = addr[0]
                    try:
                        data = conn.recv(MAX_HEAD_BYTES)
                    except BlockingIOError:
                        data = b""
                    except OSError:
                        conn.close()
                        continue
                    response = _fast_answer(answer, data, ip) if data else None
                    if response is None:
                        nursery.start_soon(_connection, conn, ip, data, answer, hand_off)
                        continue
                    try:
                        sent = conn.send(response)
                    except OSError:
                        conn.close()
                        continue
                    if sent == len(response):
                        conn.close()
                    else:
                        nursery.start_soon(_finish, conn, response[sent:])
                await trio.lowlevel.checkpoint()
        finally:
            sock.close()


async def _finish(conn: socket.socket, rest: bytes) -> None:
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(conn))
    with trio.move_on_after(HEAD_TIMEOUT_S):
        with contextlib.suppress(trio.BrokenResourceError, OSError):
            await stream.send_all(rest)
    await stream.aclose()


async def _connection(
    conn: socket.socket, ip: str, data: bytes, answer: Answer, hand_off: HandOff
) -> None:
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(conn))
    try:
        with trio.move_on_after(HEAD_TIMEOUT_S) as timeout:
            while b"\r\n\r\n" not in data and len(data) < MAX_HEAD_BYTES:
                chunk = await stream.receive_some(MAX_HEAD_BYTES)
                if not chunk:
                    await stream.aclose()
                    return
                data += chunk
        if timeout.cancelled_caught:
            await stream.aclose()
            return
        response = _fast_answer(answer, data, ip)
        if response is not None:
            await stream.send_all(response)
            await stream.aclose()
            return
    except (trio.BrokenResourceError, OSError):
        await stream.aclose()
        return
    await hand_off(ReplayStream(stream, data))
