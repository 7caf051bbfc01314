"""The node's stall detector (p2preg/node/stallwatch.py) over a clock it is handed.

A peer that unchoked us and holds our requests but sends no block for `stall_s`
is reported once; a slow peer that does deliver a block per `stall_s`, a peer
that chokes us, and a peer gone from the samples are never reported.
"""

from __future__ import annotations

import pytest

from p2preg.node.stallwatch import BLOCK_BYTES, PeerSample, StallWatch, compact

SILENT = ("10.0.0.66", 6882)
SLOW = ("10.0.0.2", 6882)
CHOKING = ("10.0.0.3", 6882)


def test_a_silent_peer_is_reported_once_a_slow_one_that_delivers_never() -> None:
    watch = StallWatch(stall_s=10)
    reported: list[tuple[str, int]] = []
    slow_bytes = 0
    for second in range(0, 120):
        # The slow peer sends one block every 9 s: slower than anyone would like.
        if second % 9 == 8:
            slow_bytes += BLOCK_BYTES
        samples = [
            PeerSample(SILENT, asked=True, received=100),  # a few bytes, never a block
            PeerSample(SLOW, asked=True, received=slow_bytes),
            PeerSample(CHOKING, asked=False, received=0),
        ]
        reported += watch.observe(samples, float(second))
    assert reported == [SILENT]


def test_stalling_starts_when_asked_and_a_block_resets_it() -> None:
    watch = StallWatch(stall_s=5)
    assert watch.observe([PeerSample(SILENT, False, 0)], 0) == []
    assert watch.observe([PeerSample(SILENT, True, 0)], 100) == []  # asked from now on
    assert watch.observe([PeerSample(SILENT, True, BLOCK_BYTES - 1)], 104) == []
    assert watch.observe([PeerSample(SILENT, True, BLOCK_BYTES)], 104.5) == []  # a block
    assert watch.observe([PeerSample(SILENT, True, BLOCK_BYTES)], 109) == []
    assert watch.observe([PeerSample(SILENT, True, BLOCK_BYTES)], 109.5) == [SILENT]
    # Choked then asked again: a new wait, but a peer is reported once per watch.
    watch.observe([PeerSample(SILENT, False, BLOCK_BYTES)], 110)
    watch.observe([PeerSample(SILENT, True, BLOCK_BYTES)], 111)
    assert watch.observe([PeerSample(SILENT, True, BLOCK_BYTES)], 200) == []


def test_a_peer_that_left_is_forgotten() -> None:
    watch = StallWatch(stall_s=5)
    watch.observe([PeerSample(SILENT, True, 0)], 0)
    watch.observe([], 3)  # disconnected: its wait is over
    watch.observe([PeerSample(SILENT, True, 0)], 4)
    assert watch.observe([PeerSample(SILENT, True, 0)], 8) == []
    assert watch.observe([PeerSample(SILENT, True, 0)], 9) == [SILENT]
    with pytest.raises(ValueError):
        StallWatch(0)


def test_compact_entries_match_the_trackers() -> None:
    assert compact(("127.0.0.1", 6881)) == bytes([127, 0, 0, 1, 0x1A, 0xE1])
    assert compact(("::ffff:10.0.0.2", 1)) == bytes([10, 0, 0, 2, 0, 1])
    assert compact(("::1", 2)) == bytes(15) + b"\x01\x00\x02"


def test_every_peer_stalls_only_while_each_is_a_stalling_one() -> None:
    watch = StallWatch(stall_s=5)
    assert not watch.every_peer_stalls()  # no peers yet: the swarm may still find some
    watch.observe([PeerSample(SILENT, True, 0), PeerSample(CHOKING, False, 0)], 0)
    watch.observe([PeerSample(SILENT, True, 0), PeerSample(CHOKING, False, 0)], 6)
    assert not watch.every_peer_stalls()  # the choking peer may still unchoke us
    assert watch.observe([PeerSample(SILENT, True, 0)], 7) == []  # reported already
    assert watch.every_peer_stalls()  # the choking one left: only the silent one is left
    watch.observe([PeerSample(SILENT, True, BLOCK_BYTES)], 8)
    assert not watch.every_peer_stalls()  # a block came: it delivers after all
    watch.observe([PeerSample(SILENT, True, BLOCK_BYTES), PeerSample(SLOW, True, 0)], 14)
    assert not watch.every_peer_stalls()  # a new peer is not judged yet
    assert not watch.alone_too_long()
    # A peer with nothing we want (a fellow downloader) neither serves nor stalls us.
    fellow = PeerSample(CHOKING, False, 0, wanted=False)
    watch.observe([PeerSample(SILENT, True, BLOCK_BYTES), fellow], 20)
    assert watch.every_peer_stalls()


def test_alone_too_long_once_no_peer_came_for_a_period() -> None:
    watch = StallWatch(stall_s=5)
    watch.observe([], 0)
    watch.observe([], 4)
    assert not watch.alone_too_long()  # connecting takes a moment
    watch.observe([PeerSample(SLOW, False, 0)], 4.5)
    watch.observe([], 5)
    watch.observe([], 9)
    assert not watch.alone_too_long()  # alone again only since 5
    watch.observe([PeerSample(CHOKING, False, 0, wanted=False)], 10)
    assert watch.alone_too_long()  # the seeders the tracker named never answered
    assert not watch.every_peer_stalls()


def test_unreachable_peers_are_reported_once_nobody_served_for_a_period() -> None:
    watch = StallWatch(stall_s=5)
    gone, back = ("10.0.0.9", 6882), ("10.0.0.8", 6882)
    watch.unreachable(gone)
    watch.unreachable(back)
    assert watch.observe([], 0) == []
    assert watch.observe([PeerSample(back, False, 0)], 1) == []  # it connected after all
    assert watch.observe([], 2) == []
    assert not watch.every_peer_stalls()  # connecting may still succeed
    assert watch.observe([], 7) == [gone]  # alone for a period: report the one we never reached
    assert watch.observe([], 8) == []  # once
    assert watch.every_peer_stalls() and watch.alone_too_long()


def test_alone_with_nobody_to_report_asks_for_other_peers_once_a_period() -> None:
    # The peers handed out were full: they took our connections and closed them, which
    # is no failure to report. Waiting for them would run into the download's stall
    # (and an upstream copy); the tracker names others.
    watch = StallWatch(stall_s=5)
    watch.observe([], 0)
    assert not watch.lonely(4)
    assert watch.observe([], 6) == []
    assert watch.alone_too_long() and not watch.every_peer_stalls()
    assert watch.lonely(6)
    assert not watch.lonely(7)  # once per period
    watch.observe([], 11)
    assert watch.lonely(11)
    # A peer with pieces we want ends it; alone again counts afresh.
    watch.observe([PeerSample(SLOW, True, 0)], 12)
    watch.observe([], 13)
    assert not watch.lonely(17)
    watch.observe([], 18)
    assert watch.lonely(18)


def test_alone_with_peers_to_report_reports_them_instead() -> None:
    watch = StallWatch(stall_s=5)
    watch.unreachable(("10.0.0.9", 6882))
    watch.observe([], 0)
    assert watch.observe([], 6) == [("10.0.0.9", 6882)]
    assert watch.every_peer_stalls() and not watch.lonely(6)  # the reports' path


def test_a_peer_that_dialled_us_is_never_judged_and_may_still_serve() -> None:
    watch = StallWatch(stall_s=5)
    incoming = PeerSample(SILENT, True, 0, ours=False)  # its port is not where it listens
    for second in (0, 6, 12):
        assert watch.observe([incoming], float(second)) == []
    assert not watch.every_peer_stalls() and not watch.alone_too_long()


def test_an_unreported_peer_is_judged_afresh() -> None:
    watch = StallWatch(stall_s=5)
    watch.observe([PeerSample(SILENT, True, 0)], 0)
    assert watch.observe([PeerSample(SILENT, True, 0)], 6) == [SILENT]
    watch.unreport(SILENT)  # the report did not reach the tracker
    assert not watch.every_peer_stalls()
    assert watch.observe([PeerSample(SILENT, True, 0)], 7) == []
    assert watch.observe([PeerSample(SILENT, True, 0)], 12) == [SILENT]  # reported again
