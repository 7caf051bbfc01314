"""The tracker's chunk book: who may file a blob's chunks, in what order, and its bounds."""

from __future__ import annotations

import pytest

from p2preg.core import errors, wire
from p2preg.core.digest import Digest
from p2preg.core.metainfo import MAX_CHUNKS
from tracker import chunks
from tracker.chunks import ChunkBook

MiB = 1 << 20
BLOB = str(Digest.of(b"the blob"))
SIZE = 5 * MiB + 1  # six chunks of 1 MiB, the last of one byte


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def _chunk(i: int, node: str = "holder", size: int = SIZE) -> wire.PublishChunk:
    return wire.PublishChunk(node, size, MiB, i, str(Digest.of(b"%d" % i)), b"m%d" % i)


def _file(book: ChunkBook, msg: wire.PublishChunk, holder: str | None = "holder") -> int:
    length = book.check(BLOB, msg, holder)
    book.file(BLOB, msg, msg.metainfo)
    return length


def test_the_holder_files_chunks_in_order_and_waiters_read_them() -> None:
    book = ChunkBook(Clock())
    assert [_file(book, _chunk(i)) for i in range(3)] == [MiB, MiB, MiB]
    assert _file(book, _chunk(2)) == MiB  # the same chunk again: nothing changes
    listing = book.listing(BLOB, "holder")
    assert (listing.publisher, listing.size, listing.chunk_bytes) == ("holder", SIZE, MiB)
    assert listing.digests == [_chunk(i).digest for i in range(3)]
    assert listing.open
    for i in range(3, 6):
        _file(book, _chunk(i))
    assert book.check(BLOB, _chunk(5), "holder") == 1  # the last chunk's length
    assert book.listing(BLOB, "holder").open  # complete, the whole blob not seeded yet
    # The holder gone (lease expired, released): nothing more will come.
    book2 = ChunkBook(Clock())
    _file(book2, _chunk(0))
    assert not book2.listing(BLOB, None).open


@pytest.mark.parametrize(
    ("msg", "holder", "error"),
    [
        (_chunk(0, node="other"), "holder", errors.Forbidden),  # not the lease holder
        (_chunk(0), None, errors.Forbidden),  # nobody holds the lease
        (_chunk(1), "holder", errors.InvalidRequest),  # chunk 0 comes first
        (_chunk(6), "holder", errors.InvalidRequest),  # past the blob's end
        (_chunk(0, size=MiB), "holder", errors.InvalidRequest),  # one chunk: not chunked
        (_chunk(0, size=(MAX_CHUNKS + 1) * MiB), "holder", errors.InvalidRequest),
        (wire.PublishChunk("holder", SIZE, 1000, 0, BLOB, b"m"), "holder", errors.InvalidRequest),
    ],
)
def test_chunks_that_break_the_rules_are_refused(
    msg: wire.PublishChunk, holder: str | None, error: type[Exception]
) -> None:
    with pytest.raises(error):
        ChunkBook(Clock()).check(BLOB, msg, holder)


def test_a_chunk_filed_otherwise_or_out_of_order_is_refused() -> None:
    book = ChunkBook(Clock())
    _file(book, _chunk(0))
    other = wire.PublishChunk("holder", SIZE, MiB, 0, str(Digest.of(b"x")), b"x")
    with pytest.raises(errors.MetainfoConflict):
        book.check(BLOB, other, "holder")
    with pytest.raises(errors.InvalidRequest):
        book.check(BLOB, _chunk(2), "holder")
    with pytest.raises(errors.MetainfoConflict):  # cut otherwise
        book.check(BLOB, wire.PublishChunk("holder", SIZE, 2 * MiB, 1, BLOB, b"m"), "holder")


def test_a_new_holder_starts_over_and_the_old_chunks_are_dropped() -> None:
    book = ChunkBook(Clock())
    _file(book, _chunk(0))
    _file(book, _chunk(1))
    fresh = wire.PublishChunk("next", SIZE, MiB, 0, str(Digest.of(b"n0")), b"n0")
    book.check(BLOB, fresh, "next")
    filed = book.file(BLOB, fresh, b"n0")
    assert sorted(filed.dropped) == sorted([_chunk(0).digest, _chunk(1).digest])
    assert book.listing(BLOB, "next").publisher == "next"


def _disputed() -> ChunkBook:
    """Six chunks filed by `holder`, reported by `reporter`."""
    book = ChunkBook(Clock())
    for i in range(5):
        _file(book, _chunk(i))
    # Not every chunk filed yet: nobody assembled the blob, so the report is void.
    assert book.report(BLOB, "holder", "reporter") is None
    assert book.dispute(BLOB) is None
    _file(book, _chunk(5))
    assert book.report(BLOB, "someone else", "reporter") is None  # not the publisher
    assert book.report(BLOB, "holder", "holder") is None  # not one's own
    assert sorted(book.report(BLOB, "holder", "reporter") or []) == sorted(
        _chunk(i).digest for i in range(6)
    )
    # Set aside: nobody follows them meanwhile; the list names their cut alone, for
    # the verifier to cut alike.
    aside = book.listing(BLOB, None)
    assert (aside.publisher, aside.size, aside.chunk_bytes) == ("holder", SIZE, MiB)
    assert (aside.digests, aside.metainfo, aside.open) == ([], [], False)
    dispute = book.dispute(BLOB)
    assert dispute is not None and dispute.party("holder") and dispute.party("reporter")
    assert not dispute.party("verifier")
    return book


def test_a_false_report_is_judged_by_the_verifiers_chunks() -> None:
    book = _disputed()
    for i in range(5):
        _file(book, _chunk(i, node="verifier"), "verifier")
        assert book.judge(BLOB, _chunk(i, node="verifier"), True) is None
    _file(book, _chunk(5, node="verifier"), "verifier")
    verdict = book.judge(BLOB, _chunk(5, node="verifier"), True)
    assert verdict == chunks.Verdict(chunks.UPHELD, "reporter")
    assert book.dispute(BLOB) is None
    assert book.listing(BLOB, None).publisher == "holder"  # its records stand


def test_a_chunk_that_differs_convicts_the_publisher() -> None:
    book = _disputed()
    _file(book, _chunk(0, node="verifier"), "verifier")
    assert book.judge(BLOB, _chunk(0, node="verifier"), True) is None
    wrong = wire.PublishChunk("verifier", SIZE, MiB, 1, str(Digest.of(b"real")), b"r")
    book.check(BLOB, wrong, "verifier")
    book.file(BLOB, wrong, b"r")
    assert book.judge(BLOB, wrong, True) == chunks.Verdict(chunks.OVERTURNED, "holder")
    assert book.dispute(BLOB) is None
    with pytest.raises(errors.Forbidden):  # barred from filing this blob's chunks
        book.check(BLOB, _chunk(0), "holder")


def test_a_verifier_without_chunks_to_compare_closes_the_dispute() -> None:
    book = _disputed()
    assert not book.close(BLOB, "reporter")  # a side cannot end it
    assert book.close(BLOB, "verifier")
    assert book.dispute(BLOB) is None
    book = _disputed()  # cut otherwise: no verdict either
    other = wire.PublishChunk("verifier", SIZE, 2 * MiB, 0, str(Digest.of(b"0")), b"m0")
    assert book.judge(BLOB, other, True) is None
    assert book.dispute(BLOB) is None


def test_a_side_cannot_judge_and_a_torrent_that_differs_convicts() -> None:
    book = _disputed()
    assert book.judge(BLOB, _chunk(0, node="reporter"), True) is None  # a party: no verdict
    assert book.dispute(BLOB) is not None
    # The same chunk digest under another torrent (same CA): the publisher lied.
    assert book.judge(BLOB, _chunk(0, node="verifier"), False) == chunks.Verdict(
        chunks.OVERTURNED, "holder"
    )


def test_records_expire_and_the_book_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    book = ChunkBook(clock)
    _file(book, _chunk(0))
    clock.now = chunks.RECORD_TTL_S + 1
    assert book.expire() == [_chunk(0).digest]
    assert len(book) == 0
    monkeypatch.setattr(chunks, "MAX_CHUNKED_BLOBS", 3)
    for n in range(5):
        blob = str(Digest.of(b"blob %d" % n))
        clock.now += 1
        msg = wire.PublishChunk("holder", SIZE, MiB, 0, str(Digest.of(b"c%d" % n)), b"c")
        book.check(blob, msg, "holder")
        book.file(blob, msg, b"c")
    assert len(book) == 3
