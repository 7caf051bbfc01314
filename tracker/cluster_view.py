"""`cluster_view`: everything the cluster page shows, read from the tracker in one place.

Owns the one read the page makes — nodes (identities with a live peer, their
last announce and the byte counters it carried), blobs and the images they
belong to with how far each spread, what crossed the upstream link against
what the swarms delivered, and leases that look stuck — returned as a frozen
`ClusterView` of plain values. It reads the coordinator's public parts only
(peers, registry, leases, queue, images) and must not change them, render
anything, or await: trio runs nothing else while it reads, so the view is
consistent. Rows are capped (`MAX_ROWS`); totals count everything.
"""

from __future__ import annotations

from dataclasses import dataclass

from tracker.coordinator import Tracker
from tracker.leases import Lease

# Rows of each table the view carries at most; the totals still count every one.
MAX_ROWS = 500


@dataclass(frozen=True, slots=True)
class NodeRow:
    name: str
    # Seconds since its latest announce of any blob.
    last_announce_ago_s: float
    seeding: int
    leeching: int
    # Sums over its live peers of what their latest announces said.
    uploaded: int
    downloaded: int


@dataclass(frozen=True, slots=True)
class BlobRow:
    digest: str
    # None: no metainfo filed yet (an upstream fetch is under way, or failed).
    size: int | None
    seeders: int
    leechers: int
    # `event=completed` announces since the tracker started.
    completed: int
    published_by: str | None


@dataclass(frozen=True, slots=True)
class ImageRow:
    # The manifest digest the nodes named in their lease requests.
    name: str
    blobs: tuple[BlobRow, ...]
    # Lease requests waiting for one of the image's upstream slots now.
    queued: int

    @property
    def seeded_blobs(self) -> int:
        return sum(1 for b in self.blobs if b.seeders > 0)


@dataclass(frozen=True, slots=True)
class LeaseRow:
    digest: str
    holder: str
    image: str | None
    bytes_done: int
    size: int | None
    # How long its progress has not moved (since its rate window began).
    still_s: float
    expires_in_s: float
    # Lease requests of its image waiting for an upstream slot.
    waiting: int
    # Empty when it moves; else why it looks stuck.
    stuck: str


@dataclass(frozen=True, slots=True)
class Traffic:
    """What the tracker knows of bytes moved; the page says what each figure is."""

    # Sum of the sizes of blobs with metainfo: each crossed the upstream link at
    # least once, fetched by the node that filed its torrent.
    published_bytes: int
    # Progress reported by the holders of live leases (fetches under way).
    leased_bytes: int
    lease_grants: int
    lease_replacements: int
    # Completed swarm downloads since the tracker started, times the blob size.
    completed_bytes: int
    # Sums of the latest announces' counters over live peers (each node's
    # libtorrent counts per torrent since it added it).
    reported_uploaded: int
    reported_downloaded: int


@dataclass(frozen=True, slots=True)
class ClusterView:
    nodes: tuple[NodeRow, ...]
    node_count: int
    images: tuple[ImageRow, ...]
    image_count: int
    blobs: tuple[BlobRow, ...]
    blob_count: int
    leases: tuple[LeaseRow, ...]
    lease_count: int
    stuck_count: int
    traffic: Traffic
    rate_window_s: float
    min_rate_bytes_s: int


@dataclass(slots=True)
class _NodeSums:
    last: float = float("-inf")
    seeding: int = 0
    leeching: int = 0
    uploaded: int = 0
    downloaded: int = 0


def _blob(tracker: Tracker, digest: str) -> BlobRow:
    swarm, entry = tracker.peers.swarm(digest), tracker.registry.get(digest)
    return BlobRow(
        digest,
        None if entry is None else entry.meta.size,
        0 if swarm is None else len(swarm.seeders),
        0 if swarm is None else len(swarm.leechers),
        0 if swarm is None else swarm.downloaded,
        None if entry is None else entry.published_by,
    )


def _nodes(tracker: Tracker, now: float) -> tuple[list[NodeRow], int, int]:
    """Node rows, most recent announce first; and the sums of their counters."""
    sums: dict[str, _NodeSums] = {}
    swarm_keys = tracker.peers.keys()  # a PeerTable, not a dict: it has no __iter__
    for digest in swarm_keys:
        swarm = tracker.peers.swarm(digest)
        for peer in () if swarm is None else swarm.by_key.values():
            s = sums.setdefault(peer.key, _NodeSums())
            s.last = max(s.last, peer.announced_at)
            s.seeding += peer.seeder
            s.leeching += not peer.seeder
            s.uploaded += peer.uploaded
            s.downloaded += peer.downloaded
    rows = [
        NodeRow(name, max(0.0, now - s.last), s.seeding, s.leeching, s.uploaded, s.downloaded)
        for name, s in sums.items()
    ]
    rows.sort(key=lambda r: (r.last_announce_ago_s, r.name))
    return rows, sum(r.uploaded for r in rows), sum(r.downloaded for r in rows)


def _stuck(tracker: Tracker, lease: Lease, now: float) -> str:
    window = tracker.leases.rate.window_s
    if lease.fetched:
        return ""
    if tracker.leases.is_slow(lease):
        return "below the minimum rate: the next node to ask takes the fetch over"
    if lease.bytes_done == lease.mark_bytes and now - lease.mark_at >= window:
        return f"no progress for {now - lease.mark_at:.0f} s, longer than a rate window"
    return ""


def _lease_rows(tracker: Tracker, now: float, queued: dict[str, int]) -> list[LeaseRow]:
    rows = []
    for lease in tracker.leases.live():
        waiting = 0 if lease.group is None else queued.get(lease.group, 0)
        rows.append(
            LeaseRow(
                lease.digest,
                lease.holder,
                lease.group,
                lease.bytes_done,
                lease.size,
                max(0.0, now - lease.mark_at) if lease.bytes_done == lease.mark_bytes else 0.0,
                max(0.0, lease.expires_at - now),
                waiting,
                _stuck(tracker, lease, now),
            )
        )
    rows.sort(key=lambda r: (not r.stuck, -r.still_s, r.digest))
    return rows


def cluster_view(tracker: Tracker, now: float) -> ClusterView:
    """What the cluster page shows, as of `now` (the tracker's clock)."""
    queued = tracker.queue.queued()
    leases = _lease_rows(tracker, now, queued)
    named = tracker.images.images()
    digests = {*tracker.registry.digests(), *tracker.peers.keys(), *(r.digest for r in leases)}
    digests.update(d for members in named.values() for d in members)
    blobs = {d: _blob(tracker, d) for d in sorted(digests)}
    images = [
        ImageRow(name, tuple(blobs[d] for d in members), queued.get(name, 0))
        for name, members in named.items()
    ]
    nodes, uploaded, downloaded = _nodes(tracker, now)
    blob_rows = sorted(blobs.values(), key=lambda b: (-(b.seeders + b.leechers), b.digest))
    traffic = Traffic(
        published_bytes=sum(b.size or 0 for b in blob_rows if b.published_by is not None),
        leased_bytes=sum(r.bytes_done for r in leases),
        lease_grants=tracker.leases.granted,
        lease_replacements=tracker.leases.replacements,
        completed_bytes=sum(b.completed * (b.size or 0) for b in blob_rows),
        reported_uploaded=uploaded,
        reported_downloaded=downloaded,
    )
    return ClusterView(
        nodes=tuple(nodes[:MAX_ROWS]),
        node_count=len(nodes),
        images=tuple(images[:MAX_ROWS]),
        image_count=len(images),
        blobs=tuple(blob_rows[:MAX_ROWS]),
        blob_count=len(blob_rows),
        leases=tuple(leases[:MAX_ROWS]),
        lease_count=len(leases),
        stuck_count=sum(1 for r in leases if r.stuck),
        traffic=traffic,
        rate_window_s=tracker.leases.rate.window_s,
        min_rate_bytes_s=tracker.leases.rate.min_bytes_s,
    )
