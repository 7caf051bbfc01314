"""The node's hands on its own sockets (p2preg/node/peersockets.py), on real TCP sockets.

`shut_connection` shuts exactly the connection with the two endpoints it is
given, through a duplicate descriptor, and leaves its descriptor to its owner;
`NoDelay.sweep` turns Nagle off on every TCP socket of the process once,
listeners included (what they accept inherits it), and on a socket not yet
connected, as libtorrent's outgoing ones are when it says they started.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from p2preg.node import peersockets
from p2preg.node.peersockets import NoDelay, shut_connection


def nodelay(sock: socket.socket) -> bool:
    return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


@pytest.fixture
def connections() -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    """Two TCP connections on 127.0.0.1 to one listener: (our end, the peer's end) each."""
    with ExitStack() as stack:
        listener = stack.enter_context(socket.create_server(("127.0.0.1", 0)))
        pairs = []
        for _ in range(2):
            ours = stack.enter_context(socket.create_connection(listener.getsockname()))
            theirs = stack.enter_context(listener.accept()[0])
            theirs.settimeout(5)
            pairs.append((ours, theirs))
        yield pairs


def test_shut_connection_closes_that_connection_and_no_other(
    connections: list[tuple[socket.socket, socket.socket]],
) -> None:
    (ours, theirs), (other, other_theirs) = connections
    # The same remote address and port on both: only our ends tell them apart.
    assert ours.getpeername() == other.getpeername()
    assert shut_connection(ours.getsockname(), ours.getpeername())
    assert theirs.recv(1) == b""  # the peer reads the end of the stream
    with pytest.raises(OSError):
        ours.send(b"x")
    other.sendall(b"still here")
    assert other_theirs.recv(10) == b"still here"
    assert other.fileno() >= 0 and ours.fileno() >= 0  # shut, not closed: the owner closes


def test_shut_connection_without_such_a_connection_touches_nothing(
    connections: list[tuple[socket.socket, socket.socket]],
) -> None:
    (ours, theirs), _ = connections
    host, port = ours.getsockname()
    assert not shut_connection((host, port), ("127.0.0.1", 1))
    # An IPv4 address written as libtorrent may show it, mapped into IPv6, still matches.
    ours.sendall(b"ok")
    assert theirs.recv(2) == b"ok"
    assert shut_connection(("::ffff:" + host, port), ours.getpeername())
    assert theirs.recv(1) == b""


def test_a_sweep_turns_nagle_off_on_every_tcp_socket_once(
    connections: list[tuple[socket.socket, socket.socket]],
) -> None:
    with ExitStack() as stack:
        listener = stack.enter_context(socket.create_server(("127.0.0.1", 0)))
        unconnected = stack.enter_context(socket.socket())
        udp = stack.enter_context(socket.socket(type=socket.SOCK_DGRAM))
        tcp = [listener, unconnected, *(end for pair in connections for end in pair)]
        assert not any(nodelay(s) for s in tcp)
        sweeper = NoDelay()
        assert sweeper.sweep() >= len(tcp)
        assert all(nodelay(s) for s in tcp)
        assert sweeper.sweep() == 0  # each once
        # What the listener accepts from now on comes with it.
        peer = stack.enter_context(socket.create_connection(listener.getsockname()))
        accepted = stack.enter_context(listener.accept()[0])
        assert nodelay(accepted)
        assert sweeper.sweep() == 2  # the new connection's two ends
        assert nodelay(peer)
        # Still usable, and still their owners' to close.
        (ours, theirs), _ = connections
        ours.sendall(b"ok")
        assert theirs.recv(2) == b"ok"
        assert udp.fileno() >= 0


def test_a_descriptor_reused_for_a_file_meanwhile_is_left_alone_and_nothing_leaks(
    tmp_path: Path,
) -> None:
    # Between the listing and the look, the number may have been reused for a file.
    with (tmp_path / "f").open("wb") as f:
        before = len(os.listdir("/proc/self/fd"))
        assert peersockets._tcp(str(f.fileno())) is None
        assert len(os.listdir("/proc/self/fd")) == before
        f.write(b"still ours")
    assert (tmp_path / "f").read_bytes() == b"still ours"
