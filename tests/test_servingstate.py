"""The tag map and the tenancy ledger across a restart (p2preg/node/servingstate.py).

Real SQLite files in tmp_path, real worker threads (no MockClock: it would
jump while a write waits on its thread). A "restart" is a second
`open_serving_state` on the same directory with fresh maps.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from p2preg.core.digest import Digest
from p2preg.node.servingstate import FILE_NAME, ServingState, open_serving_state
from p2preg.node.tagmap import TagKey, TagMap
from p2preg.node.tenancy import Tenancy

TTL_S, STALE_S = 30.0, 3600.0
KEY: TagKey = ("seed.test", "team/app", "latest", "application/vnd.oci.image.index.v1+json")


def _digest(i: int) -> Digest:
    return Digest.of(f"blob {i}".encode(), "sha256")


def _maps(max_tags: int = 100, max_grants: int = 1000) -> tuple[TagMap, Tenancy]:
    return TagMap(ttl_s=TTL_S, stale_s=STALE_S, max_entries=max_tags), Tenancy(max_grants)


async def test_tags_and_tenancy_survive_a_restart(tmp_path: Path) -> None:
    tags, tenancy = _maps()
    async with open_serving_state(tmp_path, tags, tenancy):
        tags.seen(KEY, _digest(0), 1000.0)
        tags.seen(("seed.test", "team/app", "gone", ""), _digest(1), 1001.0)
        tenancy.grant("seed.test", "team/app", [_digest(0), _digest(2)])
    # Changed after the first write (the final write at shutdown keeps it).
    async with open_serving_state(tmp_path, tags, tenancy) as state:
        tags.forget(("seed.test", "team/app", "gone", ""))
        tenancy.grant("other.test", "lib/x", [_digest(3)])
        assert await state.flush()

    tags, tenancy = _maps()
    async with open_serving_state(tmp_path, tags, tenancy):
        entry = tags.get(KEY)
        assert entry is not None and entry.digest == _digest(0) and entry.seen_at == 1000.0
        assert tags.get(("seed.test", "team/app", "gone", "")) is None
        assert len(tags) == 1
        # Stale answers reach back to when upstream gave the digest, before the restart.
        assert tags.stale(KEY, 1000.0 + STALE_S) is not None
        assert tenancy.holds("seed.test", "team/app", _digest(0))
        assert tenancy.holds("seed.test", "team/app", _digest(2))
        assert tenancy.holds("other.test", "lib/x", _digest(3))
        assert not tenancy.holds("seed.test", "lib/x", _digest(3))
        assert len(tenancy) == 3
    assert (tmp_path / FILE_NAME).stat().st_mode & 0o077 == 0


async def test_the_file_keeps_the_maps_bounds_dropping_the_oldest(tmp_path: Path) -> None:
    tags, tenancy = _maps(max_tags=3, max_grants=4)
    async with open_serving_state(tmp_path, tags, tenancy) as state:
        for i in range(6):
            tags.seen(("seed.test", "team/app", f"t{i}", ""), _digest(i), float(i))
            tenancy.grant("seed.test", "team/app", [_digest(i)])
            assert await state.flush()  # one write each: the file trims, not only memory
    tags, tenancy = _maps(max_tags=3, max_grants=4)
    async with open_serving_state(tmp_path, tags, tenancy):
        assert sorted(key[2] for key, _, _ in _rows(tmp_path)) == ["t3", "t4", "t5"]
        assert len(tags) == 3 and len(tenancy) == 4
        assert not tenancy.holds("seed.test", "team/app", _digest(1))
        assert tenancy.holds("seed.test", "team/app", _digest(2))


def _rows(data_dir: Path) -> list[tuple[TagKey, str, float]]:
    with sqlite3.connect(data_dir / FILE_NAME) as db:
        rows = db.execute("SELECT ns, repository, tag, accept, digest, seen_at FROM tags")
        return [((a, b, c, d), e, f) for a, b, c, d, e, f in rows]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "future schema", "bad digest row"])
async def test_a_damaged_file_is_logged_and_never_stops_the_node(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    tags, tenancy = _maps()
    async with open_serving_state(tmp_path, tags, tenancy):
        tags.seen(KEY, _digest(0), 1000.0)
        tenancy.grant("seed.test", "team/app", [_digest(i) for i in range(200)])
    path = tmp_path / FILE_NAME
    if damage == "garbage":
        path.write_bytes(b"not a database at all, " * 200)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:3000])
    elif damage == "future schema":
        with sqlite3.connect(path) as db:
            db.execute("PRAGMA user_version=99")
    else:
        with sqlite3.connect(path) as db:
            db.execute("UPDATE tags SET digest='sha256:nope'")

    tags, tenancy = _maps()
    with caplog.at_level(logging.INFO, logger="p2preg.node.servingstate"):
        async with open_serving_state(tmp_path, tags, tenancy) as state:
            assert tags.get(KEY) is None
            tags.seen(KEY, _digest(7), 2000.0)
            assert await state.flush()
    if damage == "bad digest row":
        assert "1 unreadable rows skipped" in caplog.text
        assert len(tenancy) == 200  # the readable rest was kept
    else:
        assert "moved aside" in caplog.text
        assert (tmp_path / f"{FILE_NAME}.corrupt").exists()
    # The new file works: what was written after the damage is there at the next start.
    tags, tenancy = _maps()
    async with open_serving_state(tmp_path, tags, tenancy):
        entry = tags.get(KEY)
        assert entry is not None and entry.digest == _digest(7)


async def test_a_file_that_cannot_be_created_leaves_the_maps_in_memory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tags, tenancy = _maps()
    state = ServingState(tmp_path / "missing-dir" / FILE_NAME, tags, tenancy)
    with caplog.at_level(logging.ERROR, logger="p2preg.node.servingstate"):
        state.open()
    assert "serving from memory only" in caplog.text
    tags.seen(KEY, _digest(0), 1.0)
    assert await state.flush()  # nothing to write to: not an error either
    assert tags.fresh(KEY, 2.0) is not None
    state.close()


WRITER = """
import sys, trio
from pathlib import Path
from p2preg.core.digest import Digest
from p2preg.node.servingstate import ServingState
from p2preg.node.tagmap import TagMap
from p2preg.node.tenancy import Tenancy

tags, tenancy = TagMap(ttl_s=30, stale_s=3600), Tenancy()
state = ServingState(Path(sys.argv[1]), tags, tenancy)
state.open()

async def main() -> None:
    for i in range(100_000):
        batch = [Digest.of(f"{i}/{j}".encode(), "sha256") for j in range(50)]
        tenancy.grant("seed.test", "team/app", batch)
        tags.seen(("seed.test", "team/app", f"t{i}", ""), batch[0], float(i))
        await state.flush()
        print(i, flush=True)

trio.run(main)
"""


def test_a_writer_killed_mid_write_leaves_a_whole_file_with_every_batch_it_finished(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """kill -9 of a process writing batches: every batch reported done is there, each whole."""
    path = tmp_path / FILE_NAME
    done = -1
    with subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    ) as proc:
        try:
            assert proc.stdout is not None
            for _ in range(40):  # bounded: the writer prints one line per batch
                line = proc.stdout.readline()
                if not line:
                    break
                done = int(line)
        finally:
            proc.kill()  # SIGKILL, by the pid this test started
            proc.wait(timeout=30)
    assert done >= 0, "the writer never finished a batch"
    tags, tenancy = _maps(max_tags=100_000, max_grants=10_000_000)
    state = ServingState(path, tags, tenancy)
    with caplog.at_level(logging.INFO, logger="p2preg.node.servingstate"):
        state.open()
    state.close()
    assert "moved aside" not in caplog.text
    assert len(tags) >= done + 1
    assert len(tenancy) == 50 * len(tags)  # no batch half-written
    for i in range(done + 1):
        assert tenancy.holds("seed.test", "team/app", Digest.of(f"{i}/49".encode(), "sha256"))
