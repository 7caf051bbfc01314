"""The node's stall reports (p2preg/node/stallreports.py) over a report call it is handed.

libtorrent's peer list is given as plain records with the fields the module
reads. A report counts only once the tracker took it: one beyond the in-flight
cap, or one the tracker refused, is judged again and gives no verdict; failed
connections count only with a known errno, and only for a node that reached
some peer lately.
"""

from __future__ import annotations

import errno
from types import SimpleNamespace
from typing import Any

import libtorrent as lt
import trio
import trio.lowlevel
import trio.testing

from p2preg.core.digest import Digest
from p2preg.node.metrics import NodeMetrics
from p2preg.node.stallreports import MAX_REPORTS_IN_FLIGHT, StallReports

DIGEST = Digest.of(b"a blob")


def peer(port: int, *, ours: bool = True, asked: bool = True) -> Any:
    flags = lt.peer_info.interesting | (lt.peer_info.local_connection if ours else 0)
    if not asked:
        flags |= lt.peer_info.remote_choked
    return SimpleNamespace(ip=("10.0.0.1", port), flags=flags, download_queue_length=1,
                           total_download=0)  # fmt: skip


async def test_a_verdict_waits_for_the_reports_and_a_refused_one_is_made_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    told: list[bytes] = []
    refuse = trio.Event()

    async def report(digest: Digest, peer_: bytes) -> None:
        await trio.sleep(0.1)
        if not refuse.is_set():
            raise ConnectionError("tracker down")
        told.append(peer_)

    async with trio.open_nursery() as nursery:
        reports = StallReports(report, 5.0, NodeMetrics(), nursery)
        w = reports.watch(DIGEST)
        reports.sample(w, [peer(7000)])
        await trio.sleep(5.1)
        reports.sample(w, [peer(7000)])  # stalled: reported, not yet taken
        assert reports.verdict(w) is None
        await trio.sleep(0.2)  # refused: judged afresh, no verdict
        reports.sample(w, [peer(7000)])
        assert reports.verdict(w) is None and not told
        refuse.set()
        await trio.sleep(5.1)
        reports.sample(w, [peer(7000)])
        await trio.sleep(0.2)
        assert len(told) == 1
        verdict = reports.verdict(w)
        assert verdict is not None and verdict.reason == "peers_stalled"


async def test_reports_beyond_the_cap_wait_for_a_later_sample(
    autojump_clock: trio.testing.MockClock,
) -> None:
    release = trio.Event()
    told: list[bytes] = []

    async def report(digest: Digest, peer_: bytes) -> None:
        await release.wait()
        told.append(peer_)

    many = [peer(7000 + n) for n in range(MAX_REPORTS_IN_FLIGHT + 2)]
    async with trio.open_nursery() as nursery:
        reports = StallReports(report, 5.0, NodeMetrics(), nursery)
        w = reports.watch(DIGEST)
        reports.sample(w, many)
        await trio.sleep(5.1)
        reports.sample(w, many)
        await trio.lowlevel.checkpoint()
        assert w.in_flight == MAX_REPORTS_IN_FLIGHT
        release.set()
        await trio.sleep(0.1)
        reports.sample(w, many)  # the two left over are judged again, from now
        await trio.sleep(5.1)
        reports.sample(w, many)
        await trio.sleep(0.1)
        assert len(set(told)) == MAX_REPORTS_IN_FLIGHT + 2
        assert reports.verdict(w) is not None


async def test_failed_connections_count_only_after_reaching_a_peer_and_for_known_errors(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def report(digest: Digest, peer_: bytes) -> None:
        pass

    async with trio.open_nursery() as nursery:
        reports = StallReports(report, 5.0, NodeMetrics(), nursery)
        w = reports.watch(DIGEST)
        reports.connect_failed(w, ("10.0.0.9", 7000), errno.ECONNREFUSED)  # never reached anyone
        reports.sample(w, [])
        await trio.sleep(5.1)
        reports.sample(w, [])
        assert reports.verdict(w) is None  # nothing to report: not a verdict
        other = reports.watch(Digest.of(b"another blob"))
        reports.sample(other, [peer(7100)])  # now it holds a connection it opened
        reports.connect_failed(w, ("10.0.0.9", 7001), errno.ECONNABORTED)  # not "gone"
        reports.connect_failed(w, ("10.0.0.9", 7002), errno.ECONNREFUSED)
        reports.sample(w, [])
        await trio.sleep(0.1)
        verdict = reports.verdict(w)
        assert verdict is not None and verdict.reason == "peers_stalled"
