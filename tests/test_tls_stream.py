"""The tracker's server-side TLS stream (tracker/tls_stream.py) against a real TLS client.

A loopback TCP connection: the server end is a `TLSStream` with the tracker's own
server context (mutual TLS, from a cluster CA's tls_dir), the client end a
stdlib TLS socket in a thread showing a node's certificate. What a listener
relies on: the handshake and the certificate it verified, records both ways
(big ones split across many reads), the client's end with and without
close_notify, and a handshake that fails naming why (tls_gate reads it).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from harness.tlscerts import ClusterCA, client_ssl_context
from p2preg.core.tls import load_tls_dir, peer_identity, server_context
from tracker.tls_gate import handshake_refusal
from tracker.tls_stream import TLSStream

BIG = bytes(range(256)) * 1024  # 256 KiB: many records, many reads


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of a loopback TCP connection (the stream sets TCP_NODELAY)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        theirs = socket.create_connection(listener.getsockname())
        ours, _ = listener.accept()
    ours.setblocking(False)
    return ours, theirs


@pytest.fixture
def contexts(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = ClusterCA.make("test")
    tracker = ca.tls_dir(tmp_path / "tracker", "tracker", "t1", ips=["127.0.0.1"])
    node = ca.tls_dir(tmp_path / "node", "node", "n1")
    return server_context(load_tls_dir(tracker, role="tracker")), client_ssl_context(
        node, check_hostname=False
    )


async def serve_one(
    server_ctx: ssl.SSLContext, client: Callable[[socket.socket], object]
) -> tuple[TLSStream, object]:
    """Run `client` on the far end of a socket pair in a thread; the server's stream
    after the handshake, and what the client returned."""
    ours, theirs = tcp_pair()
    stream = TLSStream(trio.socket.from_stdlib_socket(ours), server_ctx)
    got: list[object] = []
    async with trio.open_nursery() as nursery:

        async def far() -> None:
            got.append(await trio.to_thread.run_sync(client, theirs))

        nursery.start_soon(far)
        await stream.do_handshake()
        assert await stream.receive_some() == b"ping"
        await stream.send_all(BIG)
        data = b""
        while len(data) < len(BIG):
            chunk = await stream.receive_some(10_000)
            assert chunk, "the client's bytes ended early"
            data += chunk
        assert data == BIG
        assert await stream.receive_some() == b""
        await stream.aclose()
    return stream, got[0]


def exchange(ctx: ssl.SSLContext, *, notify: bool) -> Callable[[socket.socket], object]:
    def client(raw: socket.socket) -> object:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"ping")
            data = b""
            while len(data) < len(BIG):
                data += tls.recv(65536)
            tls.sendall(BIG)
            if notify:  # close_notify; the server closes without one of its own
                with contextlib.suppress(ssl.SSLEOFError):
                    tls.unwrap().close()
            return data == BIG

    return client


@pytest.mark.parametrize("notify", [True, False])
async def test_records_both_ways_and_the_end_with_or_without_close_notify(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext], notify: bool
) -> None:
    server_ctx, client_ctx = contexts
    stream, whole = await serve_one(server_ctx, exchange(client_ctx, notify=notify))
    assert whole is True
    assert peer_identity(stream.ssl_object).name == "n1"


async def test_a_plain_text_request_fails_the_handshake_naming_it(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server_ctx, _ = contexts
    ours, theirs = tcp_pair()
    stream = TLSStream(trio.socket.from_stdlib_socket(ours), server_ctx)
    theirs.sendall(b"GET /announce HTTP/1.1\r\nHost: t\r\n\r\n")
    with pytest.raises(trio.BrokenResourceError) as failed:
        await stream.do_handshake()
    assert handshake_refusal(failed.value.__cause__)[0] == "not_tls"
    await stream.aclose()
    theirs.close()


async def test_a_client_without_a_certificate_is_refused_in_the_handshake(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext], tmp_path: Path
) -> None:
    server_ctx, _ = contexts
    anonymous = ssl.create_default_context(cafile=tmp_path / "tracker" / "ca.crt")
    anonymous.check_hostname = False

    def client(raw: socket.socket) -> object:
        try:
            with anonymous.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                return tls.recv(1)  # TLS 1.3: the refusal comes after the client's Finished
        except (ssl.SSLError, OSError) as e:
            return e
        finally:
            raw.close()

    ours, theirs = tcp_pair()
    stream = TLSStream(trio.socket.from_stdlib_socket(ours), server_ctx)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, client, theirs)
        with pytest.raises(trio.BrokenResourceError) as failed:
            await stream.do_handshake()
        await stream.aclose()
    assert handshake_refusal(failed.value.__cause__)[0] == "no_certificate"
