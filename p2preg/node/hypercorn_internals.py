"""hypercorn's and Quart's internals, fenced: the one module of the node that touches them.

Owns every use the node makes of what hypercorn (0.18.0), Quart (0.22.0) and
quart-trio (0.12.0) do not publish as API, behind one version gate: `install()`
refuses any other version of the three with a `ConfigError` (the CLI prints it
as one line and exits 2) before it patches anything. Three things live here:
the guard (a connection that fails ends alone instead of stopping the server:
two hypercorn bugs, docs/HYPERCORN.md); zero-copy blob bodies (ASGI's
`http.response.zerocopysend`, which hypercorn lacks, written with
`os.sendfile`, and `ZeroCopyConnection`, the Quart side that hands a
`ZeroCopyBody` to it); and `ListeningConfig`, which keeps the listening sockets
`serve` creates. tests/test_hypercorn_internals.py lists every internal touched
with the signature it was written for, and fails, naming it, when an upgrade
moves one. This module must not fall back silently on a version it was not
checked against, must not change what hypercorn sends for ordinary messages,
and must not hold node logic: bodies, stream slots and metrics stay with their
owners (p2preg/node/blobstream.py), which use only the public names below.

Zero-copy, layer by layer (h11 already frames a body it does not hold, with
`send_with_data_passthrough`; the patches only carry a `FileRegion` down):
`HTTPStream.handle` advertises the extension, for HTTP/1.x over plain TCP on the
trio server only (not TLS, not HTTP/2); `HTTPStream.app_send` turns the message
into a body event; `H11Protocol._send_h11_event` lets h11 frame the region
without joining it; `TCPServer.protocol_send` writes it with `os.sendfile` in
pieces of at most `SENDFILE_MAX_BYTES`, a checkpoint between pieces so that one
fast client cannot hold the event loop, waiting on the socket only when it is
full. Like nginx's default `sendfile on`, a piece not in the page cache is read
from disk on the event loop; the piece size bounds that stall.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from types import TracebackType
from typing import Any, BinaryIO, Protocol, runtime_checkable

import h11
import trio
from hypercorn.config import Config, Sockets
from hypercorn.events import Closed, RawData
from hypercorn.protocol.events import Body, Request
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.http_stream import ASGIHTTPState, HTTPStream
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.utils import UnexpectedMessageError, suppress_body
from quart.utils import encode_headers
from quart_trio.asgi import TrioASGIHTTPConnection

from p2preg.core.config import ConfigError

__all__ = [
    "CHECKED_VERSIONS",
    "SENDFILE_MAX_BYTES",
    "ZEROCOPY_SEND",
    "FileRegion",
    "ListeningConfig",
    "SendFile",
    "ZeroCopyBody",
    "ZeroCopyConnection",
    "check_versions",
    "install",
    "installed_versions",
]

log = logging.getLogger(__name__)

# The distributions whose internals this module was read against, and their
# versions; pyproject.toml and constraints.txt pin the same (a test holds them equal).
CHECKED_VERSIONS: Mapping[str, str] = {
    "hypercorn": "0.18.0",
    "quart": "0.22.0",
    "quart-trio": "0.12.0",
}
ZEROCOPY_SEND = "http.response.zerocopysend"
# Upper bound of one sendfile call: large enough that the per-call cost is small,
# small enough that a stream gives way to the others (and bounds a cold-cache
# stall). 1 MiB beat 4 MiB with 4 streams (docs/BENCHMARKS.md); nginx's
# sendfile_max_chunk is 2 MiB.
SENDFILE_MAX_BYTES = 1 << 20


# -- the gate ------------------------------------------------------------------------


def installed_versions() -> dict[str, str]:
    """The installed version of each distribution in `CHECKED_VERSIONS`."""
    versions = {}
    for name in CHECKED_VERSIONS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "(not installed)"
    return versions


def check_versions(installed: Mapping[str, str] | None = None) -> None:
    """Raise `ConfigError` (one line) unless every version is the one checked against."""
    installed = installed_versions() if installed is None else installed
    wrong = [name for name, want in CHECKED_VERSIONS.items() if installed.get(name) != want]
    if wrong:
        found = ", ".join(f"{name} {installed.get(name)}" for name in wrong)
        pins = ", ".join(f"{name}=={CHECKED_VERSIONS[name]}" for name in wrong)
        raise ConfigError(
            f"refusing to start: {found} installed, but the node's patches of hypercorn/Quart "
            f"internals (p2preg/node/hypercorn_internals.py) were checked against {pins} "
            "only; install that, or move the patches (docs/HYPERCORN.md)"
        )


_installed = False


def install() -> None:
    """Check the versions, then patch hypercorn once; `ConfigError` on an unchecked version.

    The check runs on every call, so a process that installed once still refuses
    a version it cannot vouch for.
    """
    global _installed
    check_versions()
    if _installed:
        return
    for owner, name, _, ours in _PATCHES:
        setattr(owner, name, ours)
    _installed = True


@dataclass(frozen=True)
class _Originals:
    """hypercorn's own methods, taken before `install()` replaces them."""

    stream_handle: Callable[[HTTPStream, Any], Awaitable[None]]
    stream_app_send: Callable[[HTTPStream, Any], Awaitable[None]]
    h11_send_event: Callable[[H11Protocol, Any], Awaitable[None]]
    tcp_protocol_send: Callable[[TCPServer, Any], Awaitable[None]]
    tcp_run: Callable[[TCPServer], Awaitable[None]]


_ORIGINAL = _Originals(
    stream_handle=HTTPStream.handle,
    stream_app_send=HTTPStream.app_send,
    h11_send_event=H11Protocol._send_h11_event,
    tcp_protocol_send=TCPServer.protocol_send,
    tcp_run=TCPServer.run,
)


# -- the listening sockets ------------------------------------------------------------


class ListeningConfig(Config):
    """A hypercorn config that keeps the listening sockets `serve` has it create.

    `hypercorn.trio.serve` takes no sockets of its own; its worker asks the
    config for them, so this is where the node gets hold of them to close them
    at the start of a graceful shutdown (p2preg/node/server.py).
    """

    listening: tuple[socket.socket, ...] = ()

    def create_sockets(self) -> Sockets:
        sockets = super().create_sockets()
        self.listening = (*sockets.secure_sockets, *sockets.insecure_sockets)
        return sockets


# -- zero-copy: the server side -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class FileRegion:
    """`count` bytes of the open file `fd` from `offset`; h11 only needs its len()."""

    fd: int
    offset: int
    count: int

    def __len__(self) -> int:
        return self.count

    @classmethod
    def from_message(cls, message: Mapping[str, Any]) -> FileRegion:
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


async def _stream_handle(self: HTTPStream, event: Any) -> None:
    await _ORIGINAL.stream_handle(self, event)
    # spawn_app only schedules the app task, which cannot run before this
    # task's next checkpoint: the scope is complete before the app reads it.
    if isinstance(event, Request) and not self.closed and _advertised(self):
        self.scope["extensions"][ZEROCOPY_SEND] = {}


async def _stream_app_send(self: HTTPStream, message: Any) -> None:
    if message is None or message.get("type") != ZEROCOPY_SEND:
        await _ORIGINAL.stream_app_send(self, message)
        return
    if self.state != ASGIHTTPState.RESPONSE or ZEROCOPY_SEND not in self.scope["extensions"]:
        raise UnexpectedMessageError(self.state, ZEROCOPY_SEND)
    region = FileRegion.from_message(message)
    if region.count and not suppress_body(self.scope["method"], int(self.response["status"])):
        await self.send(Body(stream_id=self.stream_id, data=region))  # type: ignore[arg-type]
    if not message.get("more_body", False):
        await self._send_closed()


async def _h11_send_event(self: H11Protocol, event: Any) -> None:
    data: object = getattr(event, "data", None)
    connection = self.connection
    if not (
        type(event) is h11.Data
        and isinstance(data, FileRegion)
        and isinstance(connection, h11.Connection)
    ):
        await _ORIGINAL.h11_send_event(self, event)
        return
    try:
        parts = connection.send_with_data_passthrough(event)
    except h11.LocalProtocolError:
        # As hypercorn's own method: the client broke the protocol first.
        if connection.their_state != h11.ERROR:
            raise
        return
    for part in parts or ():
        await self.send(RawData(data=part))


# -- the guard, and zero-copy's last layer ------------------------------------------


async def _tcp_protocol_send(self: TCPServer, event: Any) -> None:
    data: object = getattr(event, "data", None)
    stream: object = self.stream  # typed SSLStream by hypercorn, but either
    if (
        isinstance(event, RawData)
        and isinstance(data, FileRegion)
        and isinstance(stream, trio.SocketStream)  # as _advertised() made sure
    ):
        async with self.send_lock:
            try:
                await send_region(stream, data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await self.protocol.handle(Closed())
        return
    try:
        await _ORIGINAL.tcp_protocol_send(self, event)
    except trio.BusyResourceError:
        # Bug 1 (docs/HYPERCORN.md): `_close` shuts the socket down without the
        # send lock, so a send racing it finds the stream busy. The connection
        # is being closed under us: handled as hypercorn handles a broken one.
        if not isinstance(event, RawData):
            raise
        await self.protocol.handle(Closed())


async def _tcp_run(self: TCPServer) -> None:
    try:
        await _ORIGINAL.tcp_run(self)
    except Exception:
        # Bug 2 (docs/HYPERCORN.md): trio.serve_listeners ends the whole server
        # when one connection's handler raises. Cancellation is a BaseException
        # and still ends the server.
        log.exception("a connection's handler failed; the server goes on")


# (class, method, hypercorn's own, ours): everything `install()` replaces.
_PATCHES: tuple[tuple[type, str, object, object], ...] = (
    (HTTPStream, "handle", _ORIGINAL.stream_handle, _stream_handle),
    (HTTPStream, "app_send", _ORIGINAL.stream_app_send, _stream_app_send),
    (H11Protocol, "_send_h11_event", _ORIGINAL.h11_send_event, _h11_send_event),
    (TCPServer, "protocol_send", _ORIGINAL.tcp_protocol_send, _tcp_protocol_send),
    (TCPServer, "run", _ORIGINAL.tcp_run, _tcp_run),
)


# -- zero-copy: the Quart side ------------------------------------------------------

# `send_file(file, offset, count)`: the rest of the response body is `count`
# bytes of the open `file` from `offset`; the response ends with them.
SendFile = Callable[[BinaryIO, int, int], Awaitable[None]]


@runtime_checkable
class ZeroCopyBody(Protocol):
    """A Quart response body that can hand the server an open file instead of bytes."""

    async def __aenter__(self) -> object: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def send_zerocopy(self, send_file: SendFile) -> None: ...


class ZeroCopyConnection(TrioASGIHTTPConnection):
    """quart-trio's ASGI HTTP connection, sending a `ZeroCopyBody` zero-copy where offered.

    Set as the app's `asgi_http_class`. Other bodies, and every body where the
    scope does not offer the extension (HTTP/2, TLS, another server), go
    through Quart's own `_send_response`.
    """

    async def _send_response(self, send: Any, response: Any) -> None:
        body = getattr(response, "response", None)
        extensions = self.scope.get("extensions") or {}
        if not isinstance(body, ZeroCopyBody) or ZEROCOPY_SEND not in extensions:
            await super()._send_response(send, response)
            return
        await send(
            {
                "type": "http.response.start",
                "status": response.status_code,
                "headers": encode_headers(response.headers),
            }
        )

        async def send_file(file: BinaryIO, offset: int, count: int) -> None:
            await send(
                {
                    "type": ZEROCOPY_SEND,
                    "file": file,
                    "offset": offset,
                    "count": count,
                    "more_body": False,
                }
            )

        async with body:
            await body.send_zerocopy(send_file)
