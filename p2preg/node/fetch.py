"""Where a blob comes from: the store's disk, the swarm, or the seed registry — decided once.

Owns the order of the pull path for one blob that is not in the store yet:
room on the disk first; then, with a tracker, the lease wait (leasewait.py
says what each reply means) — beside it, for a blob of two chunks or more,
the blob's chunk torrents followed as their holder files them (chunks.py),
which end the wait if they assemble into the verified blob first — that ends
in joining the swarm (peers.py), in fetching from upstream as the lease holder
(renewing the lease with progress, and cutting chunk torrents as the bytes
arrive), or in falling back to upstream with a reason — a swarm whose peers stalled the
download (and were reported) sends it back to the lease wait once, so that the
stalled nodes share one upstream fetch instead of each making its own; without
a tracker, or for a blob below `p2p_min_bytes`, upstream straight away (with
`share_small`, config `cluster_fallback`, such a blob is then also published
and seeded in the background if no node defined its torrent yet, so that the
site holds every blob of an image for an outage). A blob
that came from upstream is published to the swarm here and nowhere else, once,
before the holder's lease is let go. Upstream bytes are hashed while written
and enter the store only when they match. A pull never fails because of the
P2P layer. While upstream is unreachable (`peers_only`, blobs.py) a blob comes
from peers or not at all: whatever its size, the lease wait (bounded by
`PEERS_ONLY_WAIT_S`) ends in the swarm or in a clean 503, a lease granted
meanwhile given back unused. It must not check tenancy or run fetches once per digest (blobs.py
does both).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import trio

from p2preg.core import errors as tracker_errors
from p2preg.core.digest import Digest
from p2preg.core.metainfo import Metainfo
from p2preg.core.wire import LeaseStatus
from p2preg.node.chunkfollow import ChunkFollower
from p2preg.node.chunks import Chunking, ChunkPublisher, publishing
from p2preg.node.errors import StoreFull, UpstreamError, UpstreamUnavailable
from p2preg.node.holding import Renewals, release
from p2preg.node.leasewait import (
    Ask,
    AskAgain,
    Blob,
    Due,
    FallBack,
    FetchAsHolder,
    JoinSwarm,
    LeaseWait,
    Outcome,
    Replied,
    TrackerFailed,
)
from p2preg.node.metrics import NodeMetrics
from p2preg.node.peers import Fallback, PeerDownload
from p2preg.node.pullorder import Place, PullOrder
from p2preg.node.seams import Offload, SwarmSeam, TrackerSeam, UpstreamSeam
from p2preg.node.seeding import Seeding
from p2preg.node.store import BlobStore, BlobWriter, DigestMismatch, NoSpace, StoreError

log = logging.getLogger(__name__)

# Blob bytes are handed to the hashing/writing thread in batches this large, so
# the per-batch thread hop stays small next to the work it carries.
WRITE_BATCH_BYTES = 1 << 20
# A seed registry that sends corrupt bytes gets one more chance.
MISMATCH_ATTEMPTS = 2
# How long the holder keeps its lease after publishing, waiting for the
# tracker to count it as a seeder.
ANNOUNCE_WAIT_S = 10.0
# A failed holder gives its lease back within this long, or lets it expire.
RELEASE_ON_FAILURE_S = 5.0
# Swarm downloads of one blob: a second only after the first stalled and the
# tracker still names a seeder this node did not report.
SWARM_ATTEMPTS = 2
# Grants the tracker may pass on before this node's acknowledgement reached it
# (a tracker far behind) before the node goes upstream without a lease.
ACK_ATTEMPTS = 3
# While upstream is unreachable, how long a node waits for a lease holder's
# progress before answering that no peer holds the blob.
PEERS_ONLY_WAIT_S = 30.0

Progress = Callable[[int], None]


def _ignore_progress(n: int) -> None:
    return None


class _StoreSink:
    """Feeds upstream bytes to a BlobWriter off the event loop, in large batches."""

    def __init__(
        self,
        writer: BlobWriter,
        offload: Offload,
        progress: Progress,
        chunks: ChunkPublisher | None = None,
    ) -> None:
        self._writer = writer
        self._offload = offload
        self._progress = progress
        self._chunks = chunks
        self._buffer = bytearray()
        self.offset = 0

    async def write(self, chunk: bytes) -> None:
        self._buffer += chunk
        self.offset += len(chunk)
        self._progress(self.offset)
        if len(self._buffer) >= WRITE_BATCH_BYTES:
            await self.flush()

    async def flush(self) -> None:
        if self._buffer:
            batch, self._buffer = bytes(self._buffer), bytearray()
            await self._offload(partial(self._writer.write, batch))
            if self._chunks is not None:
                await self._chunks.feed(batch)

    async def reset(self) -> None:
        if self._chunks is not None:  # what was cut may not be the blob's
            self._chunks.stop()
            self._chunks = None
        self._buffer.clear()
        self.offset = 0
        await self._offload(self._writer.reset)


@dataclass(frozen=True)
class SwarmSettings:
    min_bytes: int
    stall_s: float
    max_hash_failures: int
    lease_wait_max_s: float


@dataclass(frozen=True)
class Cluster:
    """The P2P side of the pull path, present when the node has a tracker."""

    tracker: TrackerSeam
    swarm: SwarmSeam
    seeding: Seeding
    peers: PeerDownload
    settings: SwarmSettings
    # Chunk torrents of blobs on their way from upstream (None: every blob moves whole).
    chunks: Chunking | None = None


class BlobFetcher:
    def __init__(
        self,
        store: BlobStore,
        metrics: NodeMetrics,
        pull_order: PullOrder,
        nursery: trio.Nursery,
        *,
        offload: Offload,
        cluster: Cluster | None = None,
        clock: Callable[[], float] = trio.current_time,
        share_small: bool = False,
    ) -> None:
        self._share_small = share_small
        self._store = store
        self._metrics = metrics
        self._pull_order = pull_order
        self._nursery = nursery
        self._offload = offload
        self._cluster = cluster
        self._clock = clock

    async def fetch(
        self,
        upstream: UpstreamSeam,
        repository: str,
        digest: Digest,
        size: int,
        *,
        peers_only: bool = False,
    ) -> tuple[str, int]:
        """Bring `digest` (`size` bytes as upstream said, -1 if it did not) into the store.

        Returns where it came from ("peers" or "upstream") and its size.
        """
        if size > 0:
            # Fail fast, or evict, before downloading into a disk that cannot hold it.
            try:
                self._store.reserve(size)
            except NoSpace as e:
                raise StoreFull(f"no space to store blob {digest}: {e}") from None
        if peers_only:
            return "peers", await self._from_peers_only(digest, size)
        copy = partial(self._from_upstream, upstream, repository, digest)
        cluster = self._cluster
        if cluster is None or 0 <= size < cluster.settings.min_bytes:
            size = await copy(_ignore_progress)
            if cluster is not None and self._share_small:
                self._nursery.start_soon(self._share, cluster, digest, size)
            return "upstream", size
        place = self._pull_order.of(digest)
        outcome, renewals = await self._lease_acknowledged(cluster, digest, size, place)
        if outcome is None:  # assembled from chunk torrents, and verified
            await cluster.seeding.publish(digest, size)
            return "peers", size
        if isinstance(outcome, JoinSwarm):
            got = await self._from_swarm(cluster, digest, size, place, outcome)
            if isinstance(got, Metainfo):
                await cluster.seeding.keep(got)
                return "peers", self._store.size(digest) or size
            outcome = got
        if isinstance(outcome, FetchAsHolder):
            if outcome.verify:
                log.info("blob %s: its torrent is disputed; fetching it upstream to settle", digest)
            if renewals is None:  # granted after a swarm stalled: acknowledged by `run`
                renewals = Renewals(cluster.tracker, digest, outcome, size)
            size = await self._as_holder(cluster, renewals, size, upstream, repository)
        else:
            self._metrics.fallbacks.labels(outcome.reason).inc()
            reason, message = outcome.reason, outcome.message
            log.warning("blob %s: falling back to upstream (%s): %s", digest, reason, message)
            size = await copy(_ignore_progress)
        # The one place a blob is published. Seed what we verified: the swarm may
        # lack a seeder, or hold bad metainfo. Published as the holder (GRANTED or
        # VERIFY), it defines or settles the torrent; after a fallback it is only
        # filed if the same torrent is already there (else refused, or reported).
        try:
            await cluster.seeding.publish(digest, size)
        except BaseException:
            if renewals is not None:
                renewals.stop()  # the lease runs out by itself
            raise
        if renewals is not None:
            self._nursery.start_soon(self._release_once_seeding, cluster, renewals)
        return "upstream", size

    async def _from_peers_only(self, digest: Digest, size: int) -> int:
        """While upstream is unreachable: the blob from peers, or UpstreamUnavailable."""
        cluster = self._cluster
        missing = UpstreamUnavailable(
            f"the seed registry is unreachable and no peer holds blob {digest}"
        )
        if cluster is None:
            raise missing
        if size < 0:  # no size said (an evicted blob): the torrent's, checked by the digest
            try:
                record = await cluster.tracker.lookup_metainfo(digest)
            except tracker_errors.TrackerError:
                record = None
            if record is None or record.size <= 0:
                raise missing
            size = record.size
            try:
                self._store.reserve(size)
            except NoSpace as e:
                raise StoreFull(f"no space to store blob {digest}: {e}") from None
        place = self._pull_order.of(digest)
        wait_s = min(cluster.settings.lease_wait_max_s, PEERS_ONLY_WAIT_S)
        outcome = await self._await_lease(cluster, digest, size, place, max_s=wait_s)
        if isinstance(outcome, JoinSwarm):
            got = await self._from_swarm(cluster, digest, size, place, outcome)
            if isinstance(got, Metainfo):
                await cluster.seeding.keep(got)
                return self._store.size(digest) or size
            outcome = got
        if isinstance(outcome, FetchAsHolder):  # nobody seeds it: the lease is no use now
            with trio.CancelScope(shield=True), trio.move_on_after(RELEASE_ON_FAILURE_S):
                await release(cluster.tracker, digest, outcome.lease_id)
        log.warning("blob %s: upstream is unreachable and the swarm did not give it (%s)",
                    digest, type(outcome).__name__)  # fmt: skip
        raise missing

    # -- the tracker ------------------------------------------------------------

    async def _lease_acknowledged(
        self, cluster: Cluster, digest: Digest, size: int, place: Place | None
    ) -> tuple[Outcome | None, Renewals | None]:
        """The lease wait; granted, the grant acknowledged before any upstream byte,
        and waited for again if the tracker passed it on first (it heard us late)."""
        for _ in range(ACK_ATTEMPTS):
            outcome = await self._wait_or_follow(cluster, digest, size, place)
            if not isinstance(outcome, FetchAsHolder):
                return outcome, None
            renewals = Renewals(cluster.tracker, digest, outcome, size)
            if await renewals.acknowledge():
                return outcome, renewals
        why = f"{ACK_ATTEMPTS} grants passed on before this node's acknowledgement"
        return FallBack("tracker", why), None

    async def _wait_or_follow(
        self, cluster: Cluster, digest: Digest, size: int, place: Place | None
    ) -> Outcome | None:
        """The lease wait, and beside it the blob's chunk torrents as they are filed;
        None when the chunks came first and were assembled into the verified blob."""
        chunks = cluster.chunks
        if chunks is None or chunks.settings.cut_for(size) is None:
            return await self._await_lease(cluster, digest, size, place)
        follower = ChunkFollower(chunks, digest, size)

        async def follow(cancel: trio.CancelScope) -> None:
            if await follower.run():
                cancel.cancel()

        outcome: Outcome | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow, nursery.cancel_scope)
            outcome = await self._await_lease(cluster, digest, size, place)
            if isinstance(outcome, JoinSwarm) and follower.following:
                # The holder verified the blob after filing its last chunk: the
                # chunks under way finish sooner than the whole torrent would.
                await follower.attempt_over.wait()
            nursery.cancel_scope.cancel()
        return None if follower.assembled else outcome

    async def _await_lease(
        self,
        cluster: Cluster,
        digest: Digest,
        size: int,
        place: Place | None,
        *,
        max_s: float | None = None,
    ) -> Outcome:
        """Ask the tracker until the lease wait ends in an outcome.

        `place` (the image it was asked for in, and where in it) lets the
        tracker order the image's upstream fetches.
        """
        group = None if place is None else str(place.image)
        order = 0 if place is None else place.index
        max_s = cluster.settings.lease_wait_max_s if max_s is None else max_s
        wait = LeaseWait(max_s, self._clock, blob=Blob(str(digest), size))
        action = wait.step(Due())
        while True:
            if isinstance(action, Ask):
                try:
                    reply = await cluster.tracker.acquire_lease(
                        digest, size=size, wait_s=action.wait_s, group=group, order=order
                    )
                except tracker_errors.TrackerError as e:
                    action = wait.step(TrackerFailed(str(e), e.code))
                else:
                    action = wait.step(Replied(reply))
            elif isinstance(action, AskAgain):
                if action.after_s > 0:
                    await trio.sleep(action.after_s)
                action = wait.step(Due())
            else:
                return action

    async def _from_swarm(
        self, cluster: Cluster, digest: Digest, size: int, place: Place | None, join: JoinSwarm
    ) -> Metainfo | FetchAsHolder | FallBack:
        """Download from peers: the metainfo it came by, or what to do instead."""
        outcome: FetchAsHolder | FallBack | None = None
        try:
            for attempt in range(SWARM_ATTEMPTS):
                outcome = None
                try:
                    return await cluster.peers.fetch(digest, size, join)
                except Fallback as e:
                    outcome = FallBack(e.reason, str(e))
                if outcome.reason != "peers_stalled" or attempt + 1 == SWARM_ATTEMPTS:
                    break
                # The peers that stalled us are reported: the tracker sends us to
                # the swarm again only for a seeder we did not report; else the
                # lease, or a wait for the node that holds it.
                again = await self._await_lease(cluster, digest, size, place)
                log.info("blob %s: every peer stalled us; the tracker now says %s",
                         digest, type(again).__name__)  # fmt: skip
                if not isinstance(again, JoinSwarm):
                    outcome = again
                    break
                if again.metainfo != join.metainfo:  # another torrent: the pieces are no use
                    cluster.swarm.remove(digest)
                join = again
        finally:
            # A download given up on leaves nothing behind (the one kept after
            # `peers_stalled` for another try included): the upstream copy is
            # seeded anew.
            if outcome is not None:
                cluster.swarm.remove(digest)
        assert outcome is not None  # the loop ends only by a break after setting it
        return outcome

    async def _as_holder(
        self,
        cluster: Cluster,
        renewals: Renewals,
        size: int,
        upstream: UpstreamSeam,
        repository: str,
    ) -> int:
        """Fetch from upstream while holding the lease, cutting chunk torrents as the
        bytes arrive; give the lease back if that fails.

        The renewals go on after the fetch, until the lease is released.
        """
        tracker = cluster.tracker
        digest, lease_id = renewals.digest, renewals.lease.lease_id
        self._nursery.start_soon(renewals.run)
        try:
            verify = renewals.lease.verify
            async with publishing(cluster.chunks, digest, size, verify=verify) as chunks:
                size = await self._from_upstream(
                    upstream, repository, digest, renewals.progress, chunks
                )
        except BaseException:
            renewals.stop()
            with trio.CancelScope(shield=True), trio.move_on_after(RELEASE_ON_FAILURE_S):
                await release(tracker, digest, lease_id)
            raise
        renewals.fetched(size)
        # Off the upstream link now: tell the tracker, which lets the image's
        # next blob start while this one is published and spreads.
        try:
            await tracker.renew_lease(digest, lease_id, size, size)
        except tracker_errors.TrackerError as e:
            log.info("reporting the upstream fetch of %s done: %s", digest, e)
        return size

    async def _share(self, cluster: Cluster, digest: Digest, size: int) -> None:
        """Seed a small blob fetched from upstream, if no node defined its torrent yet:
        only the lease holder may, and a SEEDED or WAIT reply says another did or does."""
        try:
            reply = await cluster.tracker.acquire_lease(digest, size=size)
        except tracker_errors.TrackerError as e:
            log.info("blob %s: not shared with the cluster: %s", digest, e)
            return
        if reply.status is not LeaseStatus.GRANTED or not reply.lease_id:
            return
        lease = FetchAsHolder(reply.lease_id, reply.ttl_s, silence_s=reply.silence_s)
        renewals = Renewals(cluster.tracker, digest, lease, size)
        renewals.fetched(size)
        self._nursery.start_soon(renewals.run)
        try:
            await cluster.seeding.publish(digest, size)
        except Exception as e:  # evicted meanwhile, a full disk: the blob was served anyway
            renewals.stop()
            log.warning("blob %s: not shared with the cluster: %s", digest, e)
            with trio.CancelScope(shield=True), trio.move_on_after(RELEASE_ON_FAILURE_S):
                await release(cluster.tracker, digest, reply.lease_id)
            return
        await self._release_once_seeding(cluster, renewals)

    async def _release_once_seeding(self, cluster: Cluster, renewals: Renewals) -> None:
        # Hold the lease until the tracker counts us as a seeder: released any
        # sooner, the next asker would find no seeder and fetch upstream again.
        # The client that asked for the blob does not wait for this.
        digest = renewals.digest
        try:
            if not await cluster.swarm.wait_announced(digest, ANNOUNCE_WAIT_S):
                log.warning("no announce of %s acknowledged within %.0f s",
                            digest, ANNOUNCE_WAIT_S)  # fmt: skip
        finally:
            renewals.stop()
        await release(cluster.tracker, digest, renewals.lease.lease_id)

    # -- the seed registry --------------------------------------------------------

    async def _from_upstream(
        self,
        upstream: UpstreamSeam,
        repository: str,
        digest: Digest,
        progress: Progress,
        chunks: ChunkPublisher | None = None,
    ) -> int:
        for attempt in range(1, MISMATCH_ATTEMPTS + 1):
            writer = self._store.writer(digest)
            sink = _StoreSink(writer, self._offload, progress, chunks if attempt == 1 else None)
            try:
                await upstream.fetch_blob(repository, digest, sink)
                await sink.flush()
                size = await self._offload(writer.finish)
            except DigestMismatch as e:
                if chunks is not None:  # what was cut and filed is not the blob's
                    chunks.stop()
                self._metrics.digest_mismatches.inc()
                log.warning("blob %s: upstream sent bad bytes (attempt %d): %s", digest, attempt, e)
                continue
            except NoSpace as e:
                writer.abort()
                raise StoreFull(f"no space to store blob {digest}: {e}") from None
            except StoreError as e:
                writer.abort()
                raise UpstreamError(f"cannot store blob {digest}: {e}") from None
            except BaseException:
                writer.abort()
                raise
            try:
                writer.commit()
            except NoSpace as e:
                writer.abort()
                raise StoreFull(str(e)) from None
            return size
        raise UpstreamError(f"seed registry kept sending bytes that do not match {digest}")
