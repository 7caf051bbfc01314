"""Durable tracker state behind one small seam: metainfo, disputes, quarantines, leases,
which identities confirmed (downloaded and verified) a digest's torrent, the tag
book's last answers (tracker/tags.py), the manifest shelf (manifest_shelf.py) and
the chunk book (chunk_store.py).

`TrackerStore` is the interface the service writes through; `SqliteStore`
keeps it in `<data_dir>/tracker.sqlite3` (WAL, synchronous=FULL, so a commit
survives a crash of the process or the machine), and `MemoryStore` is the fake
for pure-trio tests. A replica-shared store (Redis/Valkey) would be a third
implementation. Peers are not state: they live in memory (peers.py) and come
back with re-announces; confirmations do not (a node confirms once per
download), so they are kept here. The store only persists and loads; it must not
validate, decide conflicts or keep caches — the service does all of that and
reads the store once, at start.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import trio

from p2preg.core.config import ConfigError
from p2preg.core.hostfiles import open_private, private_dir, tighten
from tracker import chunk_store
from tracker.chunk_store import ChunkWrite, StoredChunkBlob

SCHEMA_VERSION = 1
DB_NAME = "tracker.sqlite3"


@dataclass(frozen=True, slots=True)
class StoredMetainfo:
    digest: str
    size: int
    data: bytes
    published_by: str
    published_at_unix: float


@dataclass(frozen=True, slots=True)
class StoredDispute:
    """A report's torrent (`data`), kept beside the digest's stored one until settled."""

    digest: str
    size: int
    data: bytes
    reported_by: str
    reason: str
    published_by: str
    opened_at_unix: float


@dataclass(frozen=True, slots=True)
class StoredQuarantine:
    """An identity whose torrent for `digest` lost a dispute, and until when."""

    identity: str
    until_unix: float
    digest: str


@dataclass(frozen=True, slots=True)
class StoredLease:
    digest: str
    lease_id: str
    holder: str
    # Wall-clock time: monotonic clocks do not survive a restart.
    expires_at_unix: float
    bytes_done: int
    size: int | None


@dataclass(frozen=True, slots=True)
class StoredConfirmation:
    """`identity` downloaded and verified the blob of the torrent `info_hash` (its v2
    info-hash): its `left=0` announces count as a seeder of `digest`."""

    digest: str
    info_hash: bytes
    identity: str


@dataclass(frozen=True, slots=True)
class StoredTag:
    """A tag's last answer, and whose word it is (tracker/tags.py)."""

    ns: str
    repository: str
    tag: str
    accept: str
    digest: str
    reported_by: str
    seen_at_unix: float


@dataclass(frozen=True, slots=True)
class StoredManifest:
    """A manifest body the tracker verified (manifest_shelf.py), and the places nodes
    said hold it, newest first; `shelved_at_unix` (its last put) orders eviction."""

    digest: str
    media_type: str
    body: bytes
    places: tuple[str, ...]
    shelved_at_unix: float


@dataclass(frozen=True, slots=True)
class Snapshot:
    metainfo: list[StoredMetainfo] = field(default_factory=list)
    leases: list[StoredLease] = field(default_factory=list)
    disputes: list[StoredDispute] = field(default_factory=list)
    quarantines: list[StoredQuarantine] = field(default_factory=list)
    confirmations: list[StoredConfirmation] = field(default_factory=list)
    tags: list[StoredTag] = field(default_factory=list)
    manifests: list[StoredManifest] = field(default_factory=list)
    chunks: list[StoredChunkBlob] = field(default_factory=list)


class TrackerStore(Protocol):
    async def load(self) -> Snapshot: ...

    async def put_metainfo(self, record: StoredMetainfo) -> None:
        """Insert or replace the digest's metainfo."""

    async def put_dispute(self, dispute: StoredDispute) -> None: ...

    async def settle_dispute(
        self, digest: str, winner: StoredMetainfo | None, losers: list[StoredQuarantine]
    ) -> None:
        """In one commit: drop the dispute, store `winner` (None: the stored one won),
        quarantine `losers`."""

    async def save_lease(self, lease: StoredLease) -> None: ...

    async def delete_lease(self, digest: str, lease_id: str) -> None: ...

    async def put_confirmation(self, confirmation: StoredConfirmation) -> None:
        """Insert or replace what the identity confirmed for the digest."""

    async def delete_metainfo(self, digest: str) -> None:
        """Forget the digest's metainfo (it expired) and its confirmations."""

    async def put_tag(self, tag: StoredTag, dropped: list[tuple[str, str, str, str]]) -> None:
        """In one commit: keep `tag` (replacing its key's), forget the `dropped` keys."""

    async def put_manifest(self, record: StoredManifest, dropped: list[str]) -> None:
        """In one commit: insert or replace the manifest, forget those `dropped`."""

    async def put_chunks(self, writes: list[ChunkWrite]) -> None:
        """In one commit: what changed of these blobs' chunk records (chunk_store.py)."""


class MemoryStore:
    """A TrackerStore in a dict: for tests, and for a tracker without --data-dir."""

    def __init__(self) -> None:
        self.metainfo: dict[str, StoredMetainfo] = {}
        self.leases: dict[str, StoredLease] = {}
        self.disputes: dict[str, StoredDispute] = {}
        self.quarantines: dict[str, StoredQuarantine] = {}
        self.confirmations: dict[tuple[str, str], StoredConfirmation] = {}
        self.tags: dict[tuple[str, str, str, str], StoredTag] = {}
        self.manifests: dict[str, StoredManifest] = {}
        self.chunks: dict[str, StoredChunkBlob] = {}

    async def load(self) -> Snapshot:
        await trio.lowlevel.checkpoint()
        return Snapshot(
            metainfo=list(self.metainfo.values()),
            leases=list(self.leases.values()),
            disputes=list(self.disputes.values()),
            quarantines=list(self.quarantines.values()),
            confirmations=list(self.confirmations.values()),
            tags=list(self.tags.values()),
            manifests=list(self.manifests.values()),
            chunks=list(self.chunks.values()),
        )

    async def put_metainfo(self, record: StoredMetainfo) -> None:
        await trio.lowlevel.checkpoint()
        self.metainfo[record.digest] = record

    async def put_dispute(self, dispute: StoredDispute) -> None:
        await trio.lowlevel.checkpoint()
        self.disputes[dispute.digest] = dispute

    async def settle_dispute(
        self, digest: str, winner: StoredMetainfo | None, losers: list[StoredQuarantine]
    ) -> None:
        await trio.lowlevel.checkpoint()
        self.disputes.pop(digest, None)
        if winner is not None:
            self.metainfo[digest] = winner
        for q in losers:
            self.quarantines[q.identity] = q

    async def save_lease(self, lease: StoredLease) -> None:
        await trio.lowlevel.checkpoint()
        self.leases[lease.digest] = lease

    async def delete_lease(self, digest: str, lease_id: str) -> None:
        await trio.lowlevel.checkpoint()
        if digest in self.leases and self.leases[digest].lease_id == lease_id:
            del self.leases[digest]

    async def put_confirmation(self, confirmation: StoredConfirmation) -> None:
        await trio.lowlevel.checkpoint()
        self.confirmations[(confirmation.digest, confirmation.identity)] = confirmation

    async def delete_metainfo(self, digest: str) -> None:
        await trio.lowlevel.checkpoint()
        self.metainfo.pop(digest, None)
        for key in [k for k in self.confirmations if k[0] == digest]:
            del self.confirmations[key]

    async def put_tag(self, tag: StoredTag, dropped: list[tuple[str, str, str, str]]) -> None:
        await trio.lowlevel.checkpoint()
        for key in dropped:
            self.tags.pop(key, None)
        self.tags[(tag.ns, tag.repository, tag.tag, tag.accept)] = tag

    async def put_manifest(self, record: StoredManifest, dropped: list[str]) -> None:
        await trio.lowlevel.checkpoint()
        for digest in dropped:
            self.manifests.pop(digest, None)
        self.manifests[record.digest] = record

    async def put_chunks(self, writes: list[ChunkWrite]) -> None:
        await trio.lowlevel.checkpoint()
        chunk_store.memory_write(self.chunks, writes)
        for w in writes:
            self.quarantines.update({i: StoredQuarantine(i, u, w.blob) for i, u in w.losers})


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS metainfo (
    digest TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    data BLOB NOT NULL,
    published_by TEXT NOT NULL,
    published_at_unix REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS disputes (
    digest TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    data BLOB NOT NULL,
    reported_by TEXT NOT NULL,
    reason TEXT NOT NULL,
    published_by TEXT NOT NULL,
    opened_at_unix REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS quarantines (
    identity TEXT PRIMARY KEY,
    until_unix REAL NOT NULL,
    digest TEXT NOT NULL
);
-- Bad reports were permanent blacklists before disputes replaced them.
DROP TABLE IF EXISTS bad_metainfo;
CREATE TABLE IF NOT EXISTS leases (
    digest TEXT PRIMARY KEY,
    lease_id TEXT NOT NULL,
    holder TEXT NOT NULL,
    expires_at_unix REAL NOT NULL,
    bytes_done INTEGER NOT NULL,
    size INTEGER
);
CREATE TABLE IF NOT EXISTS confirmations (
    digest TEXT NOT NULL,
    identity TEXT NOT NULL,
    info_hash BLOB NOT NULL,
    PRIMARY KEY (digest, identity)
);
CREATE TABLE IF NOT EXISTS tags (
    ns TEXT NOT NULL,
    repository TEXT NOT NULL,
    tag TEXT NOT NULL,
    accept TEXT NOT NULL,
    digest TEXT NOT NULL,
    reported_by TEXT NOT NULL,
    seen_at_unix REAL NOT NULL,
    PRIMARY KEY (ns, repository, tag, accept)
);
-- places: "<ns>/<repository>" lines, newest first.
CREATE TABLE IF NOT EXISTS manifests (
    digest TEXT PRIMARY KEY,
    media_type TEXT NOT NULL,
    body BLOB NOT NULL,
    places TEXT NOT NULL,
    shelved_at_unix REAL NOT NULL
);
"""

T = TypeVar("T")


class SqliteStore:
    """SQLite in a worker thread, one statement batch at a time.

    sqlite3 blocks; running it in a thread keeps announces flowing while a
    metainfo commit waits for fsync. The limiter makes the one connection
    single-threaded in practice.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._limiter = trio.CapacityLimiter(1)

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            # Explicit transactions: the connection is in autocommit mode so
            # that a batch of statements commits (and fsyncs) once.
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(self._conn)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
            return result

        return await trio.to_thread.run_sync(call, limiter=self._limiter)

    async def load(self) -> Snapshot:
        def read(c: sqlite3.Connection) -> Snapshot:
            def rows(sql: str) -> sqlite3.Cursor:
                return c.execute(sql)

            return Snapshot(
                metainfo=[StoredMetainfo(*row) for row in rows(
                    "SELECT digest, size, data, published_by, published_at_unix FROM metainfo")],
                leases=[StoredLease(*row) for row in rows(
                    "SELECT digest, lease_id, holder, expires_at_unix, bytes_done, size"
                    " FROM leases")],
                disputes=[StoredDispute(*row) for row in rows(
                    "SELECT digest, size, data, reported_by, reason, published_by,"
                    " opened_at_unix FROM disputes")],
                quarantines=[StoredQuarantine(*row) for row in rows(
                    "SELECT identity, until_unix, digest FROM quarantines")],
                confirmations=[StoredConfirmation(*row) for row in rows(
                    "SELECT digest, info_hash, identity FROM confirmations")],
                tags=[StoredTag(*row) for row in rows(
                    "SELECT ns, repository, tag, accept, digest, reported_by, seen_at_unix"
                    " FROM tags")],
                manifests=[StoredManifest(d, t, b, tuple(p.split("\n")), at) for d, t, b, p, at
                           in rows("SELECT digest, media_type, body, places, shelved_at_unix"
                                   " FROM manifests")],
                chunks=chunk_store.sqlite_load(c),
            )  # fmt: skip

        return await self._run(read)

    async def put_metainfo(self, record: StoredMetainfo) -> None:
        await self._run(lambda c: _put_metainfo(c, record))

    async def put_dispute(self, dispute: StoredDispute) -> None:
        d = dispute
        await self._run(
            lambda c: c.execute(
                "INSERT OR REPLACE INTO disputes VALUES (?, ?, ?, ?, ?, ?, ?)",
                (d.digest, d.size, d.data, d.reported_by, d.reason, d.published_by,
                 d.opened_at_unix),
            )
        )

    async def settle_dispute(
        self, digest: str, winner: StoredMetainfo | None, losers: list[StoredQuarantine]
    ) -> None:
        def write(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM disputes WHERE digest = ?", (digest,))
            if winner is not None:
                _put_metainfo(c, winner)
            for q in losers:
                c.execute(
                    "INSERT OR REPLACE INTO quarantines VALUES (?, ?, ?)",
                    (q.identity, q.until_unix, q.digest),
                )

        await self._run(write)

    async def save_lease(self, lease: StoredLease) -> None:
        await self._run(
            lambda c: c.execute(
                "INSERT OR REPLACE INTO leases VALUES (?, ?, ?, ?, ?, ?)",
                (lease.digest, lease.lease_id, lease.holder, lease.expires_at_unix,
                 lease.bytes_done, lease.size),
            )
        )

    async def delete_lease(self, digest: str, lease_id: str) -> None:
        await self._run(
            lambda c: c.execute(
                "DELETE FROM leases WHERE digest = ? AND lease_id = ?", (digest, lease_id)
            )
        )

    async def put_confirmation(self, confirmation: StoredConfirmation) -> None:
        c = confirmation
        await self._run(
            lambda conn: conn.execute(
                "INSERT OR REPLACE INTO confirmations VALUES (?, ?, ?)",
                (c.digest, c.identity, c.info_hash),
            )
        )

    async def delete_metainfo(self, digest: str) -> None:
        def write(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM metainfo WHERE digest = ?", (digest,))
            c.execute("DELETE FROM confirmations WHERE digest = ?", (digest,))

        await self._run(write)

    async def put_tag(self, tag: StoredTag, dropped: list[tuple[str, str, str, str]]) -> None:
        def write(c: sqlite3.Connection) -> None:
            c.executemany(
                "DELETE FROM tags WHERE ns = ? AND repository = ? AND tag = ? AND accept = ?",
                dropped,
            )
            row = (tag.ns, tag.repository, tag.tag, tag.accept, tag.digest, tag.reported_by)
            c.execute("INSERT OR REPLACE INTO tags VALUES (?, ?, ?, ?, ?, ?, ?)",
                      (*row, tag.seen_at_unix))  # fmt: skip

        await self._run(write)

    async def put_manifest(self, record: StoredManifest, dropped: list[str]) -> None:
        r = record

        def write(c: sqlite3.Connection) -> None:
            c.executemany("DELETE FROM manifests WHERE digest = ?", [(d,) for d in dropped])
            c.execute(
                "INSERT OR REPLACE INTO manifests VALUES (?, ?, ?, ?, ?)",
                (r.digest, r.media_type, r.body, "\n".join(r.places), r.shelved_at_unix),
            )

        await self._run(write)

    async def put_chunks(self, writes: list[ChunkWrite]) -> None:
        await self._run(lambda c: chunk_store.sqlite_write(c, writes))


def _put_metainfo(c: sqlite3.Connection, record: StoredMetainfo) -> None:
    c.execute(
        "INSERT OR REPLACE INTO metainfo VALUES (?, ?, ?, ?, ?)",
        (record.digest, record.size, record.data, record.published_by, record.published_at_unix),
    )


@asynccontextmanager
async def open_sqlite_store(data_dir: Path) -> AsyncIterator[SqliteStore]:
    """Open (creating if needed) the store under `data_dir`."""

    def open_db() -> sqlite3.Connection:
        private_dir(data_dir)
        db = data_dir / DB_NAME
        try:
            # SQLite gives its journal and WAL files the database file's mode.
            if db.exists():
                for path in data_dir.glob(DB_NAME + "*"):
                    tighten(path)
            else:
                os.close(open_private(db, exclusive=True))
            conn = sqlite3.connect(
                data_dir / DB_NAME, check_same_thread=False, isolation_level=None
            )
            conn.execute("PRAGMA journal_mode=WAL")
        except (OSError, sqlite3.Error) as e:
            raise ConfigError(f"cannot open the tracker store in {data_dir}: {e}") from None
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(_SCHEMA + chunk_store.SCHEMA)
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        if row is None:
            conn.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) != SCHEMA_VERSION:
            conn.close()
            raise ConfigError(f"{data_dir / DB_NAME} has schema {row[0]}, not {SCHEMA_VERSION}")
        return conn

    conn = await trio.to_thread.run_sync(open_db)
    try:
        yield SqliteStore(conn)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(conn.close)
