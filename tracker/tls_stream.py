"""Server-side TLS on one of the tracker's connections: an `SSLObject` over a trio socket.

Why not `trio.SSLStream` over a `SocketStream`: a kept-alive request reads its
head, reads its body and writes its answer, and each pass went through
`SSLStream`'s lock, conflict detector and retry loop, then `SocketStream`'s
own, for an answer of a few hundred bytes: about a tenth of a lease request
at a saturated tracker (docs/BENCHMARKS.md, "A TLS stream of the tracker's
own"). This one does what the tracker's connections need and nothing else:
the handshake (an `ssl.SSLError` comes out as `trio.BrokenResourceError` from
it, as `SSLStream` raised it, so tls_gate.handshake_refusal reads the cause),
then records read and written straight through memory BIOs. Like `SSLStream`
with `https_compatible`, a client that closes without close_notify has
merely closed (HTTP clients do), and closing sends none. One reader and one
writer at a time: the listener reads a request, answers it, and reads only
through its hang-up watch while the answer is being made. It must not speak
HTTP or judge certificates (tls_gate does).
"""

from __future__ import annotations

import contextlib
import socket
import ssl

import trio

RECEIVE_BYTES = 64 * 1024


class TLSStream(trio.abc.Stream):
    def __init__(self, sock: trio.socket.SocketType, context: ssl.SSLContext) -> None:
        self._sock = sock
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.ssl_object = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        # Answers are small and go out whole: no Nagle delay behind an unacked segment.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def do_handshake(self) -> None:
        while True:
            try:
                self.ssl_object.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    self._incoming.write_eof()
            except ssl.SSLError as e:
                await self._flush_quietly()  # the alert, if any, tells the client why
                raise trio.BrokenResourceError(str(e)) from e
        await self._flush()  # the last flight (and TLS 1.3's session tickets)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Up to `max_bytes` of plaintext; b"" once the client closed (with or
        without close_notify)."""
        while True:
            try:
                data = self.ssl_object.read(max_bytes or RECEIVE_BYTES)
            except ssl.SSLWantReadError:
                await self._flush()  # what reading made OpenSSL say (a key update)
                if not await self._fill():
                    return b""
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""
            except ssl.SSLError as e:
                raise trio.BrokenResourceError(str(e)) from e
            await self._flush()
            return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            self.ssl_object.write(data)
        except ssl.SSLError as e:
            raise trio.BrokenResourceError(str(e)) from e
        await self._flush()

    async def wait_send_all_might_not_block(self) -> None:
        await self._sock.wait_writable()

    async def aclose(self) -> None:
        """Close the socket; no close_notify (see the module's docstring)."""
        self._sock.close()
        await trio.lowlevel.checkpoint()

    async def _fill(self) -> bool:
        """Bytes from the socket into the TLS object; False at the end of the stream."""
        try:
            data = await self._sock.recv(RECEIVE_BYTES)
        except OSError as e:
            raise trio.BrokenResourceError(str(e)) from e
        if not data:
            return False
        self._incoming.write(data)
        return True

    async def _flush(self) -> None:
        """Send what the TLS object has for the client."""
        view = memoryview(self._outgoing.read())
        try:
            while view:
                sent = await self._sock.send(view)
                view = view[sent:]
        except OSError as e:
            raise trio.BrokenResourceError(str(e)) from e

    async def _flush_quietly(self) -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            await self._flush()
