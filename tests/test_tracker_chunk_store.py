"""The chunk book kept in the store (tracker/chunk_sync.py, chunk_store.py, redis_chunks.py).

No tracker process: a book goes through its whole life — chunks filed one at a
time, a new holder cutting over, a report setting records aside, a verdict
barring the publisher, expiry — and after each step what SQLite and Redis load
back is what the book holds, though each commit wrote only what changed. A
commit that failed is written whole by the next. Redis refuses a chunk write
from a replica that lost its term, as every other write.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from harness.redis import start_redis
from p2preg.core import errors, wire
from p2preg.core.digest import Digest
from tests.test_tracker_redis_store import PASSWORD, store_on
from tracker.chunk_store import ChunkWrite, StoredChunkBlob
from tracker.chunk_sync import ChunkSync
from tracker.chunks import RECORD_TTL_S, ChunkBook
from tracker.redis_store import LEADER_KEY
from tracker.state import MemoryStore, Snapshot, open_sqlite_store

pytestmark = pytest.mark.integration

MiB = 1 << 20
SIZE = 3 * MiB
BLOB = str(Digest.of(b"the blob"))
OTHER = str(Digest.of(b"another blob"))


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def _chunk(i: int, node: str, tag: bytes = b"") -> wire.PublishChunk:
    return wire.PublishChunk(node, SIZE, MiB, i, str(Digest.of(tag + b"%d" % i)), b"m" + tag)


def _file(book: ChunkBook, blob: str, msg: wire.PublishChunk) -> None:
    book.check(blob, msg, msg.node)
    book.file(blob, msg, msg.metainfo)


def _seen(book: ChunkBook, sync: ChunkSync, blob: str) -> tuple[object, ...]:
    """What the book holds of `blob`, as a store would keep it (wall-clock times)."""
    rec, dispute, barred = book.state(blob)
    out: tuple[object, ...] = (None, None, tuple(sorted(barred)))
    if rec is not None:
        out = ((rec.size, rec.chunk_bytes, rec.publisher, rec.digests, rec.metainfo), *out[1:])
    if dispute is not None:
        r = dispute.records
        out = (out[0], (dispute.reported_by, r.publisher, r.digests, r.metainfo), out[2])
    return out


def _kept(blobs: list[StoredChunkBlob], blob: str) -> tuple[object, ...]:
    found = {b.blob: b for b in blobs}.get(blob)
    if found is None:
        return (None, None, ())
    r, d = found.records, found.dispute
    return (
        None if r is None else (r.size, r.chunk_bytes, r.publisher, list(r.digests),
                                list(r.metainfo)),
        None if d is None else (d.reported_by, d.records.publisher, list(d.records.digests),
                                list(d.records.metainfo)),
        found.barred,
    )  # fmt: skip


async def _life(put: Callable[[list[ChunkWrite]], Awaitable[None]],
                load: Callable[[], Awaitable[Snapshot]]) -> None:  # fmt: skip
    clock = Clock()
    book = ChunkBook(clock)
    sync = ChunkSync(book, put, clock=clock, wall_clock=lambda: clock.now + 1e9)
    writes: list[list[ChunkWrite]] = []

    async def step() -> None:
        await sync.commit()
        snapshot = await load()
        for blob in (BLOB, OTHER):
            assert _kept(snapshot.chunks, blob) == _seen(book, sync, blob)

    real_put = sync._put

    async def counting(batch: list[ChunkWrite]) -> None:
        writes.append(batch)
        await real_put(batch)

    sync._put = counting
    for i in range(2):
        _file(book, BLOB, _chunk(i, "a"))
        await step()
    # Each commit wrote the new chunk alone.
    assert [(w.start, w.restart) for w in writes[1]] == [(1, False)]
    _file(book, OTHER, _chunk(0, "a"))
    await step()
    _file(book, BLOB, _chunk(0, "b", b"b"))  # a new holder starts the blob over
    await step()
    for i in range(1, 3):
        _file(book, BLOB, _chunk(i, "b", b"b"))
    await step()
    assert book.report(BLOB, "b", "r") is not None
    await step()
    _file(book, BLOB, _chunk(0, "v"))  # the verifier's chunk 0 differs: b is barred
    verdict = book.judge(BLOB, _chunk(0, "v"), same=True)
    assert verdict is not None and verdict.loser == "b"
    sync.quarantined(BLOB, "b", clock.now + 60)
    await step()
    assert any(w.losers for w in writes[-1])
    # A failed commit is written whole by the next.
    _file(book, BLOB, _chunk(1, "v"))

    async def failing(batch: list[ChunkWrite]) -> None:
        raise errors.TrackerUnavailable("the store is away")

    sync._put = failing
    with pytest.raises(errors.TrackerUnavailable):
        await sync.commit()
    sync._put = counting
    await step()
    assert [(w.start, w.restart) for w in writes[-1]] == [(0, True)]
    clock.now += RECORD_TTL_S + 1
    book.expire()
    await step()
    assert (await load()).chunks == []


async def test_sqlite_keeps_what_the_book_holds_step_by_step(tmp_path: Path) -> None:
    async with open_sqlite_store(tmp_path / "state") as store:
        await _life(store.put_chunks, store.load)
    memory = MemoryStore()
    await _life(memory.put_chunks, memory.load)


async def test_redis_keeps_what_the_book_holds_and_fences_chunk_writes(tmp_path: Path) -> None:
    with start_redis(tmp_path / "redis", password=PASSWORD) as server:
        async with store_on(server, tmp_path) as store:
            await _life(store.put_chunks, store.load)
            clock = Clock()
            book = ChunkBook(clock)
            sync = ChunkSync(book, store.put_chunks, clock=clock, wall_clock=lambda: 2e9)
            _file(book, BLOB, _chunk(0, "a"))
            server.cli("SET", LEADER_KEY, "8:replica-b")  # another replica's term
            with pytest.raises(errors.TrackerUnavailable):
                await sync.commit()
            assert server.cli("EXISTS", f"p2preg:k:{BLOB}") == ["0"]
