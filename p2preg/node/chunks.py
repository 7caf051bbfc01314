"""Chunk swarms: a big blob spreads in chunks while its first copy comes from upstream.

Owns both sides of chunk torrents (docs/SWARM.md, "Chunk swarms"). The lease
holder cuts the blob as its bytes arrive (`ChunkPublisher`): each chunk —
`chunk_bytes` rounded to the blob's piece size, from `min_count` chunks up —
is written to its own file, and once complete its torrent (made from its bytes,
named by its own digest: anyone holding the verified blob makes the same one)
is filed with the tracker under the blob's digest, in order, and seeded. A
waiter (`ChunkFollower`) reads the blob's chunk list while it waits for the
lease (a long poll the tracker answers as a chunk is filed), joins each chunk's
swarm as it appears, checks each chunk against its
digest, and serves the chunks it holds to its peers. Nothing reaches a client
before the whole blob is verified: the chunks are copied, in order, into a
store writer as they come in (the whole-blob hash runs alongside the
downloads), and only a match enters the store; a mismatch drops the chunks
and reports their publisher to the tracker, and the wait for the lease goes
on (the tracker passes the fetch to another node). Chunk
torrents are dropped `linger_s` after their blob is complete, for the nodes
still mid-chunk. It must not decide where a blob comes from (fetch.py does),
hold a blob in memory, or serve anything.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import BinaryIO, Protocol

import trio

from p2preg.core import errors as tracker_errors
from p2preg.core import wire
from p2preg.core.digest import Digest, DigestError, Hasher
from p2preg.core.metainfo import (
    MAX_CHUNKS,
    MetainfoError,
    chunk_count,
    chunk_length,
    piece_size_for,
)
from p2preg.node.metrics import NodeMetrics
from p2preg.node.peers import file_digest
from p2preg.node.peertls import TorrentRoots
from p2preg.node.seams import Offload, SwarmError, SwarmSeam
from p2preg.node.store import BlobStore, BlobWriter, DigestMismatch, StoreError
from tracker.metainfo import make_metainfo, parse_metainfo

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
# The holder's chunks still to file once the blob is verified: this long at most.
DRAIN_S = 30.0
COPY_BATCH = 1 << 20


class ChunkTracker(Protocol):
    """The tracker's chunk routes as the node uses them (tracker.client.TrackerClient)."""

    @property
    def node(self) -> str: ...

    async def publish_chunk(self, blob: Digest, msg: wire.PublishChunk) -> None: ...

    async def list_chunks(
        self, blob: Digest, *, have: int = 0, wait_s: int = 0
    ) -> wire.ChunkList | None: ...

    async def report_chunks(self, blob: Digest, publisher: str, reason: str) -> None: ...


@dataclass(frozen=True)
class ChunkSettings:
    chunk_bytes: int
    min_count: int
    stall_s: float
    max_hash_failures: int
    linger_s: float = 120.0

    def cut_for(self, size: int) -> int | None:
        """The chunk size of a `size`-byte blob, or None if it moves whole."""
        if size <= 0:
            return None
        piece = piece_size_for(size)
        chunk = max(piece, self.chunk_bytes // piece * piece)
        # Whole chunks, so that a blob just over one chunk moves whole.
        whole, count = size // chunk, chunk_count(size, chunk)
        return chunk if whole >= self.min_count and count <= MAX_CHUNKS else None


@dataclass(frozen=True)
class Cut:
    index: int
    path: Path
    digest: Digest
    length: int


class Cutter:
    """Blocking: writes a blob's bytes, as they come, into one file per chunk."""

    def __init__(self, blob: Digest, size: int, chunk_bytes: int, work_dir: Path) -> None:
        self._prefix = work_dir / f"{blob.hex[:16]}"
        self._size, self._chunk = size, chunk_bytes
        self._index, self._done = 0, 0
        self._file: BinaryIO | None = None
        self._hasher = Hasher("sha256")

    def write(self, data: bytes) -> list[Cut]:
        """Write `data`; the chunks it completed."""
        cuts: list[Cut] = []
        view = memoryview(data)
        while view:
            want = chunk_length(self._size, self._chunk, self._index) - self._done
            if want <= 0:
                raise StoreError("upstream sent more bytes than the blob's size")
            if self._file is None:
                self._file = open(self._path(), "wb")  # noqa: SIM115 (closed at the cut)
            part, view = view[:want], view[want:]
            self._file.write(part)
            self._hasher.update(part)
            self._done += len(part)
            if self._done == chunk_length(self._size, self._chunk, self._index):
                self._file.close()
                self._file = None
                cuts.append(Cut(self._index, self._path(), self._hasher.digest(), self._done))
                self._index, self._done, self._hasher = self._index + 1, 0, Hasher("sha256")
        return cuts

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self._path().unlink(missing_ok=True)

    def _path(self) -> Path:
        return Path(f"{self._prefix}-{self._index}.part")


@dataclass
class Chunking:
    """What both sides need: the node's swarm, tracker, store and settings."""

    settings: ChunkSettings
    tracker: ChunkTracker
    swarm: SwarmSeam
    store: BlobStore
    metrics: NodeMetrics
    roots: TorrentRoots
    work_dir: Path
    offload: Offload
    nursery: trio.Nursery

    def linger(self, chunks: list[Digest]) -> None:
        """Keep seeding `chunks` for the nodes still mid-chunk, then drop them."""
        if chunks:
            self.nursery.start_soon(self._drop_later, chunks)

    async def _drop_later(self, chunks: list[Digest]) -> None:
        await trio.sleep(self.settings.linger_s)
        for chunk in chunks:
            if self.store.size(chunk) is None:  # (a blob of those very bytes stays)
                self.swarm.remove(chunk)


class ChunkPublisher:
    """The holder's side: cut, file and seed the chunks while the blob arrives."""

    def __init__(self, c: Chunking, blob: Digest, size: int, chunk_bytes: int) -> None:
        self._c, self._blob, self._size, self._chunk_bytes = c, blob, size, chunk_bytes
        self._cutter = Cutter(blob, size, chunk_bytes, c.work_dir)
        self._send, self._recv = trio.open_memory_channel[Cut](math.inf)
        self._stopped = False
        self.seeded: list[Digest] = []

    async def feed(self, batch: bytes) -> None:
        """Bytes of the blob, in order, as they reach the store's writer."""
        if self._stopped:
            return
        for cut in await self._c.offload(partial(self._cutter.write, batch)):
            self._send.send_nowait(cut)

    def stop(self) -> None:
        """File nothing more (upstream starts over, or the fetch failed)."""
        self._stopped = True
        self._send.close()

    async def run(self) -> None:
        async with self._recv:
            async for cut in self._recv:
                if not self._stopped:
                    await self._file(cut)
                cut.path.unlink(missing_ok=True)

    async def _file(self, cut: Cut) -> None:
        c = self._c
        make = partial(make_metainfo, cut.path, cut.digest, cut.length, root=c.roots.root())
        try:
            meta = await c.offload(make)
            msg = wire.PublishChunk(c.tracker.node, self._size, self._chunk_bytes, cut.index,
                                    str(cut.digest), meta.data)  # fmt: skip
            await c.tracker.publish_chunk(self._blob, msg)
        except (MetainfoError, tracker_errors.TrackerError) as e:
            # The waiters then take the whole blob once it is verified, as before.
            log.warning("chunk %d of %s not filed (%s); no more chunks of it", cut.index,
                        self._blob, e)  # fmt: skip
            self._stopped = True
            return
        if cut.digest not in c.swarm:
            c.swarm.seed(meta, cut.path)
            self.seeded.append(cut.digest)
        c.metrics.chunks_published.inc()


async def disputed_cut(c: Chunking, blob: Digest, size: int) -> int | None:
    """The `chunk_bytes` of `blob`'s disputed chunks, which a verifier cuts alike whatever
    its own setting (else its chunks decide nothing); None if the tracker names none."""
    try:
        listing = await c.tracker.list_chunks(blob)
    except tracker_errors.TrackerError as e:
        log.info("reading the disputed cut of %s: %s", blob, e)
        return None
    if listing is None or listing.size != size:
        return None
    cut = listing.chunk_bytes
    valid = 1 << 20 <= cut <= 64 << 20 and 2 <= chunk_count(size, cut) <= MAX_CHUNKS
    return cut if valid else None


@asynccontextmanager
async def publishing(
    c: Chunking | None, blob: Digest, size: int, *, verify: bool = False
) -> AsyncIterator[ChunkPublisher | None]:
    """A publisher for a blob fetched from upstream as the lease holder (None: it moves
    whole); on the way out the chunks cut are filed (for up to DRAIN_S) and left to linger.
    A verifier (`verify`) cuts as the disputed publisher did, if the tracker says how."""
    chunk_bytes = None if c is None else c.settings.cut_for(size)
    if c is not None and verify:
        chunk_bytes = await disputed_cut(c, blob, size) or chunk_bytes
    if c is None or chunk_bytes is None:
        yield None
        return
    pub = ChunkPublisher(c, blob, size, chunk_bytes)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pub.run)
            try:
                yield pub
            except BaseException:
                pub.stop()
                raise
            pub._send.close()
            nursery.cancel_scope.deadline = trio.current_time() + DRAIN_S
    finally:
        await c.offload(pub._cutter.close)
        c.linger(pub.seeded)


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
        wait_s = max(1, min(POLL_WAIT_S, math.floor(self.c.settings.stall_s)))
        try:
            listing = await self.c.tracker.list_chunks(self.blob, have=have, wait_s=wait_s)
        except tracker_errors.TrackerError as e:
            log.info("reading the chunks of %s: %s", self.blob, e)
            return known
        if listing is None or listing.size != self.size:
            return None
        cut = listing.chunk_bytes
        if cut < 1 << 20 or chunk_count(self.size, cut) > MAX_CHUNKS:
            return None
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
            self._joined.append(digest)
            try:
                path = await c.swarm.download(meta, stall_s=c.settings.stall_s,
                                              max_hash_failures=c.settings.max_hash_failures)
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
            if self.c.store.size(chunk) is None:
                self.c.swarm.remove(chunk)
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
