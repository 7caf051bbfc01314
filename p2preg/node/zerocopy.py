"""Zero-copy response bodies: ASGI's `http.response.zerocopysend` for hypercorn.

Hypercorn (0.18) has no sendfile: every body byte is copied from the file into
a Python `bytes`, then again into the socket, and on this machine that caps a
blob stream at about 0.6x of nginx's `sendfile on`. This module teaches
hypercorn's trio HTTP/1.1 path the ASGI zero-copy-send extension
(https://asgi.readthedocs.io/en/latest/extensions.html#zero-copy-send): a
response body message that names an open file, an offset and a count, which
the connection writes with `os.sendfile` straight from the page cache. h11
already supports this (`send_with_data_passthrough`, made for sendfile); the
patches below only carry a `FileRegion` through hypercorn's three layers and
leave every other message to hypercorn's own code:

- `HTTPStream.handle` advertises the extension in the scope, only when the
  stream is HTTP/1.x over plain TCP on hypercorn's trio server (not TLS, not
  HTTP/2, not asyncio);
- `HTTPStream.app_send` turns the message into a body event with the region;
- `H11Protocol._send_h11_event` lets h11 frame the region without joining it;
- `TCPServer.protocol_send` writes the region with `os.sendfile` in pieces of
  at most `SENDFILE_MAX_BYTES`, with a checkpoint between pieces so that one
  fast client cannot hold the event loop, waiting on the socket when it is full.

`install()` applies the patches once, and only on the hypercorn version they
were written against; anywhere else it declines, nothing is advertised, and
apps fall back to ordinary body messages. Like nginx's default `sendfile on`
(without `aio threads`), a piece of a file that is not in the page cache is
read from disk on the event loop; the piece size bounds that stall.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import h11
import trio
from hypercorn.events import Closed, RawData
from hypercorn.protocol.events import Body, Request
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.http_stream import ASGIHTTPState, HTTPStream
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.utils import UnexpectedMessageError, suppress_body

log = logging.getLogger(__name__)

ZEROCOPY_SEND = "http.response.zerocopysend"
# The versions whose internals the patches were read against.
SUPPORTED_HYPERCORN = frozenset({"0.18.0"})
# Upper bound of one sendfile call: large enough that the per-call cost is small,
# small enough that a stream gives way to the others (and bounds a cold-cache
# stall). 1 MiB beat 4 MiB with 4 streams (docs/BENCHMARKS.md); nginx's
# sendfile_max_chunk is 2 MiB.
SENDFILE_MAX_BYTES = 1 << 20

_installed = False


@dataclass(frozen=True, slots=True)
class FileRegion:
    """`count` bytes of the open file `fd` from `offset`; h11 only needs its len()."""

    fd: int
    offset: int
    count: int

    def __len__(self) -> int:
        return self.count

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> FileRegion:
        fd = message["file"].fileno()
        offset = message.get("offset")
        if offset is None:
            offset = os.lseek(fd, 0, os.SEEK_CUR)
        count = message.get("count")
        if count is None:
            count = max(0, os.fstat(fd).st_size - offset)
        if offset < 0 or count < 0:
            raise ValueError(f"{ZEROCOPY_SEND}: negative offset or count")
        return cls(fd, offset, count)


async def send_region(stream: trio.SocketStream, region: FileRegion) -> None:
    """Write `region` to `stream` with sendfile; the caller holds the send lock."""
    sock = stream.socket
    offset, left = region.offset, region.count
    try:
        while left:
            # One checkpoint per piece: cancellation, and a turn for other streams.
            # The socket is waited for only once it is full: asking epoll first
            # on every piece cost 10-20 % with 4 streams.
            await trio.lowlevel.checkpoint()
            try:
                sent = os.sendfile(sock.fileno(), region.fd, offset, min(left, SENDFILE_MAX_BYTES))
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
                continue
            except OSError as e:  # the peer is gone, or the file cannot be read
                raise trio.BrokenResourceError(str(e)) from e
            if sent == 0:
                raise trio.BrokenResourceError(f"file ended {left} bytes before its region")
            offset += sent
            left -= sent
    except BaseException:
        # h11 has counted the whole region but only part of it went out: the
        # framing is lost, so the connection must not carry another response.
        with trio.CancelScope(shield=True):
            await stream.aclose()
        raise


def _advertised(stream: HTTPStream) -> bool:
    protocol = getattr(stream.send, "__self__", None)
    if not isinstance(protocol, H11Protocol) or protocol.ssl:
        return False
    server = getattr(protocol.send, "__self__", None)
    return isinstance(server, TCPServer) and isinstance(server.stream, trio.SocketStream)


def install() -> bool:
    """Patch hypercorn once; False (and nothing changed) on an unknown version."""
    global _installed
    if _installed:
        return True
    version = metadata.version("hypercorn")
    if version not in SUPPORTED_HYPERCORN:
        log.warning("zerocopy: hypercorn %s is not one of %s: no sendfile", version,
                    sorted(SUPPORTED_HYPERCORN))  # fmt: skip
        return False

    stream_handle = HTTPStream.handle
    stream_app_send = HTTPStream.app_send
    h11_send_event = H11Protocol._send_h11_event
    tcp_protocol_send = TCPServer.protocol_send

    async def handle(self: HTTPStream, event: Any) -> None:
        await stream_handle(self, event)
        # spawn_app only schedules the app task, which cannot run before this
        # task's next checkpoint: the scope is complete before the app reads it.
        if isinstance(event, Request) and not self.closed and _advertised(self):
            self.scope["extensions"][ZEROCOPY_SEND] = {}

    async def app_send(self: HTTPStream, message: Any) -> None:
        if message is None or message.get("type") != ZEROCOPY_SEND:
            await stream_app_send(self, message)
            return
        if self.state != ASGIHTTPState.RESPONSE or ZEROCOPY_SEND not in self.scope["extensions"]:
            raise UnexpectedMessageError(self.state, ZEROCOPY_SEND)
        region = FileRegion.from_message(message)
        if region.count and not suppress_body(self.scope["method"], int(self.response["status"])):
            await self.send(Body(stream_id=self.stream_id, data=region))  # type: ignore[arg-type]
        if not message.get("more_body", False):
            await self._send_closed()

    async def _send_h11_event(self: H11Protocol, event: Any) -> None:
        data: object = getattr(event, "data", None)
        connection = self.connection
        if not (
            type(event) is h11.Data
            and isinstance(data, FileRegion)
            and isinstance(connection, h11.Connection)
        ):
            await h11_send_event(self, event)
            return
        try:
            parts = connection.send_with_data_passthrough(event)
        except h11.LocalProtocolError:
            if connection.their_state != h11.ERROR:
                raise
            return
        for part in parts or ():
            await self.send(RawData(data=part))

    async def protocol_send(self: TCPServer, event: Any) -> None:
        data: object = getattr(event, "data", None)
        stream: object = self.stream  # typed SSLStream by hypercorn, but either
        if not (
            isinstance(event, RawData)
            and isinstance(data, FileRegion)
            and isinstance(stream, trio.SocketStream)  # as _advertised() made sure
        ):
            await tcp_protocol_send(self, event)
            return
        async with self.send_lock:
            try:
                await send_region(stream, data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await self.protocol.handle(Closed())

    HTTPStream.handle = handle  # type: ignore[method-assign]
    HTTPStream.app_send = app_send  # type: ignore[method-assign]
    H11Protocol._send_h11_event = _send_h11_event  # type: ignore[method-assign]
    TCPServer.protocol_send = protocol_send  # type: ignore[method-assign]
    _installed = True
    return True
