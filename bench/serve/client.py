"""bench.serve's client: whole-blob GETs over a raw socket, one thread per stream.

Owns the measuring client: a GET read into one reused 1 MiB buffer (so the
client's cost per byte is the kernel's copy and the server is what gets
measured), with the body's length and, for the warm-up only, its digest
checked; and timing N concurrent streams of several GETs each. It must not
start or know the servers it measures.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from urllib.parse import urlsplit

MiB = 1 << 20
RECV_BUFFER = MiB
SOCKET_TIMEOUT_S = 120.0


def fetch(url: str, expect: int, sha256: str | None = None) -> int:
    """GET `url` over a raw socket into a reused buffer; return the body's length.

    Reading into one preallocated buffer keeps the client's cost per byte at the
    kernel's copy, so the server is what gets measured. With `sha256`, the body
    is hashed and checked too (only for the warm-up: hashing is slower than
    serving).
    """
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    view = memoryview(bytearray(RECV_BUFFER))
    h = hashlib.sha256() if sha256 else None
    with socket.create_connection((host, port), timeout=SOCKET_TIMEOUT_S) as s:
        s.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            if len(head) > 64 * 1024:
                raise RuntimeError(f"{url}: response head too long")
            n = s.recv_into(view)
            if not n:
                raise RuntimeError(f"{url}: connection closed in the response head")
            head += view[:n]
        head, _, rest = head.partition(b"\r\n\r\n")
        status_line, *lines = head.split(b"\r\n")
        if status_line.split()[1] != b"200":
            raise RuntimeError(f"{url}: {status_line.decode(errors='replace')}")
        length = next(
            (
                int(v)
                for k, _, v in (ln.partition(b":") for ln in lines)
                if k.strip().lower() == b"content-length"
            ),
            -1,
        )
        if length != expect:
            raise RuntimeError(f"{url}: Content-Length {length}, expected {expect}")
        got = len(rest)
        if h is not None:
            h.update(rest)
        while got < length:
            n = s.recv_into(view)
            if not n:
                break
            got += n
            if h is not None:
                h.update(view[:n])
    if got != expect:
        raise RuntimeError(f"{url}: got {got} bytes, expected {expect}")
    if h is not None and h.hexdigest() != sha256:
        raise RuntimeError(f"{url}: body does not hash to sha256:{sha256}")
    return got


def timed_get(url: str, size: int, streams: int, gets: int) -> float:
    """Aggregate bytes per second of `streams` concurrent streams, each GETting the
    whole blob `gets` times in a row."""
    errors: list[BaseException] = []
    start = threading.Barrier(streams + 1)

    def one() -> None:
        try:
            start.wait()
            for _ in range(gets):
                fetch(url, size)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=one, daemon=True) for _ in range(streams)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join(SOCKET_TIMEOUT_S * gets)
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    if any(t.is_alive() for t in threads):
        raise RuntimeError(f"{url}: a stream did not finish in time")
    return size * streams * gets / elapsed
