"""A waiter's side of chunk swarms: join each chunk's swarm as it is filed, assemble, verify.

`ChunkFollower` reads the blob's chunk list while the node waits for the lease
(a long poll the tracker answers as a chunk is filed), joins each chunk's swarm
as it appears (its peers come with the list: localanswers.py), checks each chunk
against its digest, and serves the chunks it holds to its peers. Nothing
reaches a client before the whole blob is verified: the chunks are copied, in
order, into a store writer as they come in (the whole-blob hash runs alongside
the downloads), and only a match enters the store; a mismatch drops the chunks
and reports their publisher to the tracker, and the wait for the lease goes on
(the tracker passes the fetch to another node). It must not decide where a
blob comes from (fetch.py does), cut or file chunks (chunks.py does), hold a
blob in memory, or serve anything.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio

from p2preg.core import errors as tracker_errors
from p2preg.core import wire
from p2preg.core.digest import Digest, DigestError
from p2preg.core.metainfo import MAX_CHUNKS, MetainfoError, chunk_count, chunk_length
from p2preg.node.chunks import Chunking
from p2preg.node.peers import file_digest
from p2preg.node.seams import SwarmError
from p2preg.node.store import BlobWriter, DigestMismatch, StoreError
from tracker.metainfo import parse_metainfo

log = logging.getLogger(__name__)

# A waiter's read of the chunk list is a long poll held this long at most (the stall
# bound is shorter: then that), answered as soon as a chunk is filed or the list closes.
POLL_WAIT_S = 10
# The pace of reads answered at once with nothing new (past the tracker's long-poll
# cap, a closed list, or a publisher already tried), while chunks come and before.
POLL_S = 0.25
POLL_IDLE_S = 0.5
# A follower joins chunks it has just heard of after a random wait below this. One
# filing answers every waiter's long poll at the same instant; joined in step, they all
# ask the chunk's one seeder, the holder, for the same first pieces, and the holder's
# upstream copy slowed by a tenth (N = 8: 17.7 s became 19.6 s; BENCHMARKS.md, "Waiters
# out of step"). Spread out, the later ones take pieces from the earlier ones.
JOIN_SPREAD_S = 0.25
# A tracker's `retry_after_s` on a chunk list (it runs behind) paces the next read,
# for at most this long: a tracker cannot hold a follower's reads back further.
READ_PACE_MAX_S = 5.0
# Chunk downloads one follower runs at once.
MAX_IN_FLIGHT = 16
# Publishers one wait follows (a second after the first one's chunks failed).
FOLLOW_ATTEMPTS = 2
COPY_BATCH = 1 << 20


class ChunkFailed(Exception):
    """Following a publisher's chunks ends without the blob; says why."""


@dataclass
class ChunkFollower:
    """A waiter's side: join each chunk's swarm as it is filed, then assemble and verify."""

    c: Chunking
    blob: Digest
    size: int
    # Set while chunks of one publisher are being fetched or assembled.
    following: bool = False
    assembled: bool = False
    # Set when the current attempt (one publisher's chunks) is over, and at the end.
    attempt_over: trio.Event = field(default_factory=trio.Event)
    _joined: list[Digest] = field(default_factory=list)

    async def run(self) -> bool:
        """Follow up to FOLLOW_ATTEMPTS publishers; whether the blob is in the store."""
        tried: set[str] = {self.c.tracker.node}
        try:
            for _ in range(FOLLOW_ATTEMPTS):
                listing = await self._first_listing(tried)
                tried.add(listing.publisher)
                self.following, self.attempt_over = True, trio.Event()
                writer: BlobWriter | None = None
                try:
                    writer = self.c.store.writer(self.blob)
                    await self._download(listing, writer)
                    self.assembled = await self._verify(listing, writer)
                except* (ChunkFailed, StoreError) as group:
                    log.warning("chunks of %s by %r: %s", self.blob, listing.publisher,
                                "; ".join(str(e) for e in group.exceptions))  # fmt: skip
                finally:
                    if writer is not None and not self.assembled:
                        writer.abort()
                    self.following = False
                    self.attempt_over.set()
                if self.assembled:
                    return True
                self._drop()
            return False
        finally:
            if not self.assembled:
                self._drop()
            self.attempt_over.set()

    async def _first_listing(self, tried: set[str]) -> wire.ChunkList:
        """Wait (until cancelled) for chunks of this blob by a publisher not yet tried
        that still holds the lease: once it let go, the whole blob is seeded, and
        the lease wait joins that swarm."""
        while True:
            listing = await self._listing(0)
            if (listing is not None and listing.open and listing.digests
                    and listing.publisher not in tried):  # fmt: skip
                return listing
            await trio.sleep(POLL_IDLE_S)

    async def _listing(
        self, have: int, known: wire.ChunkList | None = None
    ) -> wire.ChunkList | None:
        """The list once it has more than `have` chunks, closes, or the wait runs out;
        `known` (the last one read) if the tracker did not answer (a replica taking
        over keeps the list: the stall bound decides)."""
        c = self.c
        wait_s = max(1, min(POLL_WAIT_S, math.floor(c.settings.stall_s)))
        try:
            listing = await c.tracker.list_chunks(self.blob, have=have, wait_s=wait_s)
        except tracker_errors.TrackerError as e:
            log.info("reading the chunks of %s: %s", self.blob, e)
            return known
        if listing is None or listing.size != self.size:
            return None
        cut = listing.chunk_bytes
        if cut < 1 << 20 or chunk_count(self.size, cut) > MAX_CHUNKS:
            return None
        if listing.peers is not None:
            c.answers.learn(self.blob, listing.peers)
        return listing

    async def _download(self, first: wire.ChunkList, writer: BlobWriter) -> None:
        """Every chunk of `first`'s publisher, each checked against its digest and fed,
        in order, to `writer` as soon as it and those before it are in."""
        count = -(-self.size // first.chunk_bytes)
        got: dict[int, Path] = {}
        ready = [trio.Event() for _ in range(count)]
        all_in = trio.Event()
        limiter = trio.CapacityLimiter(MAX_IN_FLIGHT)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._feed, writer, got, ready)
            listing: wire.ChunkList | None = first
            known, idle_since = 0, trio.current_time()
            # Until every chunk is in: a report (or a new holder) that drops these
            # records stops the downloads now, not a stall later.
            while len(got) < count:
                if listing is None or listing.publisher != first.publisher or not listing.digests:
                    raise ChunkFailed("the chunk list is gone, or by another publisher now")
                if len(listing.digests) > known:
                    await trio.sleep(random.uniform(0, JOIN_SPREAD_S))
                for i in range(known, min(count, len(listing.digests))):
                    nursery.start_soon(self._join, listing, i, got, ready, all_in, limiter)
                    known, idle_since = i + 1, trio.current_time()
                if known < count and not listing.open:
                    raise ChunkFailed(f"its publisher stopped at chunk {known} of {count}")
                if known < count and trio.current_time() - idle_since > self.c.settings.stall_s:
                    raise ChunkFailed(f"no new chunk for {self.c.settings.stall_s:.0f} s")
                if not listing.open:
                    # Every chunk named and none to come: the downloads decide (a list
                    # read now answers at once, so reading on would be polling).
                    await all_in.wait()
                    break
                before = len(listing.digests)
                with trio.move_on_after(read_pace(listing)):  # a tracker behind sheds reads
                    await all_in.wait()
                listing = await self._next(known, listing, all_in)
                if listing is not None and len(listing.digests) <= before:
                    with trio.move_on_after(POLL_S):  # nothing new: pace the next read
                        await all_in.wait()

    async def _next(
        self, have: int, last: wire.ChunkList, all_in: trio.Event
    ) -> wire.ChunkList | None:
        """The next read of the list (a long poll), or `last` once every chunk is in."""
        found: list[wire.ChunkList | None] = [last]
        async with trio.open_nursery() as nursery:

            async def read() -> None:
                found[0] = await self._listing(have, last)
                nursery.cancel_scope.cancel()

            async def done() -> None:
                await all_in.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(read)
            nursery.start_soon(done)
        return found[0]

    async def _feed(
        self, writer: BlobWriter, got: dict[int, Path], ready: list[trio.Event]
    ) -> None:
        # The whole-blob hash runs alongside the downloads, not after the last one.
        for i, event in enumerate(ready):
            await event.wait()
            await self.c.offload(partial(_copy_into, got[i], writer.write))

    async def _join(
        self,
        listing: wire.ChunkList,
        i: int,
        got: dict[int, Path],
        ready: list[trio.Event],
        all_in: trio.Event,
        limiter: trio.CapacityLimiter,
    ) -> None:
        c = self.c
        length = chunk_length(self.size, listing.chunk_bytes, i)
        try:
            digest = Digest.parse(listing.digests[i])
            meta = parse_metainfo(listing.metainfo[i], digest, length, roots=c.roots.roots())
        except (DigestError, MetainfoError) as e:
            raise ChunkFailed(f"chunk {i}: {e}") from None
        async with limiter:
            # A tracker that hands out the chunk swarms' peers with the list is
            # announced nothing for them (localanswers.py); a stalling peer is then
            # reported as a peer of the blob's chunk swarms, where the tracker has it.
            local = listing.peers is not None and digest not in c.swarm
            if local:
                c.answers.follow(meta, self.blob)
            self._joined.append(digest)
            try:
                path = await c.swarm.download(meta, stall_s=c.settings.stall_s,
                                              max_hash_failures=c.settings.max_hash_failures,
                                              report_as=self.blob if local else None)
            except SwarmError as e:
                raise ChunkFailed(f"chunk {i}: {e}") from None
            if await c.offload(partial(file_digest, path, digest.algorithm)) != digest:
                raise ChunkFailed(f"chunk {i} does not hash to its digest")
        c.metrics.chunks_joined.inc()
        c.metrics.chunk_bytes.inc(length)
        got[i] = path
        ready[i].set()
        if len(got) == len(ready):
            all_in.set()

    async def _verify(self, listing: wire.ChunkList, writer: BlobWriter) -> bool:
        """The assembled chunks hash to the blob: into the store; else report them."""
        c = self.c
        try:
            await c.offload(writer.finish)
        except DigestMismatch as e:
            c.metrics.chunks_assembled.labels("mismatch").inc()
            await self._report(listing.publisher, str(e))
            raise ChunkFailed(f"assembled, they do not hash to the blob: {e}") from None
        writer.commit()
        c.metrics.chunks_assembled.labels("verified").inc()
        c.linger(list(self._joined))
        self._joined.clear()
        return True

    async def _report(self, publisher: str, reason: str) -> None:
        try:
            await self.c.tracker.report_chunks(self.blob, publisher, reason)
        except tracker_errors.TrackerError as e:
            log.warning("reporting the chunks of %s: %s", self.blob, e)

    def _drop(self) -> None:
        for chunk in self._joined:
            self.c.drop(chunk)
        self._joined.clear()


def read_pace(listing: wire.ChunkList) -> float:
    """How long to wait before reading the chunk list again: the tracker's
    `retry_after_s`, within 0 and `READ_PACE_MAX_S`."""
    pace = listing.retry_after_s
    return min(pace, READ_PACE_MAX_S) if pace > 0 else 0.0  # NaN and negatives: 0


def _copy_into(path: Path, write: Callable[[bytes], None]) -> None:
    with open(path, "rb") as f:
        while data := f.read(COPY_BATCH):
            write(data)
