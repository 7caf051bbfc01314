"""The tracker's chunk-torrent service: file, list and report a blob's chunk torrents.

`ChunkTorrents` applies chunks.py's book to one request at a time: it checks
the sender against the blob's lease (only its holder, GRANTED or VERIFY,
files chunks), the chunk's torrent against the cluster's torrent rules (under
the chunk's own digest and length), the sender against the dispute
quarantines, and registers each chunk torrent so that its swarm's announces
count; records dropped (expired, evicted, reported, or cut over by a new
holder) have their torrents unregistered and their swarms dropped. Every
change to the book — records, disputes, barred publishers, a verdict's
quarantine — is committed to the store before the request is answered
(chunk_sync.py), and loaded back at start or at a replica's new term, so a
restart or a takeover keeps the waiters' lists and an open dispute. A report opens a chunk dispute
(chunks.py), judged as a metainfo dispute is: the records are set aside, a
side holding the blob's lease loses it, the next lease on the blob goes to a
node that is neither side as VERIFY (coordinator.py), and the chunks it files
from its upstream copy convict the publisher or the reporter, who is
quarantined (disputes.py's `Quarantines`). A lying report costs one upstream
copy; the honest publisher keeps its records. Each read of the list enters the
reader as a peer of the blob's chunk swarms and names the others (a filing enters
the holder), so a reader announces none of the chunk torrents (swarms.py
`join_chunks`). It must not know HTTP or encodings, and raises only
`p2preg.core.errors`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable, Iterable

from p2preg.core import errors, wire
from p2preg.core.metainfo import Metainfo, chunk_length
from tracker.chunk_store import ChunkWrite, StoredChunkBlob
from tracker.chunk_sync import ChunkSync
from tracker.chunks import ChunkBook, ChunkDispute
from tracker.disputes import OPENED, Quarantines
from tracker.leases import Lease
from tracker.metrics import TrackerMetrics
from tracker.registry import MetainfoRegistry
from tracker.swarms import Swarms, checked_digest

log = logging.getLogger("p2preg.tracker")
# Labels of p2preg_tracker_chunk_polls_total.
POLL_AT_ONCE, POLL_NEWS, POLL_TIMED_OUT = "at_once", "news", "timed_out"
# A reader is asked to wait the tracker's lag before its next read of a chunk list,
# once the lag reaches READ_PACE_FROM_S (the lag meter's own resolution is 0.05 s),
# and at most READ_PACE_MAX_S.
READ_PACE_FROM_S = 0.1
READ_PACE_MAX_S = 5.0


@dataclasses.dataclass(frozen=True, slots=True)
class ChunkPeer:
    """Who reads a chunk list or files a chunk (its identity, as for an announce), and
    where its peer listens."""

    who: str
    ip: str
    port: int


def read_pace(lag_s: float) -> float:
    """How long a chunk-list reader should wait before reading again: the tracker's lag
    once it runs behind, 0 while it keeps up. Every waiter reads the list again as each
    chunk is filed, so reads grow with the nodes times the chunks (docs/TRACKER.md,
    "Chunk torrents"); a reader that would wait the lag in the tracker's queue anyway
    waits it at home instead, and its next answer carries whatever was filed meanwhile."""
    return min(READ_PACE_MAX_S, lag_s) if lag_s >= READ_PACE_FROM_S else 0.0


class ChunkTorrents:
    def __init__(
        self,
        registry: MetainfoRegistry,
        quarantines: Quarantines,
        metrics: TrackerMetrics,
        *,
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
        put: Callable[[list[ChunkWrite]], Awaitable[None]],
        max_metainfo: int,
        validate: Callable[[str, int, bytes], Metainfo],
        lease_of: Callable[[str], Lease | None],
        drop_lease: Callable[..., Awaitable[None]],
        drop_swarm: Callable[[str], None],
        notify: Callable[[str], None],
        wait: Callable[[str, float], Awaitable[None]],
        lag: Callable[[], float],
        swarms: Swarms,
    ) -> None:
        self.book = ChunkBook(clock)
        self.sync = ChunkSync(self.book, put, clock=clock, wall_clock=wall_clock)
        self._registry = registry
        self._quarantines = quarantines
        self._metrics = metrics
        self._max_metainfo = max_metainfo
        self._validate = validate
        self._lease_of = lease_of
        self._drop_lease = drop_lease
        self._drop_swarm = drop_swarm
        self._notify = notify
        self._wait = wait
        self._lag = lag
        self._swarms = swarms
        self._clock = clock
        # Chunk digests whose torrent this service registered (and so may unregister).
        self._mine: set[str] = set()

    def _holder(self, blob: str) -> str | None:
        lease = self._lease_of(blob)
        return None if lease is None else lease.holder

    async def publish(
        self, blob_text: str, msg: wire.PublishChunk, holder: ChunkPeer | None = None
    ) -> bool:
        """File one chunk torrent of a blob; whether it is new. `holder`: where the
        sender's peer listens, handed out to the list's readers."""
        blob = checked_digest(blob_text)
        length = self.book.check(blob, msg, self._holder(blob))
        chunk = checked_digest(msg.digest)
        meta = self._validate(chunk, length, msg.metainfo)
        self._quarantines.check(msg.node, "publish chunk torrents")
        entry = self._registry.get(chunk)
        if entry is not None and entry.meta.data != meta.data:
            raise errors.MetainfoConflict(f"chunk {chunk} has another torrent")
        if entry is None:
            if len(self._registry) >= self._max_metainfo:
                raise errors.LimitReached("the tracker's metainfo limit is reached")
            self._registry.install(meta, msg.node)
            self._mine.add(chunk)
        filed = self.book.file(blob, msg, meta.data)
        if holder is not None:
            self._swarms.join_chunks(blob, holder.who, holder.ip, holder.port, holder=True)
        self._unregister(filed.dropped)
        if filed.new:
            self._judge(blob, msg, chunk, length, meta)
        await self.sync.commit()
        if filed.new:
            self._metrics.chunks_published.inc()
            self._notify(blob)
        return filed.new

    async def blob_verified(self, blob: str, node: str) -> None:
        """`node` published `blob`'s torrent: if it holds the lease as a chunk dispute's
        verifier and its chunks decided nothing (it cut otherwise, or not at all), the
        dispute ends unsettled rather than withholding the blob from everyone."""
        if self._holder(blob) == node and self.book.close(blob, node):
            log.warning("tracker: chunk dispute over %s closed unsettled: %r verified the "
                        "blob without chunks to compare", blob, node)  # fmt: skip
            await self.sync.commit()
            self._notify(blob)

    def dispute(self, blob: str) -> ChunkDispute | None:
        return self.book.dispute(blob)

    def _judge(self, blob: str, msg: wire.PublishChunk, chunk: str, length: int,
               meta: Metainfo) -> None:  # fmt: skip
        """Settle `blob`'s chunk dispute if the chunk just filed by a verifier decides it."""
        d = self.book.dispute(blob)
        if d is None or d.party(msg.node):
            return
        same = True
        old = d.records
        if msg.index < len(old.digests) and old.digests[msg.index] == msg.digest:
            try:
                theirs = self._validate(chunk, length, old.metainfo[msg.index])
            except errors.TrackerError:
                theirs = meta  # no longer valid here (a CA rotation): no evidence
            # As disputes.settle: a torrent rooted at another CA is no lie.
            same = theirs.data == meta.data or theirs.root_cert != meta.root_cert
        verdict = self.book.judge(blob, msg, same)
        if verdict is None:
            return
        until = self._quarantines.add(verdict.loser, blob)
        self.sync.quarantined(blob, verdict.loser, until)
        self._metrics.disputes[verdict.outcome].inc()
        log.warning("tracker: chunk dispute over %s %s by %r's verification; quarantined "
                    "for %.0f s: %r", blob, verdict.outcome, msg.node,
                    self._quarantines.period_s, verdict.loser)  # fmt: skip

    def listing(self, blob_text: str) -> wire.ChunkList:
        blob = checked_digest(blob_text)
        return self.book.listing(blob, self._holder(blob))

    async def poll(
        self, blob_text: str, have: int, wait_s: float, reader: ChunkPeer | None = None
    ) -> wire.ChunkList:
        """The chunk list once it lists more than `have` chunks or is closed, or when
        `wait_s` ran out, whatever is there then (NotFound: nothing); a long poll woken
        by what changes a blob's lease or records. A tracker running behind asks the
        reader to pace its next read (`read_pace`). The `reader` is entered as a peer
        of the blob's chunk swarms while there are chunks (from the start of a held
        read on, so that others are handed it), and the list names the others."""
        blob = checked_digest(blob_text)
        deadline, held, entered = self._clock() + wait_s, False, False
        while True:
            try:
                listing: wire.ChunkList | None = self.book.listing(blob, self._holder(blob))
            except errors.NotFound:
                listing = None
            if reader is not None and listing is not None and not entered:
                self._swarms.join_chunks(blob, reader.who, reader.ip, reader.port, holder=False)
                entered = True
            news = listing is not None and (len(listing.digests) > have or not listing.open)
            if news or self._clock() >= deadline:
                answer = (POLL_NEWS if news else POLL_TIMED_OUT) if held else POLL_AT_ONCE
                self._metrics.chunk_polls.labels(answer).inc()
                if listing is None:
                    raise errors.NotFound(f"no chunk torrents of {blob}")
                peers = self._chunk_peers(blob, listing.publisher, reader)
                return dataclasses.replace(listing, retry_after_s=read_pace(self._lag()),
                                           peers=peers)  # fmt: skip
            await self._wait(blob, deadline)
            held = True

    def _chunk_peers(
        self, blob: str, publisher: str, reader: ChunkPeer | None
    ) -> list[bytes] | None:
        """The peers a read of `blob`'s list names; None while its publisher is not in
        the chunk swarms (an older node, which named no port and announces its chunk
        torrents: then so must the readers, or they would never find it)."""
        if self._swarms.chunk_peers.peer(blob, publisher) is None:
            return None
        return self._swarms.hand_out_chunks(blob, None if reader is None else reader.who)

    async def report(self, blob_text: str, msg: wire.ReportChunks) -> None:
        """`msg.node` assembled the chunks and they do not hash to the blob."""
        blob = checked_digest(blob_text)
        self._quarantines.check(msg.node, "report chunks")
        dropped = self.book.report(blob, msg.publisher, msg.node)
        if dropped is None:
            return
        self._unregister(dropped)
        # Its chunk swarms start over with the verifier's chunks (their readers enter
        # again as they read): nobody is handed the accused as their holder any more.
        self._swarms.chunk_peers.drop_swarm(blob)
        self._metrics.chunk_reports.inc()
        self._metrics.disputes[OPENED].inc()
        log.warning("tracker: %r reports %r's chunks of %s bad (%s); a third node verifies",
                    msg.node, msg.publisher, blob, msg.reason[:200])  # fmt: skip
        lease = self._lease_of(blob)
        d = self.book.dispute(blob)
        try:
            if lease is not None and d is not None and d.party(lease.holder):
                # A side's fetch cannot settle it: free the lease for a node that can. The
                # publisher has every chunk filed, so every byte: if the report lied, the
                # whole-blob torrent it still finishes counts, as a silent holder's does.
                await self._drop_lease(lease, passed=lease.holder == d.published_by)
        finally:
            self._notify(blob)
            await self.sync.commit()  # the dispute is durable before the answer

    async def expire(self) -> None:
        self._unregister(self.book.expire())
        await self.sync.commit()

    def restore(self, blobs: Iterable[StoredChunkBlob]) -> None:
        """Load what the store kept: records (their chunk torrents registered again, up to
        the first that no longer validates), disputes and barred publishers."""
        for kept in blobs:
            r, rec, whole = kept.records, None, True
            if r is not None:
                count = self._register(r.size, r.chunk_bytes, r.publisher, r.digests, r.metainfo)
                rec, whole = self.sync.records(r, count), count == len(r.digests)
            dispute = None if kept.dispute is None else self.sync.dispute(kept.dispute)
            self.book.restore(kept.blob, rec, dispute, kept.barred)
            if whole:
                self.sync.loaded(kept.blob)
            else:
                self.book.dirty.add(kept.blob)  # the next commit rewrites it whole

    def _register(self, size: int, cut: int, publisher: str, digests: Iterable[str],
                  metainfo: Iterable[bytes]) -> int:  # fmt: skip
        """Register stored chunk torrents again; how many, in order, still validate."""
        count = 0
        for i, (chunk, data) in enumerate(zip(digests, metainfo, strict=True)):
            try:
                meta = self._validate(chunk, chunk_length(size, cut, i), data)
            except errors.TrackerError:
                break
            entry = self._registry.get(chunk)
            if entry is None:
                if len(self._registry) >= self._max_metainfo:
                    break
                self._registry.install(meta, publisher)
                self._mine.add(chunk)
            elif entry.meta.data != meta.data:
                break
            count += 1
        return count

    def _unregister(self, chunks: list[str]) -> None:
        for chunk in chunks:
            if chunk in self._mine and self._registry.dispute(chunk) is None:
                self._mine.discard(chunk)
                self._registry.remove(chunk)
                self._drop_swarm(chunk)
