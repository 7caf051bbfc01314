"""The chunk book kept in step with the store: what changed since the last commit, and back.

`ChunkSync` turns the blobs chunks.py marked changed into `ChunkWrite`s — a
blob's head and only the chunks filed since its last commit, its dispute and
barred publishers only when they changed — remembering what each commit
stored; a commit that failed is written whole the next time. Commits go one at
a time, in order, so a later one never lands before an earlier one. `restored`
turns what a load gave back into the book's records on this process's clock.
It must not decide anything (chunks.py does) or know the store's layout
(chunk_store.py, redis_chunks.py do).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from tracker.chunk_store import ChunkWrite, StoredChunkDispute, StoredChunkRecords
from tracker.chunks import ChunkBook, ChunkDispute, ChunkedBlob


@dataclass(frozen=True, slots=True)
class _Saved:
    """What the store holds of a blob after the last commit."""

    head: tuple[int, int, str] | None  # size, chunk_bytes, publisher
    count: int
    dispute: ChunkDispute | None
    barred: frozenset[str]


class ChunkSync:
    def __init__(
        self,
        book: ChunkBook,
        put: Callable[[list[ChunkWrite]], Awaitable[None]],
        *,
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
    ) -> None:
        self._book = book
        self._put = put
        self._clock = clock
        self._wall = wall_clock
        self._saved: dict[str, _Saved] = {}
        self._lock = trio.Lock()
        self._losers: dict[str, list[tuple[str, float]]] = {}

    def quarantined(self, blob: str, identity: str, until: float) -> None:
        """`identity` lost `blob`'s chunk dispute until `until` (this clock): the next
        commit keeps it."""
        self._losers.setdefault(blob, []).append((identity, self._unix(until)))
        self._book.dirty.add(blob)

    async def commit(self) -> None:
        """Write every change since the last commit; what a failed one did not write
        is written whole by the next."""
        async with self._lock:
            blobs = sorted(self._book.dirty)
            self._book.dirty.clear()
            done = [self._write(b) for b in blobs]
            if not done:
                return
            try:
                await self._put([w for w, _ in done])
            except BaseException:
                for w, _ in done:
                    self._saved.pop(w.blob, None)
                    if w.losers:
                        self._losers.setdefault(w.blob, []).extend(w.losers)
                self._book.dirty.update(blobs)
                raise
            for w, saved in done:
                if w.empty:
                    self._saved.pop(w.blob, None)
                else:
                    self._saved[w.blob] = saved

    def _write(self, blob: str) -> tuple[ChunkWrite, _Saved]:
        """What to write of `blob`, and what the store holds once it is written."""
        rec, dispute, barred = self._book.state(blob)
        saved = self._saved.get(blob)
        now = self._now(blob)
        head = now.head
        shrunk = rec is not None and saved is not None and saved.count > len(rec.digests)
        whole = saved is None or saved.head != head or shrunk
        start = 0 if whole or saved is None else saved.count
        losers = tuple(self._losers.pop(blob, ()))
        return ChunkWrite(
            blob,
            None if rec is None else self._stored(rec),
            start,
            whole,
            None if dispute is None else StoredChunkDispute(
                self._stored(dispute.records), dispute.reported_by, self._unix(dispute.opened_at)
            ),
            saved is None or saved.dispute is not dispute,
            tuple(sorted(barred)),
            saved is None or saved.barred != barred,
            losers,
        ), now

    def _now(self, blob: str) -> _Saved:
        rec, dispute, barred = self._book.state(blob)
        head = None if rec is None else (rec.size, rec.chunk_bytes, rec.publisher)
        return _Saved(head, 0 if rec is None else len(rec.digests), dispute, barred)

    def _unix(self, at: float) -> float:
        return self._wall() + (at - self._clock())

    def _at(self, unix: float) -> float:
        return self._clock() + (unix - self._wall())

    def _stored(self, rec: ChunkedBlob) -> StoredChunkRecords:
        return StoredChunkRecords(rec.size, rec.chunk_bytes, rec.publisher,
                                  self._unix(rec.touched_at), tuple(rec.digests),
                                  tuple(rec.metainfo))  # fmt: skip

    def records(self, r: StoredChunkRecords, count: int) -> ChunkedBlob:
        """Stored records on this clock, their first `count` chunks."""
        return ChunkedBlob(r.size, r.chunk_bytes, r.publisher, self._at(r.touched_at_unix),
                           list(r.digests[:count]), list(r.metainfo[:count]))  # fmt: skip

    def dispute(self, d: StoredChunkDispute) -> ChunkDispute:
        return ChunkDispute(self.records(d.records, len(d.records.digests)), d.reported_by,
                            self._at(d.opened_at_unix))  # fmt: skip

    def loaded(self, blob: str) -> None:
        """The book's state of `blob` is what the store holds (just loaded)."""
        self._saved[blob] = self._now(blob)
