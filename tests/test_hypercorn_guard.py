"""The guard in p2preg.node.hypercorn_internals: one hostile connection must not stop the server.

A quart-trio app on hypercorn's trio server, in process on port 0, is sent the
request tests/test_fuzz_facade.py found: a GET whose chunked body is malformed,
which the app answers at once. Without the guard, hypercorn 0.18 let a
`BusyResourceError` out of that connection and the whole server stopped within
a few such requests (bugs 1 and 2 of docs/HYPERCORN.md).
"""

from __future__ import annotations

import socket

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart_trio import QuartTrio

from p2preg.node import hypercorn_internals
from tests.fixtures.rawhttp import exchange

BAD_CHUNK = b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\n"


async def test_a_malformed_chunked_body_does_not_stop_the_server() -> None:
    hypercorn_internals.install()
    app = QuartTrio(__name__)

    @app.route("/")
    async def index() -> str:
        return "ok"

    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(serve, app, config)
        port = int(binds[0].rsplit(":", 1)[1])

        def hammer() -> list[int | None]:
            statuses = []
            for _ in range(30):
                exchange("127.0.0.1", port, BAD_CHUNK, half_close=True, timeout_s=10)
            with socket.create_connection(("127.0.0.1", port), timeout=10):
                pass  # still accepting
            request = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            statuses.append(exchange("127.0.0.1", port, request).status)
            return statuses

        assert await trio.to_thread.run_sync(hammer) == [200]
        nursery.cancel_scope.cancel()
