"""Chunk swarms: a big blob spreads in chunks while its first copy comes from upstream.

Owns the holder's side of chunk torrents (docs/SWARM.md, "Chunk swarms"; the
waiters' side is chunkfollow.py) and what both sides share (`Chunking`). The
lease holder cuts the blob as its bytes arrive (`ChunkPublisher`): each chunk —
`chunk_bytes` rounded to the blob's piece size, from `min_count` chunks up —
is written to its own file, and once complete its torrent (made from its bytes,
named by its own digest: anyone holding the verified blob makes the same one)
is filed with the tracker under the blob's digest, in order, and seeded. Chunk
torrents are dropped `linger_s` after their blob is complete, for the nodes
still mid-chunk. It must not decide where a blob comes from (fetch.py does),
hold a blob in memory, or serve anything.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import BinaryIO, Protocol

import trio

from p2preg.core import errors as tracker_errors
from p2preg.core import wire
from p2preg.core.digest import Digest, Hasher
from p2preg.core.metainfo import (
    MAX_CHUNKS,
    MetainfoError,
    chunk_count,
    chunk_length,
    piece_size_for,
)
from p2preg.node.localanswers import LocalAnswers
from p2preg.node.metrics import NodeMetrics
from p2preg.node.peertls import TorrentRoots
from p2preg.node.seams import Offload, SwarmSeam
from p2preg.node.store import BlobStore, StoreError
from tracker.metainfo import make_metainfo

log = logging.getLogger(__name__)

# The holder's chunks still to file once the blob is verified: this long at most.
DRAIN_S = 30.0


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
    # The announces the relay answers itself (relay.py shares it).
    answers: LocalAnswers = field(default_factory=LocalAnswers)

    def linger(self, chunks: list[Digest]) -> None:
        """Keep seeding `chunks` for the nodes still mid-chunk, then drop them."""
        if chunks:
            self.nursery.start_soon(self._drop_later, chunks)

    async def _drop_later(self, chunks: list[Digest]) -> None:
        await trio.sleep(self.settings.linger_s)
        for chunk in chunks:
            self.drop(chunk)

    def drop(self, chunk: Digest) -> None:
        """Leave `chunk`'s swarm (a blob of those very bytes stays, announced again)."""
        kept = self.store.size(chunk) is not None
        if not kept:
            self.swarm.remove(chunk)
        if self.answers.forget(chunk) and kept:
            self.swarm.reannounce(chunk)


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
                                    str(cut.digest), meta.data, c.swarm.listen_port)  # fmt: skip
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
