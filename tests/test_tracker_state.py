"""The tracker's SQLite store (tracker/state.py): disputes and quarantines survive a reopen.

Real SQLite under tmp_path, no tracker process: what the coordinator commits
comes back from `load` after the store is closed and opened again, and a store
made before disputes existed loses its permanent bad-report table.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

from tracker.state import (
    DB_NAME,
    StoredDispute,
    StoredMetainfo,
    StoredQuarantine,
    open_sqlite_store,
)


async def test_disputes_and_quarantines_are_kept_across_a_reopen(tmp_path: Path) -> None:
    stored = StoredMetainfo("sha256:" + "a" * 64, 10, b"stored", "p", 1.0)
    dispute = StoredDispute(stored.digest, 10, b"challenger", "r", "mismatch", "p", 2.0)
    async with open_sqlite_store(tmp_path) as store:
        await store.put_metainfo(stored)
        await store.put_dispute(dispute)
    async with open_sqlite_store(tmp_path) as store:
        snapshot = await store.load()
        assert snapshot.disputes == [dispute] and snapshot.metainfo == [stored]
        winner = StoredMetainfo(stored.digest, 10, b"challenger", "r", 3.0)
        loser = StoredQuarantine("p", 4000.0, stored.digest)
        await store.settle_dispute(stored.digest, winner, [loser])
    async with open_sqlite_store(tmp_path) as store:
        snapshot = await store.load()
        assert snapshot.disputes == [] and snapshot.metainfo == [winner]
        assert snapshot.quarantines == [loser]
        # The stored torrent winning changes no metainfo; a later loss moves the end.
        await store.settle_dispute(stored.digest, None, [StoredQuarantine("p", 9000.0, "d")])
        assert (await store.load()).quarantines == [StoredQuarantine("p", 9000.0, "d")]


async def test_the_bad_report_table_of_older_stores_is_dropped(tmp_path: Path) -> None:
    async with open_sqlite_store(tmp_path):
        pass
    with closing(sqlite3.connect(tmp_path / DB_NAME)) as db:
        db.execute("CREATE TABLE bad_metainfo (digest TEXT, info_hash_v2 BLOB)")
        db.commit()
    async with open_sqlite_store(tmp_path):
        pass
    with closing(sqlite3.connect(tmp_path / DB_NAME)) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    assert "bad_metainfo" not in tables and {"disputes", "quarantines"} <= tables
