"""The chunk torrents of blobs still being fetched from upstream, as a bounded book.

Owns the tracker's rules for chunk records (docs/TRACKER.md, "Chunk torrents"):
the node holding a blob's upstream lease (GRANTED or VERIFY) files the torrent
of each chunk of it, in order, as the chunk arrives; waiters read the list and
join each chunk's swarm. A chunk record is a function of the blob's bytes and
the chunk's place (index, `chunk_bytes`, the blob's size): anyone holding the
verified blob can make it again. The book keeps at most `MAX_CHUNKED_BLOBS`
blobs (the least recently touched goes first) of at most `MAX_CHUNKS` chunks,
each for `RECORD_TTL_S` after its last change. A report that the chunks do not
assemble into the blob opens a `ChunkDispute`: the records are set aside (no
longer listed) until a node that is neither side fetches the blob upstream
(VERIFY) and files its own chunks, which `judge` compares one by one with the
ones set aside: the first that differs convicts the publisher (barred from
filing chunks of that blob again), the last that matches the reporter (and the
publisher's records are listed again). This module is sans-IO over a clock; it
must not parse metainfo, touch the registry or the store (chunk_torrents.py and
chunk_sync.py do), or know HTTP.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from p2preg.core import errors, wire
from p2preg.core.metainfo import MAX_CHUNKS, chunk_count, chunk_length

# Chunk sizes a holder may use: 1 MiB (a few pieces) to 64 MiB.
MIN_CHUNK_BYTES = 1 << 20
MAX_CHUNK_BYTES = 64 << 20
# Blobs with chunk records at once; a fetch from upstream is minutes at most.
MAX_CHUNKED_BLOBS = 256
# How long a blob's records stay after their last change: long enough for the
# waiters still mid-chunk when the holder finished.
RECORD_TTL_S = 600.0
# Publishers barred per blob (each after losing a chunk dispute over it).
MAX_BARRED = 16
# disputes.py's outcomes: the publisher's chunks were right, or wrong.
UPHELD, OVERTURNED = "upheld", "overturned"


@dataclass
class ChunkedBlob:
    size: int
    chunk_bytes: int
    publisher: str
    touched_at: float
    digests: list[str] = field(default_factory=list)
    metainfo: list[bytes] = field(default_factory=list)

    @property
    def count(self) -> int:
        return chunk_count(self.size, self.chunk_bytes)


@dataclass(frozen=True, slots=True)
class Filed:
    """What a publish changed: the chunk digests no longer filed, and whether the
    chunk is new (the caller registers its torrent)."""

    dropped: list[str]
    new: bool


@dataclass(frozen=True, slots=True)
class ChunkDispute:
    """`reported_by` says `records` (by their publisher) do not assemble into the blob."""

    records: ChunkedBlob
    reported_by: str
    opened_at: float

    @property
    def published_by(self) -> str:
        return self.records.publisher

    def party(self, identity: str) -> bool:
        """`identity` is a side of the dispute, so its fetch cannot settle it."""
        return identity in (self.published_by, self.reported_by)


@dataclass(frozen=True, slots=True)
class Verdict:
    """A chunk dispute settled by a verifier's chunk: the outcome and who lied."""

    outcome: str
    loser: str


class ChunkBook:
    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._blobs: dict[str, ChunkedBlob] = {}
        self._barred: dict[str, set[str]] = {}
        self._disputes: dict[str, ChunkDispute] = {}
        # Blobs changed since the service last committed them (chunk_sync.py).
        self.dirty: set[str] = set()

    def __len__(self) -> int:
        return len(self._blobs)

    def check(self, blob: str, msg: wire.PublishChunk, holder: str | None) -> int:
        """Refuse a chunk its sender may not file, or that breaks the rules; its length."""
        if holder != msg.node:
            raise errors.Forbidden(f"only the holder of {blob}'s lease files its chunks")
        if msg.node in self._barred.get(blob, ()):
            raise errors.Forbidden(f"chunks of {blob} by {msg.node!r} lost a chunk dispute")
        if not MIN_CHUNK_BYTES <= msg.chunk_bytes <= MAX_CHUNK_BYTES:
            raise errors.InvalidRequest(f"chunk_bytes must be {MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES}")
        if msg.size <= 0 or not 2 <= chunk_count(msg.size, msg.chunk_bytes) <= MAX_CHUNKS:
            raise errors.InvalidRequest(f"a chunked blob has 2 to {MAX_CHUNKS} chunks")
        if not 0 <= msg.index < chunk_count(msg.size, msg.chunk_bytes):
            raise errors.InvalidRequest(f"chunk index {msg.index} is out of range")
        rec = self._blobs.get(blob)
        if rec is not None and rec.publisher == msg.node:
            if (rec.size, rec.chunk_bytes) != (msg.size, msg.chunk_bytes):
                raise errors.MetainfoConflict(f"{blob} is already cut otherwise")
            if msg.index < len(rec.digests) and rec.digests[msg.index] != msg.digest:
                raise errors.MetainfoConflict(f"chunk {msg.index} of {blob} is filed otherwise")
            if msg.index > len(rec.digests):
                raise errors.InvalidRequest(f"chunk {len(rec.digests)} of {blob} comes first")
        elif msg.index != 0:
            raise errors.InvalidRequest(f"chunk 0 of {blob} comes first")
        return chunk_length(msg.size, msg.chunk_bytes, msg.index)

    def file(self, blob: str, msg: wire.PublishChunk, metainfo: bytes) -> Filed:
        """File a chunk `check` let through."""
        now = self._clock()
        rec = self._blobs.get(blob)
        dropped: list[str] = []
        if rec is None or rec.publisher != msg.node:
            # A new holder (the lease passed on) starts the blob's records over.
            dropped = self._drop(blob)
            dropped += self._make_room()
            rec = self._blobs[blob] = ChunkedBlob(msg.size, msg.chunk_bytes, msg.node, now)
        new = msg.index == len(rec.digests)
        if new:
            rec.digests.append(msg.digest)
            rec.metainfo.append(metainfo)
        rec.touched_at = now
        self.dirty.add(blob)
        return Filed(dropped, new)

    def listing(self, blob: str, holder: str | None) -> wire.ChunkList:
        rec = self._blobs.get(blob)
        d = self._disputes.get(blob)
        if rec is None and d is not None:
            # Set aside: no chunk listed, but the disputed cut, so that the verifier
            # cuts the blob alike and its chunks decide.
            old = d.records
            return wire.ChunkList(old.publisher, old.size, old.chunk_bytes, [], [], False)
        if rec is None:
            raise errors.NotFound(f"no chunk torrents of {blob}")
        # Open while its publisher holds the lease: the whole blob is not seeded yet.
        fetching = holder == rec.publisher
        return wire.ChunkList(rec.publisher, rec.size, rec.chunk_bytes, list(rec.digests),
                              list(rec.metainfo), fetching)  # fmt: skip

    def report(self, blob: str, publisher: str, reporter: str) -> list[str] | None:
        """`reporter` says `publisher`'s chunks do not assemble into `blob`: open a
        dispute and set the records aside; the chunk digests no longer filed, or None
        if `blob` has no records of theirs (gone, another holder's since, or disputed),
        or not all of them yet (nobody can have assembled the blob from them)."""
        rec = self._blobs.get(blob)
        if rec is None or rec.publisher != publisher or reporter == publisher:
            return None
        if len(rec.digests) < rec.count:
            return None
        if blob not in self._disputes and len(self._disputes) >= MAX_CHUNKED_BLOBS:
            oldest = min(self._disputes, key=lambda b: self._disputes[b].opened_at)
            del self._disputes[oldest]
            self.dirty.add(oldest)
        self._disputes[blob] = ChunkDispute(rec, reporter, self._clock())
        self.dirty.add(blob)
        return self._drop(blob)

    def dispute(self, blob: str) -> ChunkDispute | None:
        return self._disputes.get(blob)

    def judge(self, blob: str, msg: wire.PublishChunk, same: bool) -> Verdict | None:
        """A verifier filed chunk `msg.index` of `blob` (`file` done; `same`: its torrent
        is the set-aside one's, or no evidence either way): the verdict, if it decides."""
        d = self._disputes.get(blob)
        if d is None or d.party(msg.node):
            return None
        self.dirty.add(blob)
        old = d.records
        if (old.size, old.chunk_bytes) != (msg.size, msg.chunk_bytes):
            if old.size != msg.size:  # the blob's size is the publisher's lie
                return self._convict(blob, Verdict(OVERTURNED, old.publisher))
            del self._disputes[blob]  # cut otherwise: no evidence either way
            return None
        if msg.index >= len(old.digests) or old.digests[msg.index] != msg.digest or not same:
            return self._convict(blob, Verdict(OVERTURNED, old.publisher))
        if msg.index == old.count - 1:
            del self._disputes[blob]
            rec = self._blobs.get(blob)
            if rec is not None and rec.digests == old.digests:
                # The same chunks: listed as the publisher's again, whom the report wronged.
                rec.publisher = old.publisher
            return Verdict(UPHELD, d.reported_by)
        return None

    def close(self, blob: str, verifier: str) -> bool:
        """`verifier` (no side) verified the whole blob without filing chunks that decide:
        the dispute ends with no verdict, so the blob is no longer withheld."""
        d = self._disputes.get(blob)
        if d is None or d.party(verifier):
            return False
        del self._disputes[blob]
        self.dirty.add(blob)
        return True

    def _convict(self, blob: str, verdict: Verdict) -> Verdict:
        del self._disputes[blob]
        if blob not in self._barred and len(self._barred) >= MAX_CHUNKED_BLOBS:
            self.dirty.add(next(iter(self._barred)))
            del self._barred[next(iter(self._barred))]
        barred = self._barred.setdefault(blob, set())
        if len(barred) < MAX_BARRED:
            barred.add(verdict.loser)
        return verdict

    def expire(self) -> list[str]:
        """Drop records untouched for RECORD_TTL_S; the chunk digests no longer filed."""
        since = self._clock() - RECORD_TTL_S
        dropped: list[str] = []
        for blob in [b for b, r in self._blobs.items() if r.touched_at < since]:
            dropped += self._drop(blob)
            self._barred.pop(blob, None)
        for blob in [b for b, d in self._disputes.items() if d.opened_at < since]:
            del self._disputes[blob]  # nobody asked for the blob since: nothing to settle
            self.dirty.add(blob)
        return dropped

    def chunk_digests(self) -> set[str]:
        return {d for r in self._blobs.values() for d in r.digests}

    def _drop(self, blob: str) -> list[str]:
        rec = self._blobs.pop(blob, None)
        if rec is None:
            return []
        self.dirty.add(blob)
        still = self.chunk_digests()
        return [d for d in rec.digests if d not in still]

    def _make_room(self) -> list[str]:
        dropped: list[str] = []
        while len(self._blobs) >= MAX_CHUNKED_BLOBS:
            oldest = min(self._blobs, key=lambda b: self._blobs[b].touched_at)
            dropped += self._drop(oldest)
            self._barred.pop(oldest, None)
        return dropped

    def state(self, blob: str) -> tuple[ChunkedBlob | None, ChunkDispute | None, frozenset[str]]:
        """What the book holds of `blob`: its records, its dispute, who is barred."""
        barred = frozenset(self._barred.get(blob, ()))
        return self._blobs.get(blob), self._disputes.get(blob), barred

    def restore(self, blob: str, rec: ChunkedBlob | None, dispute: ChunkDispute | None,
                barred: Iterable[str]) -> None:  # fmt: skip
        """Load what the store kept of `blob` (at start, or at a replica's new term),
        within the book's bounds."""
        if rec is not None and rec.digests:
            self._make_room()
            self._blobs[blob] = rec
        if dispute is not None and len(self._disputes) < MAX_CHUNKED_BLOBS:
            self._disputes[blob] = dispute
        names = sorted(barred)[:MAX_BARRED]
        if names and len(self._barred) < MAX_CHUNKED_BLOBS:
            self._barred[blob] = set(names)
