"""The slow-peer watch (p2preg/node/slowpeers.py) over samples it is handed.

A peer that delivers, but whose queued requests would take seconds at its rate
while another peer is several times faster, is dropped (once per cool-down, a
bounded number of times per download) and, if we had dialled it, connected
again later. A peer that sends nothing, one that chokes us, one whose queue is
short, and one among equals are never dropped. A peer's rate is what it sent
since the last look. A drop names one connection (tests/test_peersockets.py
closes it): a peer sharing the address keeps its own.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from p2preg.node.slowpeers import (
    COOLDOWN_S,
    MAX_DROPS,
    RECONNECT_S,
    SETTLE_S,
    Drop,
    PeerRate,
    SlowPeerWatch,
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


def fast_at(now: float) -> PeerRate:
    """`fast()` at `now`, having sent at its rate since 0."""
    return dataclasses.replace(fast(), received=fast().received + int(fast().rate * now))


def look(watch: SlowPeerWatch, samples: list[PeerRate], now: float) -> Drop | None:
    """Show `samples` at `now`, each peer having sent at its `rate` since 0."""
    return watch.observe(
        [dataclasses.replace(s, received=s.received + int(s.rate * now)) for s in samples], now
    )


def settled(watch: SlowPeerWatch, samples: list[PeerRate]) -> float:
    """Show `samples` once at 0, so every peer in them has been connected SETTLE_S."""
    assert look(watch, samples, 0.0) is None
    return SETTLE_S


def test_a_slowed_peer_holding_seconds_of_requests_is_dropped() -> None:
    watch = SlowPeerWatch()
    now = settled(watch, [slowed(), fast()])
    drop = look(watch, [slowed(), fast()], now)
    assert drop is not None and drop.endpoint == SLOW
    assert drop.hold_s == pytest.approx(763 * BLOCK_BYTES / (64 * KiB))
    assert drop.fastest == 50 * MiB
    assert watch.drops == [drop]


def test_a_peer_that_sent_nothing_is_left_to_the_stall_reports() -> None:
    # Whatever its rate reads, less than a block over the connection is no delivery:
    # stallwatch.py reports such a peer, and this watch must not hide it by a drop.
    watch = SlowPeerWatch()
    silent = PeerRate(SLOW, rate=1, queued=763, received=BLOCK_BYTES - 1)
    assert watch.observe([silent, fast_at(0.0)], 0.0) is None
    assert watch.observe([silent, fast_at(SETTLE_S)], SETTLE_S) is None


def test_a_peer_that_delivered_then_stopped_is_judged_on_a_block_since() -> None:
    # libtorrent's estimate still reads 2 MiB/s; nothing came since the last look, so
    # it sends at most a block per window: its 763 requests would take minutes.
    watch = SlowPeerWatch()
    stopped = PeerRate(SLOW, rate=2 * MiB, queued=763, received=8 * MiB)
    assert watch.observe([stopped, fast_at(0.0)], 0.0) is None
    drop = watch.observe([stopped, fast_at(SETTLE_S)], SETTLE_S)
    assert drop is not None and drop.endpoint == SLOW
    assert drop.rate == int(BLOCK_BYTES / SETTLE_S)


def test_a_peer_that_slowed_is_judged_by_what_it_sent_lately_not_the_estimate() -> None:
    # libtorrent's average lags by seconds: a peer down from 4 MiB/s to 64 KiB/s still
    # read 0.6-0.9 MB/s, so its 32 requests looked like 0.6 s of work, not 8 s.
    watch = SlowPeerWatch()
    lagging = PeerRate(SLOW, rate=800 * KiB, queued=32, received=12 * MiB)
    assert watch.observe([lagging, fast_at(0.0)], 0.0) is None
    # 64 KiB/s over the 0.5 s since the last look.
    lately = dataclasses.replace(lagging, received=lagging.received + 32 * KiB)
    assert watch.observe([lagging, fast_at(SETTLE_S - 0.5)], SETTLE_S - 0.5) is None
    drop = watch.observe([lately, fast_at(SETTLE_S)], SETTLE_S)
    assert drop is not None and drop.endpoint == SLOW
    assert drop.rate == 64 * KiB
    assert drop.hold_s == pytest.approx(32 * BLOCK_BYTES / (64 * KiB))


def test_a_peer_that_sped_up_is_not_dropped_on_a_lagging_estimate() -> None:
    watch = SlowPeerWatch()
    waking = PeerRate(SLOW, rate=64 * KiB, queued=763, received=8 * MiB)
    assert watch.observe([waking, fast_at(0.0)], 0.0) is None
    sped = dataclasses.replace(waking, received=waking.received + 20 * MiB)  # 10 MiB/s since
    assert watch.observe([sped, fast_at(SETTLE_S)], SETTLE_S) is None


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
    assert look(watch, [slow, other], now) is None


def test_a_peer_alone_is_never_dropped() -> None:
    watch = SlowPeerWatch()
    now = settled(watch, [slowed()])
    assert look(watch, [slowed()], now) is None


def test_a_faster_peer_that_chokes_us_does_not_count() -> None:
    watch = SlowPeerWatch()
    choking = PeerRate(FAST, rate=50 * MiB, queued=0, received=100 * MiB, unchoked=False)
    now = settled(watch, [slowed(), choking])
    assert look(watch, [slowed(), choking], now) is None


def test_a_new_connection_settles_first() -> None:
    # Just connected: its rate estimate lags the queue libtorrent is growing for it.
    watch = SlowPeerWatch()
    assert look(watch, [slowed(), fast()], 0.0) is None
    assert look(watch, [slowed(), fast()], SETTLE_S / 2) is None
    assert look(watch, [slowed(), fast()], SETTLE_S) is not None


def test_a_peer_sharing_its_address_with_a_fast_one_is_dropped_alone() -> None:
    # Nodes behind one NAT: the drop names the slow connection, not the address.
    watch = SlowPeerWatch()
    slow = PeerRate(SLOW, rate=64 * KiB, queued=763, received=8 * MiB, local=("10.0.0.1", 40001))
    neighbour = PeerRate((SLOW[0], 7000), rate=50 * MiB, queued=200, received=100 * MiB,
                         local=("10.0.0.1", 40002))  # fmt: skip
    now = settled(watch, [slow, neighbour])
    drop = look(watch, [slow, neighbour], now)
    assert drop is not None
    assert (drop.endpoint, drop.local) == (SLOW, ("10.0.0.1", 40001))


def test_the_peer_holding_longest_goes_first() -> None:
    watch = SlowPeerWatch()
    slower = PeerRate(FAST2, rate=32 * KiB, queued=763, received=8 * MiB)
    samples = [slowed(), slower, fast()]
    now = settled(watch, samples)
    drop = look(watch, samples, now)
    assert drop is not None and drop.endpoint == FAST2


def test_drops_are_spaced_and_bounded() -> None:
    watch = SlowPeerWatch()
    now = settled(watch, [slowed(), fast()])
    made = []
    for step in range(200):  # 100 s of samples every 0.5 s: the peer keeps coming back slow
        t = now + step * 0.5
        if look(watch, [slowed(), fast()], t) is not None:
            made.append(t)
    assert len(made) == MAX_DROPS
    assert all(b - a >= COOLDOWN_S for a, b in itertools.pairwise(made))


def test_a_dropped_peer_we_dialled_is_connected_again_once() -> None:
    watch = SlowPeerWatch()
    now = settled(watch, [slowed(), fast()])
    assert look(watch, [slowed(), fast()], now) is not None
    assert watch.reconnect_due(now + RECONNECT_S / 2) == []
    assert watch.reconnect_due(now + RECONNECT_S) == [SLOW]
    assert watch.reconnect_due(now + 10 * RECONNECT_S) == []


def test_a_dropped_peer_that_dialled_us_is_not_dialled_back() -> None:
    # Its endpoint shows a port of its own choosing, not where it listens.
    watch = SlowPeerWatch()
    incoming = PeerRate(SLOW, rate=64 * KiB, queued=763, received=8 * MiB, ours=False)
    now = settled(watch, [incoming, fast()])
    assert look(watch, [incoming, fast()], now) is not None
    assert watch.reconnect_due(now + 10 * RECONNECT_S) == []


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        SlowPeerWatch(hold_s=0)
    with pytest.raises(ValueError):
        SlowPeerWatch(max_drops=-1)


def test_a_drop_that_could_not_be_made_counts_for_nothing() -> None:
    # Its connection was gone before the node could close it: no drop spent, no
    # cool-down, nothing to dial again.
    watch = SlowPeerWatch(max_drops=1)
    now = settled(watch, [slowed(), fast()])
    drop = look(watch, [slowed(), fast()], now)
    assert drop is not None
    watch.undo(drop)
    assert watch.drops == [] and watch.reconnect_due(now + RECONNECT_S) == []
    assert look(watch, [slowed(), fast()], now + 0.5) is not None  # judged again at once
