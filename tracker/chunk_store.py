"""The chunk book's records in the embedded store: what `ChunkSync` commits, and SQLite's part.

A blob's chunk records (chunks.py) are kept as they grow: a head (size,
`chunk_bytes`, publisher, last change) and one row per chunk torrent, so that
filing a chunk writes that chunk alone. An open chunk dispute keeps the records
it set aside whole, beside the reporter and when it opened; the publishers
barred from filing the blob's chunks again are a row each, and a verdict's
loser is quarantined in the `quarantines` table the metainfo disputes use, in
the same commit. `ChunkWrite` is what changed of one blob since the last
commit; `StoredChunkBlob` what a load gives back. Redis keeps the same
(redis_chunks.py). This module must not decide anything (chunks.py and
chunk_torrents.py do) or know HTTP.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

import msgpack

SCHEMA = """
CREATE TABLE IF NOT EXISTS chunk_records (
    blob TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    chunk_bytes INTEGER NOT NULL,
    publisher TEXT NOT NULL,
    touched_at_unix REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS chunk_torrents (
    blob TEXT NOT NULL,
    idx INTEGER NOT NULL,
    digest TEXT NOT NULL,
    metainfo BLOB NOT NULL,
    PRIMARY KEY (blob, idx)
);
-- records: the set-aside records, packed (pack_records).
CREATE TABLE IF NOT EXISTS chunk_disputes (
    blob TEXT PRIMARY KEY,
    reported_by TEXT NOT NULL,
    opened_at_unix REAL NOT NULL,
    records BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS chunk_barred (
    blob TEXT NOT NULL,
    identity TEXT NOT NULL,
    PRIMARY KEY (blob, identity)
);
"""


@dataclass(frozen=True, slots=True)
class StoredChunkRecords:
    size: int
    chunk_bytes: int
    publisher: str
    # Wall-clock time: monotonic clocks do not survive a restart.
    touched_at_unix: float
    digests: tuple[str, ...]
    metainfo: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class StoredChunkDispute:
    records: StoredChunkRecords
    reported_by: str
    opened_at_unix: float


@dataclass(frozen=True, slots=True)
class StoredChunkBlob:
    """What the store keeps of one blob's chunks."""

    blob: str
    records: StoredChunkRecords | None
    dispute: StoredChunkDispute | None
    barred: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ChunkWrite:
    """What changed of one blob since its last commit: `records` (None: gone) with
    its chunks from `start` on (the store holds those before, unless `restart`:
    then it forgets the stored ones first); its dispute (None: none) and barred
    publishers, each written if changed; quarantined losers (identity, until
    when), for this blob."""

    blob: str
    records: StoredChunkRecords | None
    start: int
    restart: bool
    dispute: StoredChunkDispute | None
    dispute_changed: bool
    barred: tuple[str, ...]
    barred_changed: bool
    losers: tuple[tuple[str, float], ...] = ()

    @property
    def empty(self) -> bool:
        """Nothing of the blob is left to keep."""
        return self.records is None and self.dispute is None and not self.barred


def pack_records(r: StoredChunkRecords) -> bytes:
    fields = [r.size, r.chunk_bytes, r.publisher, r.touched_at_unix, list(r.digests),
              list(r.metainfo)]  # fmt: skip
    return bytes(msgpack.packb(fields))


def unpack_records(raw: bytes) -> StoredChunkRecords:
    size, chunk_bytes, publisher, at, digests, metainfo = msgpack.unpackb(raw)
    return StoredChunkRecords(int(size), int(chunk_bytes), str(publisher), float(at),
                              tuple(digests), tuple(metainfo))  # fmt: skip


def sqlite_write(c: sqlite3.Connection, writes: list[ChunkWrite]) -> None:
    """Apply `writes` in the caller's transaction."""
    for w in writes:
        if w.records is None or w.restart:
            c.execute("DELETE FROM chunk_records WHERE blob = ?", (w.blob,))
            c.execute("DELETE FROM chunk_torrents WHERE blob = ?", (w.blob,))
        r = w.records
        if r is not None:
            head = (w.blob, r.size, r.chunk_bytes, r.publisher, r.touched_at_unix)
            c.execute("INSERT OR REPLACE INTO chunk_records VALUES (?, ?, ?, ?, ?)", head)
            new = range(w.start, len(r.digests))
            rows = [(w.blob, i, r.digests[i], r.metainfo[i]) for i in new]
            c.executemany("INSERT OR REPLACE INTO chunk_torrents VALUES (?, ?, ?, ?)", rows)
        if w.dispute_changed:
            c.execute("DELETE FROM chunk_disputes WHERE blob = ?", (w.blob,))
            d = w.dispute
            if d is not None:
                row = (w.blob, d.reported_by, d.opened_at_unix, pack_records(d.records))
                c.execute("INSERT INTO chunk_disputes VALUES (?, ?, ?, ?)", row)
        if w.barred_changed:
            c.execute("DELETE FROM chunk_barred WHERE blob = ?", (w.blob,))
            c.executemany("INSERT INTO chunk_barred VALUES (?, ?)", [(w.blob, b) for b in w.barred])
        for identity, until in w.losers:
            c.execute("INSERT OR REPLACE INTO quarantines VALUES (?, ?, ?)",
                      (identity, until, w.blob))  # fmt: skip


def sqlite_load(c: sqlite3.Connection) -> list[StoredChunkBlob]:
    chunks: dict[str, list[tuple[str, bytes]]] = {}
    for blob, _, digest, meta in c.execute("SELECT blob, idx, digest, metainfo FROM chunk_torrents"
                                           " ORDER BY blob, idx"):  # fmt: skip
        chunks.setdefault(blob, []).append((digest, meta))
    records: dict[str, StoredChunkRecords] = {}
    for blob, size, cut, by, at in c.execute("SELECT * FROM chunk_records"):
        mine = chunks.get(blob, [])
        records[blob] = StoredChunkRecords(size, cut, by, at, tuple(d for d, _ in mine),
                                           tuple(m for _, m in mine))  # fmt: skip
    disputes = {blob: StoredChunkDispute(unpack_records(packed), by, at)
                for blob, by, at, packed in c.execute("SELECT * FROM chunk_disputes")}  # fmt: skip
    barred: dict[str, list[str]] = {}
    for blob, identity in c.execute("SELECT blob, identity FROM chunk_barred"):
        barred.setdefault(blob, []).append(identity)
    return [StoredChunkBlob(b, records.get(b), disputes.get(b), tuple(barred.get(b, ())))
            for b in sorted({*records, *disputes, *barred})]  # fmt: skip


def memory_write(kept: dict[str, StoredChunkBlob], writes: list[ChunkWrite]) -> None:
    """Apply `writes` to `MemoryStore`'s copy (whole records: it holds no rows)."""
    for w in writes:
        kept.pop(w.blob, None)
        if not w.empty:
            kept[w.blob] = StoredChunkBlob(w.blob, w.records, w.dispute, w.barred)
