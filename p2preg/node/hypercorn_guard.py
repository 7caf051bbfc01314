"""Keep one hostile connection from stopping a hypercorn (trio) server.

Found by tests/test_fuzz_facade.py against hypercorn 0.18: a request whose body
turns out malformed (an illegal chunk header) while the app is already
answering makes hypercorn send its 400 on a socket that another task is
shutting down (`TCPServer._close` calls `send_eof` without the send lock).
trio raises `BusyResourceError`; `TCPServer.run` lets it out, and
`trio.serve_listeners` — by design — ends the whole server when one
connection's handler raises. A handful of such requests stopped a node; the
tracker hands connections to the same `TCPServer`.

`install()` patches two methods, once, and changes nothing for well-behaved
connections:

- `TCPServer.protocol_send`: `BusyResourceError` while sending means the
  connection is being closed under us, so it is handled the way hypercorn
  handles a broken connection;
- `TCPServer.run`: anything else escaping one connection's handler is logged
  with its traceback and ends that connection only.

Both the node and the tracker call `install()` before they serve. This module
must not change what hypercorn sends.
"""

from __future__ import annotations

import logging
from typing import Any

import trio
from hypercorn.events import Closed, RawData
from hypercorn.trio.tcp_server import TCPServer

log = logging.getLogger(__name__)

_installed = False


def install() -> None:
    """Patch hypercorn's trio `TCPServer` once (idempotent)."""
    global _installed
    if _installed:
        return
    protocol_send = TCPServer.protocol_send
    run = TCPServer.run

    async def guarded_send(self: TCPServer, event: Any) -> None:
        try:
            await protocol_send(self, event)
        except trio.BusyResourceError:
            if not isinstance(event, RawData):
                raise
            await self.protocol.handle(Closed())

    async def guarded_run(self: TCPServer) -> None:
        try:
            await run(self)
        except Exception:
            # Cancellation is a BaseException and still ends the server.
            log.exception("a connection's handler failed; the server goes on")

    TCPServer.protocol_send = guarded_send  # type: ignore[method-assign]
    TCPServer.run = guarded_run  # type: ignore[method-assign]
    _installed = True
