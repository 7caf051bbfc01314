"""The slow-peer watch (p2preg/node/slowpeers.py) over samples it is handed.

A peer that delivers, but whose queued requests would take seconds at its rate
while another peer is several times faster, is dropped (once per cool-down, a
bounded number of times per download) and, if we had dialled it, connected
again later. A peer that sends nothing, one that chokes us, one whose queue is
short, and one among equals are never dropped. A drop closes one connection,
found among the process's sockets by its two endpoints: a peer sharing the
address keeps its own.
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from p2preg.node.slowpeers import (
    COOLDOWN_S,
    MAX_DROPS,
    RECONNECT_S,
    SETTLE_S,
    PeerRate,
    SlowPeerWatch,
    shut_connection,
)
from p2preg.node.stallwatch import BLOCK_BYTES

KiB = 1024
MiB = 1024 * KiB
SLOW = ("10.0.0.2", 6882)
FAST = ("10.0.0.3", 6882)
FAST2 = ("10.0.0.4", 6882)


def slowed(received: int = 8 * MiB, queued: int = 763, rate: int = 64 * KiB) -> PeerRate:
    """The peer of docs/SWARM.md: it was fast, holds 763 requests, now sends 64 KiB/s."""
    return PeerRate(SLOW, rate=rate, queued=queued, received=received)


def fast(endpoint: tuple[str, int] = FAST, rate: int = 50 * MiB) -> PeerRate:
    return PeerRate(endpoint, rate=rate, queued=200, received=100 * MiB)


def settled(watch: SlowPeerWatch, samples: list[PeerRate]) -> float:
    """Show `samples` once at 0, so every peer in them has been connected SETTLE_S."""
    assert watch.observe(samples, 0.0) is None
    return SETTLE_S


def test_a_slowed_peer_holding_seconds_of_requests_is_dropped() -> None:
    watch = SlowPeerWatch()
    now = settled(watch, [slowed(), fast()])
    drop = watch.observe([slowed(), fast()], now)
    assert drop is not None and drop.endpoint == SLOW
    assert drop.hold_s == pytest.approx(763 * BLOCK_BYTES / (64 * KiB))
    assert drop.fastest == 50 * MiB
    assert watch.drops == [drop]


def test_a_peer_that_sent_nothing_is_left_to_the_stall_reports() -> None:
    # Whatever its rate reads, less than a block over the connection is no delivery:
    # stallwatch.py reports such a peer, and this watch must not hide it by a drop.
    watch = SlowPeerWatch()
    silent = PeerRate(SLOW, rate=1, queued=763, received=BLOCK_BYTES - 1)
    now = settled(watch, [silent, fast()])
    assert watch.observe([silent, fast()], now) is None
    zero_rate = slowed(rate=0)
    assert watch.observe([zero_rate, fast()], now + 1) is None


@pytest.mark.parametrize(
    ("slow", "other"),
    [
        # Its queue would empty in under HOLD_S at its rate (a peer slow from the start).
        (slowed(queued=8), fast()),
        # Nobody is FASTER times as fast: the swarm is just slow.
        (slowed(), fast(rate=200 * KiB)),
        # It chokes us: libtorrent frees its requests itself.
        (PeerRate(SLOW, rate=64 * KiB, queued=763, received=8 * MiB, unchoked=False), fast()),
    ],
)
def test_no_drop_without_a_held_queue_a_faster_peer_and_an_unchoke(
    slow: PeerRate, other: PeerRate
) -> None:
    watch = SlowPeerWatch()
    now = settled(watch, [slow, other])
    assert watch.observe([slow, other], now) is None


def test_a_peer_alone_is_never_dropped() -> None:
    watch = SlowPeerWatch()
    now = settled(watch, [slowed()])
    assert watch.observe([slowed()], now) is None


def test_a_faster_peer_that_chokes_us_does_not_count() -> None:
    watch = SlowPeerWatch()
    choking = PeerRate(FAST, rate=50 * MiB, queued=0, received=100 * MiB, unchoked=False)
    now = settled(watch, [slowed(), choking])
    assert watch.observe([slowed(), choking], now) is None


def test_a_new_connection_settles_first() -> None:
    # Just connected: its rate estimate lags the queue libtorrent is growing for it.
    watch = SlowPeerWatch()
    assert watch.observe([slowed(), fast()], 0.0) is None
    assert watch.observe([slowed(), fast()], SETTLE_S / 2) is None
    assert watch.observe([slowed(), fast()], SETTLE_S) is not None


def test_a_peer_sharing_its_address_with_a_fast_one_is_dropped_alone() -> None:
    # Nodes behind one NAT: the drop names the slow connection, not the address.
    watch = SlowPeerWatch()
    slow = PeerRate(SLOW, rate=64 * KiB, queued=763, received=8 * MiB, local=("10.0.0.1", 40001))
    neighbour = PeerRate((SLOW[0], 7000), rate=50 * MiB, queued=200, received=100 * MiB,
                         local=("10.0.0.1", 40002))  # fmt: skip
    now = settled(watch, [slow, neighbour])
    drop = watch.observe([slow, neighbour], now)
    assert drop is not None
    assert (drop.endpoint, drop.local) == (SLOW, ("10.0.0.1", 40001))


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


def test_the_peer_holding_longest_goes_first() -> None:
    watch = SlowPeerWatch()
    slower = PeerRate(FAST2, rate=32 * KiB, queued=763, received=8 * MiB)
    samples = [slowed(), slower, fast()]
    now = settled(watch, samples)
    drop = watch.observe(samples, now)
    assert drop is not None and drop.endpoint == FAST2


def test_drops_are_spaced_and_bounded() -> None:
    watch = SlowPeerWatch()
    now = settled(watch, [slowed(), fast()])
    made = []
    for step in range(200):  # 100 s of samples every 0.5 s: the peer keeps coming back slow
        t = now + step * 0.5
        if watch.observe([slowed(), fast()], t) is not None:
            made.append(t)
    assert len(made) == MAX_DROPS
    assert all(b - a >= COOLDOWN_S for a, b in itertools.pairwise(made))


def test_a_dropped_peer_we_dialled_is_connected_again_once() -> None:
    watch = SlowPeerWatch()
    now = settled(watch, [slowed(), fast()])
    assert watch.observe([slowed(), fast()], now) is not None
    assert watch.reconnect_due(now + RECONNECT_S / 2) == []
    assert watch.reconnect_due(now + RECONNECT_S) == [SLOW]
    assert watch.reconnect_due(now + 10 * RECONNECT_S) == []


def test_a_dropped_peer_that_dialled_us_is_not_dialled_back() -> None:
    # Its endpoint shows a port of its own choosing, not where it listens.
    watch = SlowPeerWatch()
    incoming = PeerRate(SLOW, rate=64 * KiB, queued=763, received=8 * MiB, ours=False)
    now = settled(watch, [incoming, fast()])
    assert watch.observe([incoming, fast()], now) is not None
    assert watch.reconnect_due(now + 10 * RECONNECT_S) == []


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        SlowPeerWatch(hold_s=0)
    with pytest.raises(ValueError):
        SlowPeerWatch(max_drops=-1)
