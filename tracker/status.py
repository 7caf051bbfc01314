"""What `p2preg status --tracker` shows: totals and the busiest swarms.

A read-only view over the coordinator's registry, peer table and lease book;
it must not change them.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from tracker.coordinator import Tracker


@dataclass(frozen=True, slots=True)
class SwarmStatus:
    digest: str
    size: int
    seeders: int
    leechers: int
    completed: int
    published_by: str


@dataclass(frozen=True, slots=True)
class TrackerStatus:
    swarms: int
    peers: int
    seeders: int
    metainfo: int
    leases: int
    busiest: list[SwarmStatus]


def tracker_status(tracker: Tracker, limit: int) -> TrackerStatus:
    """Totals, and the `limit` swarms with the most live peers."""

    def size(digest: str) -> int:
        swarm = tracker.peers.swarm(digest)
        return 0 if swarm is None else len(swarm.by_key)

    rows = []
    for digest in heapq.nlargest(limit, tracker.peers.keys(), key=size):
        swarm, entry = tracker.peers.swarm(digest), tracker.registry.get(digest)
        if swarm is None or entry is None:
            continue
        rows.append(
            SwarmStatus(
                digest,
                entry.meta.size,
                len(swarm.seeders),
                len(swarm.leechers),
                swarm.downloaded,
                entry.published_by,
            )
        )
    totals = tracker.peers.totals()
    return TrackerStatus(
        totals.swarms,
        totals.peers,
        totals.seeders,
        len(tracker.registry),
        len(tracker.leases),
        rows,
    )
