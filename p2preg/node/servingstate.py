"""What serving needs across a restart: the tag map and the tenancy ledger, on disk.

Owns `<data_dir>/serving.db`, an SQLite file written with `synchronous=FULL`
(each write is on disk, whole or not at all, whatever crashes when): the tag
map's entries (registry, repository, tag, accept → digest, when upstream last
said so) and the tenancy ledger's grants, each bounded like its memory map.
At start it loads both into memory; a file SQLite cannot read, or of another
schema version, is logged, moved aside to `serving.db.corrupt` and replaced by
an empty one (the node starts as if new, never crashes); a file that cannot
be opened (locked by another process, read-only, an I/O error) or created
leaves the node serving from memory only. While the node runs, what changed
is written every `FLUSH_INTERVAL_S` in a worker thread (a crash loses at most
that much), and once more at shutdown. It must not decide what the maps hold
(tagmap.py and tenancy.py do) nor ask upstream.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from p2preg.core.digest import Digest, DigestError
from p2preg.core.hostfiles import FILE_MODE
from p2preg.node.tagmap import TagEntry, TagKey, TagMap
from p2preg.node.tenancy import Tenancy, TenancyKey

log = logging.getLogger(__name__)

FILE_NAME = "serving.db"
SCHEMA_VERSION = 1
FLUSH_INTERVAL_S = 0.25
# After a failed write (a full disk), wait this long before the next attempt.
RETRY_AFTER_FAILURE_S = 30.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tags (
    ns TEXT NOT NULL, repository TEXT NOT NULL, tag TEXT NOT NULL, accept TEXT NOT NULL,
    digest TEXT NOT NULL, seen_at REAL NOT NULL,
    PRIMARY KEY (ns, repository, tag, accept)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tenancy (
    ns TEXT NOT NULL, repository TEXT NOT NULL, digest TEXT NOT NULL, seq INTEGER NOT NULL,
    PRIMARY KEY (ns, repository, digest)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tags_by_seen_at ON tags (seen_at);
CREATE INDEX IF NOT EXISTS tenancy_by_seq ON tenancy (seq);
"""


class ServingState:
    """The file behind one node's tag map and tenancy ledger; see the module doc."""

    def __init__(self, path: Path, tags: TagMap, tenancy: Tenancy) -> None:
        self.path = path
        self._tags = tags
        self._tenancy = tenancy
        self._db: sqlite3.Connection | None = None
        self._seq = 0
        # Taken from the maps but not yet on disk (a write failed).
        self._pending_tags: dict[TagKey, TagEntry | None] = {}
        self._pending: list[TenancyKey] = []

    # -- blocking: run in a worker thread ------------------------------------

    def open(self) -> None:
        """Open (or create) the file and load what it holds into the maps."""
        try:
            self._db = self._connect()
            self._load(self._db)
            return
        except (sqlite3.OperationalError, OSError) as e:
            # Locked by another process, read-only, an I/O error: not proof of
            # a damaged file, which is left alone.
            self._close_quietly()
            log.error("serving state %s cannot be opened (%s): serving from memory only",
                      self.path, e)
            return
        except sqlite3.DatabaseError as e:
            self._close_quietly()
            log.error(
                "serving state %s is unreadable (%s): moved aside to %s.corrupt, starting empty",
                self.path, e, self.path.name,
            )
        try:
            self._move_aside()
            self._db = self._connect()
        except (sqlite3.DatabaseError, OSError) as e:
            self._close_quietly()
            log.error("serving state %s cannot be created (%s): serving from memory only",
                      self.path, e)

    def _connect(self) -> sqlite3.Connection:
        # Private like the store: the tags of private repositories are nobody else's.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        os.close(fd)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA synchronous=FULL")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise sqlite3.DatabaseError(f"schema version {version}, expected {SCHEMA_VERSION}")
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except BaseException:
            db.close()
            raise
        return db

    def _load(self, db: sqlite3.Connection) -> None:
        tags: list[tuple[TagKey, Digest, float]] = []
        skipped = 0
        rows = db.execute(
            "SELECT ns, repository, tag, accept, digest, seen_at FROM tags ORDER BY seen_at"
        )
        for ns, repository, tag, accept, digest, seen_at in rows:
            try:
                tags.append(((ns, repository, tag, accept), Digest.parse(digest), float(seen_at)))
            except (DigestError, TypeError, ValueError):
                skipped += 1
        held: list[TenancyKey] = []
        for ns, repository, digest in db.execute(
            "SELECT ns, repository, digest FROM tenancy ORDER BY seq"
        ):
            try:
                held.append((ns, repository, Digest.parse(digest)))
            except (DigestError, TypeError, ValueError):
                skipped += 1
        self._seq = db.execute("SELECT coalesce(max(seq), 0) FROM tenancy").fetchone()[0]
        self._tags.load(tags)
        self._tenancy.load(held)
        log.info("serving state: %d tags and %d tenancy grants kept from the last run%s",
                 len(tags), len(held), f" ({skipped} unreadable rows skipped)" if skipped else "")

    def _move_aside(self) -> None:
        for suffix in ("", "-journal"):
            source = self.path.with_name(self.path.name + suffix)
            if source.exists():
                os.replace(source, self.path.with_name(self.path.name + ".corrupt" + suffix))

    def _close_quietly(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def write(self, tags: list[tuple[TagKey, TagEntry | None]], granted: list[TenancyKey]) -> None:
        """One transaction: the tags that changed (None: forgotten) and the new grants."""
        db = self._db
        if db is None:
            return
        seq = self._seq
        db.execute("BEGIN IMMEDIATE")
        try:
            for key, entry in tags:
                if entry is None:
                    db.execute(
                        "DELETE FROM tags WHERE ns=? AND repository=? AND tag=? AND accept=?", key
                    )
                else:
                    db.execute(
                        "INSERT OR REPLACE INTO tags VALUES (?, ?, ?, ?, ?, ?)",
                        (*key, str(entry.digest), entry.seen_at),
                    )
            for ns, repository, digest in granted:
                seq += 1
                db.execute(
                    "INSERT OR REPLACE INTO tenancy VALUES (?, ?, ?, ?)",
                    (ns, repository, str(digest), seq),
                )
            # Each map's bound, on disk too: the oldest go first. The tags
            # (10,000) are counted.
            db.execute(
                "DELETE FROM tags WHERE seen_at <= "
                "(SELECT seen_at FROM tags ORDER BY seen_at DESC LIMIT 1 OFFSET ?)",
                (self._tags.max_entries,),
            )
            # Only grants among the last max_entries made are kept: at most as
            # many rows as the ledger, found by the index alone (counting a
            # million rows in each write would cost more than the write).
            db.execute("DELETE FROM tenancy WHERE seq <= ?", (seq - self._tenancy.max_entries,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._seq = seq

    def close(self) -> None:
        self._close_quietly()

    # -- trio thread ---------------------------------------------------------

    async def flush(self) -> bool:
        """Write what changed since the last flush; False when the write failed."""
        for key, entry in self._tags.take_unsaved():
            self._pending_tags[key] = entry
        self._pending.extend(self._tenancy.take_unsaved())
        del self._pending[: -self._tenancy.max_entries]
        if not self._pending_tags and not self._pending:
            return True
        tags, self._pending_tags = list(self._pending_tags.items()), {}
        granted, self._pending = self._pending, []
        try:
            # Shielded: what was taken from the maps is on disk or pending again, never lost.
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.write, tags, granted)
        except (sqlite3.Error, OSError) as e:
            log.warning("serving state %s: cannot write (%s); kept in memory, retrying",
                        self.path, e)
            # Newer changes taken meanwhile win over these.
            self._pending_tags = {**dict(tags), **self._pending_tags}
            self._pending[:0] = granted
            return False
        return True

    async def flush_every(self, interval_s: float) -> None:
        while True:
            ok = await self.flush()
            await trio.sleep(interval_s if ok else RETRY_AFTER_FAILURE_S)


@asynccontextmanager
async def open_serving_state(
    data_dir: Path, tags: TagMap, tenancy: Tenancy, *, interval_s: float = FLUSH_INTERVAL_S
) -> AsyncIterator[ServingState]:
    """Load the maps from `data_dir`, keep writing them while open, and once more at the end."""
    state = ServingState(data_dir / FILE_NAME, tags, tenancy)
    await trio.to_thread.run_sync(state.open)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(state.flush_every, interval_s)
            yield state
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await state.flush()
        state.close()
