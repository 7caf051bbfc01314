"""The node's stall reports: a download's peers sampled for stallwatch.py, and the tracker told.

Owns, per download, a `StallWatch` fed from libtorrent's peer list and its
failed connections, and the reports in flight to the tracker. swarm.py calls
`sample` while a download runs (once the torrent has its first tracker reply:
before that nobody could have served it) and raises what `verdict` says. A
report counts as made only once the tracker took it: one dropped (too many in
flight) or refused is judged again, so the node never asks the tracker what
next on the strength of a report the tracker does not have. Connections that
failed are recorded only when this node reached some peer lately: a node whose
own network is broken must not report every seeder it is handed. It decides
nothing about where a blob comes from, and holds no libtorrent session.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import libtorrent as lt
import trio

from p2preg.core.digest import Digest
from p2preg.node.metrics import NodeMetrics
from p2preg.node.seams import SwarmError
from p2preg.node.stallwatch import PeerSample, StallWatch, compact

log = logging.getLogger(__name__)

ReportStall = Callable[[Digest, bytes], Awaitable[None]]

# Reports sent at once, over all downloads; more wait for the next sample.
MAX_REPORTS_IN_FLIGHT = 8
# A failed connection means the peer is gone only if we reached another peer this recently.
REACHED_WINDOW_S = 600.0
# What a connection attempt may end in for its peer to count as unreachable.
UNREACHABLE_ERRNOS = frozenset(
    {errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH}
)

Endpoint = tuple[str, int]


@dataclass
class Watched:
    """One download under watch."""

    digest: Digest
    watch: StallWatch
    in_flight: int = 0


class StallReports:
    def __init__(
        self, report: ReportStall, stall_s: float, metrics: NodeMetrics, nursery: trio.Nursery
    ) -> None:
        self._report = report
        self._stall_s = stall_s
        self._metrics = metrics
        self._nursery = nursery
        self._in_flight = 0
        self._reached_at: float | None = None  # last time we held a connection we opened

    def watch(self, digest: Digest) -> Watched:
        return Watched(digest, StallWatch(self._stall_s))

    def sample(self, w: Watched, peers: list[Any]) -> None:
        """Feed libtorrent's `peer_info` list of the download; report whom it says."""
        now = trio.current_time()
        samples = [
            PeerSample(
                (str(p.ip[0]), int(p.ip[1])),
                not (p.flags & lt.peer_info.remote_choked) and p.download_queue_length > 0,
                int(p.total_download),
                wanted=bool(p.flags & lt.peer_info.interesting),
                ours=bool(p.flags & lt.peer_info.local_connection),
            )
            for p in peers
        ]
        if any(s.ours for s in samples):
            self.reached()
        for endpoint in w.watch.observe(samples, now):
            if self._in_flight >= MAX_REPORTS_IN_FLIGHT:
                w.watch.unreport(endpoint)  # judged again at a later sample
                continue
            self._metrics.peer_stalls.inc()
            log.info("swarm: peer %s:%d stalls %s or is unreachable: reporting it",
                     *endpoint, w.digest)  # fmt: skip
            # Counted now, not when the task starts: the download must not ask the
            # tracker what next before the tracker has the report.
            self._in_flight += 1
            w.in_flight += 1
            self._nursery.start_soon(self._send, w, endpoint)

    def reached(self) -> None:
        """A peer sent us payload, or we hold a connection we opened: our network works."""
        self._reached_at = trio.current_time()

    def connect_failed(self, w: Watched, endpoint: Endpoint, error: int) -> None:
        """Our connection to `endpoint`, a peer the tracker named, ended in `error`."""
        reached = self._reached_at
        if reached is None or trio.current_time() - reached > REACHED_WINDOW_S:
            return  # our own network may be what is broken
        if error in UNREACHABLE_ERRNOS:
            w.watch.unreachable(endpoint)

    @staticmethod
    def verdict(w: Watched) -> SwarmError | None:
        """Why the download should stop waiting for this swarm now, if it should."""
        if w.watch.every_peer_stalls():
            if w.in_flight:
                return None  # the tracker has not got every report yet
            return SwarmError("peers_stalled", "every peer stalls us or is unreachable")
        return None

    async def _send(self, w: Watched, endpoint: Endpoint) -> None:
        try:
            await self._report(w.digest, compact(endpoint))
        except Exception as e:  # a report is evidence, not a duty: never fail a download
            log.info("swarm: reporting a stalled peer of %s failed: %s", w.digest, e)
            w.watch.unreport(endpoint)
        finally:
            self._in_flight -= 1
            w.in_flight -= 1
