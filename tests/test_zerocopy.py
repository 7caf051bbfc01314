"""Zero-copy send (p2preg.node.hypercorn_internals) over a real hypercorn server and clients.

A bare ASGI app (no Quart) sends a file region with `http.response.zerocopysend`
and the bytes that arrive are checked: whole files and slices, Content-Length
and chunked framing, a region larger than one sendfile piece, keep-alive after
a zero-copy response, a client that hangs up mid-region, a region the file
cannot fill, and HTTP/2, where the extension must not be offered. Then the
Quart side: a quart-trio app whose connection class is `ZeroCopyConnection`
sends a `ZeroCopyBody` zero-copy over HTTP/1.1 and as chunks over HTTP/2.
"""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace, TracebackType
from typing import Any, BinaryIO

import httpx
import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart import Response
from quart.wrappers.response import ResponseBody
from quart_trio import QuartTrio

from p2preg.node.blobstream import BlobBody
from p2preg.node.hypercorn_internals import (
    SENDFILE_MAX_BYTES,
    ZEROCOPY_SEND,
    SendFile,
    ZeroCopyBody,
    ZeroCopyConnection,
    install,
)


@dataclass
class App:
    """Serves `path` by zero-copy send; the query picks offset, count and framing."""

    path: Path
    seen: list[dict[str, Any]] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    done: trio.Event = field(default_factory=trio.Event)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                kind = (await receive())["type"]  # lifespan.startup, then .shutdown
                await send({"type": f"{kind}.complete"})
                if kind == "lifespan.shutdown":
                    return
        self.seen.append(scope)
        query = dict(p.split("=") for p in scope["query_string"].decode().split("&") if p)
        size = self.path.stat().st_size
        offset = int(query.get("offset", 0))
        count = int(query.get("count", size - offset))
        headers = [(b"content-type", b"application/octet-stream")]
        if "chunked" not in query:
            headers.append((b"content-length", str(count).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        # Opening and reading a small local file: not worth a thread in a test.
        if ZEROCOPY_SEND not in scope["extensions"]:
            with open(self.path, "rb") as f:  # noqa: ASYNC230
                f.seek(offset)
                body = f.read(count)
            await send({"type": "http.response.body", "body": body})
            self.finished.append("bytes")
            return
        # ?unreadable sends a directory, which sendfile refuses as it would a bad disk.
        fd = os.open(self.path.parent if "unreadable" in query else self.path, os.O_RDONLY)
        file = SimpleNamespace(fileno=lambda: fd)
        try:
            await send({"type": ZEROCOPY_SEND, "file": file, "offset": offset, "count": count})
        finally:
            os.close(fd)
            self.finished.append("zerocopy")
            self.done.set()


@asynccontextmanager
async def serving(app: Any) -> AsyncIterator[str]:
    install()
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(functools.partial(serve, app, config))
        yield binds[0]
        nursery.cancel_scope.cancel()


@pytest.fixture
def blob(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "blob"
    data = os.urandom(3 * SENDFILE_MAX_BYTES + 12345)
    path.write_bytes(data)
    return path, data


async def test_whole_file_and_slices_arrive_intact(blob: tuple[Path, bytes]) -> None:
    path, data = blob
    app = App(path)
    async with serving(app) as url, httpx.AsyncClient(base_url=url, trust_env=False) as client:
        whole = await client.get("/")
        assert whole.content == data
        part = await client.get("/?offset=100&count=1000")
        assert part.content == data[100:1100]
        count = len(data) - 100
        chunked = await client.get(f"/?offset=7&count={count}&chunked=1")
        assert chunked.headers.get("transfer-encoding") == "chunked"
        assert chunked.content == data[7 : 7 + count]
        # Keep-alive: h11 counted every region byte, so the next response on
        # the same connection starts where it should.
        ports = {scope["client"][1] for scope in app.seen}
        assert len(ports) == 1
    assert all(ZEROCOPY_SEND in scope["extensions"] for scope in app.seen)
    assert app.finished == ["zerocopy"] * 3


async def test_a_client_hanging_up_mid_region_leaves_the_server_serving(
    blob: tuple[Path, bytes],
) -> None:
    path, data = blob
    app = App(path)
    async with serving(app) as url:
        host, port = url.removeprefix("http://").split(":")
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 200")
        with trio.fail_after(10):
            await app.done.wait()
        async with httpx.AsyncClient(base_url=url, trust_env=False) as client:
            again = await client.get("/?count=10")
        assert again.content == data[:10]


async def test_a_region_past_the_end_of_the_file_closes_the_connection(
    blob: tuple[Path, bytes],
) -> None:
    path, data = blob
    app = App(path)
    async with serving(app) as url, httpx.AsyncClient(base_url=url, trust_env=False) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get(f"/?offset=10&count={len(data)}")
        again = await client.get("/?count=10")
        assert again.content == data[:10]


async def test_a_file_that_cannot_be_read_closes_the_connection(
    blob: tuple[Path, bytes],
) -> None:
    path, data = blob
    app = App(path)
    async with serving(app) as url, httpx.AsyncClient(base_url=url, trust_env=False) as client:
        with trio.fail_after(10), pytest.raises(httpx.RemoteProtocolError):
            await client.get("/?count=1000&unreadable=1")
        again = await client.get("/?count=10")
        assert again.content == data[:10]


async def test_http2_is_not_offered_zero_copy(blob: tuple[Path, bytes]) -> None:
    path, data = blob
    app = App(path)
    async with (
        serving(app) as url,
        httpx.AsyncClient(base_url=url, trust_env=False, http1=False, http2=True) as client,
    ):
        response = await client.get("/?offset=5&count=100")
        assert response.http_version == "HTTP/2"
        assert response.content == data[5:105]
    assert ZEROCOPY_SEND not in app.seen[0]["extensions"]
    assert app.finished == ["bytes"]


@dataclass
class FileBody(ResponseBody):
    """A Quart body of `count` bytes of `path` from `offset`; records how it went out."""

    path: Path
    offset: int
    count: int
    ways: list[str]
    file: BinaryIO | None = None

    async def __aenter__(self) -> FileBody:
        self.file = open(self.path, "rb")  # noqa: ASYNC230, SIM115 (a small local file)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self.file is not None
        self.file.close()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        assert self.file is not None
        self.ways.append("chunks")
        yield os.pread(self.file.fileno(), self.count, self.offset)

    async def send_zerocopy(self, send_file: SendFile) -> None:
        assert self.file is not None
        self.ways.append("zerocopy")
        await send_file(self.file, self.offset, self.count)


async def test_quart_sends_a_zero_copy_body_zero_copy_over_http1_only(
    blob: tuple[Path, bytes],
) -> None:
    path, data = blob
    ways: list[str] = []
    app = QuartTrio(__name__)
    app.asgi_http_class = ZeroCopyConnection

    @app.route("/")
    async def index() -> Response:
        body = FileBody(path, 3, len(data) - 3, ways)
        return Response(body, 200, {"Content-Length": str(body.count)})

    async with serving(app) as url:
        for http2 in (False, True):
            async with httpx.AsyncClient(
                base_url=url, trust_env=False, http1=not http2, http2=http2
            ) as client:
                response = await client.get("/")
                assert response.content == data[3:]
    assert ways == ["zerocopy", "chunks"]


def test_blob_bodies_are_zero_copy_bodies() -> None:
    assert issubclass(FileBody, ZeroCopyBody)
    assert issubclass(BlobBody, ZeroCopyBody)
