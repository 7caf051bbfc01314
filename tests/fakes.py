"""In-memory fakes of the pull path's three seams (p2preg/node/seams.py), and a node built on them.

`FakeUpstream` is a seed registry, `FakeTrackerServer` the tracker (its leases
are the real `tracker.leases.LeaseBook`, so expiry and renewal behave as in
production) with one `FakeTracker` client per node, and `FakeSwarm` a node's
BitTorrent session whose peers are the other fake swarms that seed through the
same tracker. None of them uses a socket or a thread, so tests run them under
trio's MockClock with autojump; `open_pull_node` wires the real pull path
(Blobs, BlobFetcher, PeerDownload, Seeding, a real BlobStore on disk) around
them with blocking store work kept on the trio thread.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TypeVar

import httpx
import trio

from p2preg.core import errors as tracker_errors
from p2preg.core.digest import Digest
from p2preg.core.metainfo import Metainfo, info_name
from p2preg.core.wire import LeaseReply, LeaseStatus, MetainfoRecord
from p2preg.node.blobs import Blobs
from p2preg.node.clusterword import ClusterWord
from p2preg.node.config import Upstream
from p2preg.node.errors import UpstreamUnavailable
from p2preg.node.fetch import BlobFetcher, Cluster, SwarmSettings
from p2preg.node.metrics import NodeMetrics
from p2preg.node.peers import PeerDownload
from p2preg.node.pullorder import PullOrder
from p2preg.node.seams import Offload, SwarmError, SwarmSeam, TrackerSeam, UpstreamSeam
from p2preg.node.seeding import Seeding, TorrentFiles, stop_seeding
from p2preg.node.store import BlobStore
from p2preg.node.tenancy import Tenancy
from p2preg.node.upstream import BlobSink, Fetched
from tracker.leases import Granted, LeaseBook

T = TypeVar("T")
CHUNK = 64 << 10


def blob(size: int = 300_000, seed: int = 1) -> tuple[Digest, bytes]:
    """`size` random-ish bytes (rounded down to 8) and their digest."""
    data = (bytes([seed]) + os.urandom(7)) * (size // 8)
    return Digest.of(data, "sha256"), data


async def inline(fn: Callable[[], T], /) -> T:
    """Offload that runs blocking store work right here: no thread for autojump to race."""
    return fn()


# -- the seed registry -------------------------------------------------------------


class FakeUpstream:
    """A seed registry holding `blobs` by (repository, digest); sends `delay_s` per chunk."""

    def __init__(
        self, blobs: Mapping[tuple[str, Digest], bytes], ns: str = "seed.test",
        delay_s: float = 0.0,
    ) -> None:
        self._upstream = Upstream(ns, "http://seed.invalid")
        self.blobs = dict(blobs)
        self.delay_s = delay_s
        self.down = False
        self.corrupt = False
        self.says_size = True  # False: HEAD answers without a Content-Length
        self.heads = 0
        self.gets = 0
        # (repository, tag or digest) → manifest bytes; a tag's manifest is also
        # there by its digest. Each GET and each HEAD of one is counted, by ref.
        self.manifests: dict[tuple[str, str], bytes] = {}
        self.manifest_gets = 0
        self.manifest_heads = 0
        self.manifest_requests: list[tuple[str, str]] = []  # (method, tag or digest)
        self.head_says_digest = True  # False: a manifest HEAD lacks Docker-Content-Digest

    @property
    def upstream(self) -> Upstream:
        return self._upstream

    def _check(self) -> None:
        if self.down:
            raise UpstreamUnavailable("seed registry seed.test unreachable: ConnectError")

    async def blob_size(self, repository: str, digest: Digest) -> int | None:
        self.heads += 1
        self._check()
        data = self.blobs.get((repository, digest))
        if data is None:
            return None
        return len(data) if self.says_size else -1

    async def fetch_blob(self, repository: str, digest: Digest, sink: BlobSink) -> None:
        self.gets += 1
        self._check()
        data = self.blobs[(repository, digest)]
        if self.corrupt:
            data = bytes(b ^ 0xFF for b in data)
        for start in range(0, len(data), CHUNK):
            if self.delay_s:
                await trio.sleep(self.delay_s)
            await sink.write(data[start : start + CHUNK])

    async def fetch(
        self, method: str, repository: str, path: str, *,
        headers: Mapping[str, str] | None = None, max_bytes: int,
    ) -> Fetched | None:
        self._check()
        kind, _, ref = path.partition("/")
        if kind != "manifests":
            return None
        self.manifest_requests.append((method, ref))
        if method == "HEAD":
            self.manifest_heads += 1
        else:
            self.manifest_gets += 1
        body = self.manifests.get((repository, ref))
        if body is None and ref.startswith("sha256:"):
            body = next((b for (r, _), b in self.manifests.items()
                         if r == repository and str(Digest.of(b, "sha256")) == ref), None)
        if body is None:
            return None
        digest = Digest.of(body, "sha256")
        media_type = json.loads(body)["mediaType"]
        headers = httpx.Headers({"Content-Type": media_type, "Content-Length": str(len(body))})
        if method != "HEAD" or self.head_says_digest:
            headers["Docker-Content-Digest"] = str(digest)
        return Fetched(200, headers, b"" if method == "HEAD" else body)

    async def tags(self, repository: str) -> list[str] | None:
        self._check()
        return None


# -- the tracker -------------------------------------------------------------------


class FakeTrackerServer:
    """The tracker's control API in memory: leases, metainfo, and who seeds what."""

    def __init__(self, ttl_s: float = 30.0, silence_s: float = 0.0) -> None:
        self.leases = LeaseBook(ttl_s, trio.current_time, silence_s=silence_s)
        # Renewals as they came: (time, bytes_done, the client's timeout_s); the
        # next `hang_renewals` hang for their timeout, as on a replica that hangs.
        self.renewals: list[tuple[float, int, float | None]] = []
        self.hang_renewals = 0
        # How long a seeder's first announce takes to be acknowledged.
        self.announce_wait_s = 0.0
        self.metainfo: dict[Digest, bytes] = {}
        self.seeders: dict[Digest, dict[str, Path]] = {}
        self.down = False
        # Every seeder sends bytes that pass libtorrent's piece checks but not the digest.
        self.corrupt_peers = False
        self.replies: list[tuple[str, LeaseStatus]] = []
        self.reports: list[tuple[str, Digest]] = []
        # Digests whose torrent is disputed: never SEEDED, the lease is VERIFY,
        # and the verifier's publish settles it (the real rules: tracker/disputes.py).
        self.disputed: set[Digest] = set()
        self.sizes: dict[Digest, int] = {}
        self.confirms: list[tuple[str, Digest]] = []
        self._changed: dict[Digest, trio.Event] = {}

    def client(self, node: str) -> FakeTracker:
        return FakeTracker(self, node)

    def check(self) -> None:
        if self.down:
            raise tracker_errors.TrackerUnavailable("tracker http://tracker.invalid: ConnectError")

    def notify(self, digest: Digest) -> None:
        event = self._changed.pop(digest, None)
        if event is not None:
            event.set()

    def announce(self, digest: Digest, node: str, path: Path) -> None:
        self.seeders.setdefault(digest, {})[node] = path
        self.notify(digest)

    def leave(self, digest: Digest, node: str) -> None:
        self.seeders.get(digest, {}).pop(node, None)

    async def acquire(
        self, node: str, digest: Digest, size: int | None, wait_s: float
    ) -> LeaseReply:
        deadline = trio.current_time() + wait_s
        while True:
            self.check()
            reply, wake_at = self._try(node, digest, size)
            if wake_at is None or trio.current_time() >= deadline:
                self.replies.append((node, reply.status))
                return reply
            event = self._changed.setdefault(digest, trio.Event())
            with trio.move_on_at(min(deadline, wake_at)):
                await event.wait()

    def _try(self, node: str, digest: Digest, size: int | None) -> tuple[LeaseReply, float | None]:
        disputed = digest in self.disputed
        if digest in self.metainfo and self.seeders.get(digest) and not disputed:
            return LeaseReply(LeaseStatus.SEEDED, metainfo=self.metainfo[digest]), None
        outcome = self.leases.acquire(str(digest), node, size)
        lease = outcome.lease
        if isinstance(outcome, Granted):
            ttl_s = self.leases.ttl_s
            status = LeaseStatus.VERIFY if disputed else LeaseStatus.GRANTED
            silence_s = self.leases.silence_s
            return LeaseReply(status, lease_id=lease.lease_id, ttl_s=ttl_s,
                              silence_s=silence_s), None
        wait = LeaseReply(LeaseStatus.WAIT, retry_after_s=1.0, holder=lease.holder,
                          bytes_done=lease.bytes_done, size=lease.size)
        return wait, lease.expires_at


@dataclass
class FakeTracker:
    """One node's client of the fake tracker (satisfies TrackerSeam)."""

    server: FakeTrackerServer
    node: str
    published: list[Digest] = field(default_factory=list)

    async def acquire_lease(
        self, digest: Digest, *, size: int | None = None, wait_s: float = 0.0,
        group: str | None = None, order: int = 0,
    ) -> LeaseReply:
        return await self.server.acquire(self.node, digest, size, wait_s)

    async def renew_lease(
        self, digest: Digest, lease_id: str, bytes_done: int, size: int | None = None,
        *, timeout_s: float | None = None,
    ) -> LeaseReply:
        self.server.check()
        self.server.renewals.append((trio.current_time(), bytes_done, timeout_s))
        if self.server.hang_renewals > 0:
            self.server.hang_renewals -= 1
            await trio.sleep(timeout_s if timeout_s is not None else 10.0)
            raise tracker_errors.TrackerUnavailable("tracker http://tracker.invalid: timed out")
        self.server.leases.renew(str(digest), lease_id, bytes_done, size)
        self.server.notify(digest)
        return LeaseReply(LeaseStatus.GRANTED, lease_id=lease_id, ttl_s=self.server.leases.ttl_s)

    async def release_lease(self, digest: Digest, lease_id: str) -> None:
        self.server.check()
        self.server.leases.release(str(digest), lease_id)
        self.server.notify(digest)

    async def publish_metainfo(self, digest: Digest, size: int, metainfo: bytes) -> MetainfoRecord:
        self.server.check()
        lease = self.server.leases.current(str(digest))
        if digest in self.server.disputed and lease is not None and lease.holder == self.node:
            self.server.disputed.discard(digest)
            self.server.metainfo[digest] = metainfo
            self.server.sizes[digest] = size
            # The losing torrent's swarm goes; the publisher, seeding already, is
            # entered by its publish (as the tracker does: Swarms.enter).
            mine = self.server.seeders.pop(digest, {}).get(self.node)
            if mine is not None:
                self.server.seeders[digest] = {self.node: mine}
        if digest not in self.server.metainfo:
            self.server.sizes[digest] = size
        held = self.server.metainfo.setdefault(digest, metainfo)
        if held != metainfo:
            raise tracker_errors.MetainfoConflict(f"another metainfo is filed for {digest}")
        self.published.append(digest)
        return MetainfoRecord(str(digest), size, metainfo, [])

    async def lookup_metainfo(self, digest: Digest) -> MetainfoRecord | None:
        self.server.check()
        data = self.server.metainfo.get(digest)
        size = self.server.sizes.get(digest, 0)
        return None if data is None else MetainfoRecord(str(digest), size, data, [b"\x00" * 20])

    async def report_bad(
        self, digest: Digest, bad_info_hash: bytes, size: int, replacement: bytes, reason: str
    ) -> MetainfoRecord:
        self.server.check()
        self.server.reports.append((self.node, digest))
        self.server.metainfo[digest] = replacement
        return MetainfoRecord(str(digest), size, replacement, [])

    async def confirm_seed(self, digest: Digest, info_hash: bytes) -> None:
        self.server.check()
        self.server.confirms.append((self.node, digest))


# -- the swarm ---------------------------------------------------------------------


class FakeSwarm:
    """A node's session: it seeds by announcing to the fake tracker, and downloads
    from whoever the tracker says seeds (instantly, or `SwarmError` if nobody does)."""

    def __init__(self, node: str, directory: Path, server: FakeTrackerServer) -> None:
        self.node = node
        self.directory = directory
        self.server = server
        self._torrents: dict[Digest, bool] = {}  # digest → seeding
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def listen_port(self) -> int:
        return 6881

    def __contains__(self, digest: Digest) -> bool:
        return digest in self._torrents

    def seeding(self) -> list[Digest]:
        return [d for d, seeding in self._torrents.items() if seeding]

    def peers(self) -> int:
        return 0

    def _path(self, digest: Digest) -> Path:
        return self.directory / info_name(digest)

    def seed(self, meta: Metainfo, verified: Path) -> None:
        if meta.digest in self._torrents:
            return
        shutil.copyfile(verified, self._path(meta.digest))
        self._torrents[meta.digest] = True
        self.server.announce(meta.digest, self.node, self._path(meta.digest))

    async def download(
        self,
        meta: Metainfo,
        *,
        stall_s: float,
        max_hash_failures: int,
        report_as: Digest | None = None,
    ) -> Path:
        self._torrents.setdefault(meta.digest, False)
        seeders = self.server.seeders.get(meta.digest) or {}
        if not seeders:
            await trio.sleep(stall_s)
            raise SwarmError("stalled", f"no progress from peers for {stall_s:.0f} s")
        data = next(iter(seeders.values())).read_bytes()
        if self.server.corrupt_peers:
            data = bytes(b ^ 0x5A for b in data)
        self._path(meta.digest).write_bytes(data)
        return self._path(meta.digest)

    def mark_seeding(self, digest: Digest) -> None:
        if digest in self._torrents:
            self._torrents[digest] = True
            self.server.announce(digest, self.node, self._path(digest))

    def remove(self, digest: Digest) -> None:
        if self._torrents.pop(digest, None) is not None:
            self.server.leave(digest, self.node)
            self._path(digest).unlink(missing_ok=True)

    def reannounce(self, digest: Digest) -> None:
        if self._torrents.get(digest):
            self.server.announce(digest, self.node, self._path(digest))

    async def wait_announced(self, digest: Digest, timeout_s: float) -> bool:
        await trio.sleep(min(self.server.announce_wait_s, timeout_s))
        return self._torrents.get(digest, False)

    def last_seeder_of_live_swarm(self, digest: Digest) -> bool:
        return False


# -- a node's pull path on the fakes ---------------------------------------------------


@dataclass
class PullNode:
    name: str
    blobs: Blobs
    store: BlobStore
    metrics: NodeMetrics
    tenancy: Tenancy
    swarm: FakeSwarm | None
    tracker: FakeTracker | None

    def fetches(self, source: str) -> int:
        return int(self.metrics.registry.get_sample_value(
            "p2preg_blob_fetches_total", {"source": source}) or 0)

    def fallbacks(self, reason: str) -> int:
        return int(self.metrics.registry.get_sample_value(
            "p2preg_fallbacks_total", {"reason": reason}) or 0)


@dataclass
class PullPath:
    """The parts of one node's pull path a test looks at."""

    blobs: Blobs
    store: BlobStore
    metrics: NodeMetrics
    tenancy: Tenancy


@asynccontextmanager
async def open_pull_path(
    data_dir: Path,
    p2p: tuple[SwarmSeam, TrackerSeam] | None,
    *,
    settings: SwarmSettings,
    offload: Offload = inline,
    store_max_bytes: int = 1 << 30,
    word: ClusterWord | None = None,
    share_small: bool = False,
) -> AsyncIterator[PullPath]:
    """The real pull path of one node, wired as server.py wires it, over any seams."""
    metrics, tenancy = NodeMetrics(), Tenancy()
    async with trio.open_nursery() as nursery:
        cluster = None
        if p2p is None:
            store = BlobStore(data_dir, store_max_bytes)
        else:
            swarm, tracker = p2p
            torrents = TorrentFiles(data_dir / "torrents")
            store = BlobStore(data_dir, store_max_bytes,
                              on_remove=partial(stop_seeding, swarm, torrents),
                              spare=swarm.last_seeder_of_live_swarm)
            seeding = Seeding(store, swarm, tracker, torrents, nursery, offload)
            peers = PeerDownload(store, swarm, stall_s=settings.stall_s,
                                 max_hash_failures=settings.max_hash_failures, offload=offload)
            cluster = Cluster(tracker, swarm, seeding, peers, settings)
        store.open()
        if cluster is not None:
            cluster.seeding.reseed()  # as the node does at start: seeds what it held
        fetcher = BlobFetcher(store, metrics, PullOrder(), nursery, offload=offload,
                              cluster=cluster, share_small=share_small)
        blobs = Blobs(store, tenancy, metrics, fetcher, nursery, word)
        yield PullPath(blobs, store, metrics, tenancy)
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def open_pull_node(
    data_dir: Path,
    server: FakeTrackerServer | None,
    *,
    name: str = "node",
    settings: SwarmSettings | None = None,
    store_max_bytes: int = 1 << 30,
    word: ClusterWord | None = None,
    share_small: bool = False,
) -> AsyncIterator[PullNode]:
    """The real pull path of one node over the fakes (no tracker when `server` is None)."""
    settings = settings or SwarmSettings(
        min_bytes=1024, stall_s=30.0, max_hash_failures=4, lease_wait_max_s=60.0
    )
    swarm = tracker = None
    if server is not None:
        swarm = FakeSwarm(name, data_dir / "swarm", server)
        tracker = server.client(name)
    p2p = None if swarm is None or tracker is None else (swarm, tracker)
    async with open_pull_path(
        data_dir, p2p, settings=settings, store_max_bytes=store_max_bytes, word=word,
        share_small=share_small,
    ) as path:
        yield PullNode(name, path.blobs, path.store, path.metrics, path.tenancy, swarm, tracker)


def _seams_hold(swarm: FakeSwarm, tracker: FakeTracker, upstream: FakeUpstream) -> None:
    """Type-checked only: the fakes satisfy the node's Protocols (mypy tests/fakes.py)."""
    _s: SwarmSeam = swarm
    _t: TrackerSeam = tracker
    _u: UpstreamSeam = upstream
