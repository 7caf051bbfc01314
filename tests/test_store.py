import os
from pathlib import Path

import pytest

from p2preg.core.digest import Digest
from p2preg.node.store import BlobStore, DigestMismatch, NoSpace


def _put(store: BlobStore, data: bytes) -> Digest:
    d = Digest.of(data)
    w = store.writer(d)
    w.write(data)
    w.finish()
    w.commit()
    return d


def test_verified_blob_becomes_visible(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, 1 << 20)
    store.open()
    d = _put(store, b"layer bytes")
    assert d in store and store.size(d) == 11
    assert store.path(d).read_bytes() == b"layer bytes"
    assert list(store.tmp_dir.iterdir()) == []


def test_mismatch_leaves_nothing_under_the_digest(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, 1 << 20)
    store.open()
    d = Digest.of(b"expected")
    w = store.writer(d)
    w.write(b"something else")
    with pytest.raises(DigestMismatch):
        w.finish()
    assert d not in store
    assert not store.path(d).exists()
    assert list(store.tmp_dir.iterdir()) == []


def test_reset_starts_over(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, 1 << 20)
    store.open()
    d = Digest.of(b"abc")
    w = store.writer(d)
    w.write(b"zzz")
    w.reset()
    w.write(b"abc")
    assert w.finish() == 3


def test_reopen_indexes_blobs_and_drops_crash_leftovers(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, 1 << 20)
    store.open()
    d = _put(store, b"kept")
    half = store.writer(Digest.of(b"never finished"))
    half.write(b"never")  # a crash here leaves a temp file behind
    (store.blob_dir / "sha256" / "not-a-digest").write_bytes(b"stray")
    again = BlobStore(tmp_path, 1 << 20)
    again.open()
    assert again.digests() == [d] and again.used_bytes == 4
    assert list(again.tmp_dir.iterdir()) == []
    half.abort()  # the crashed process's file handle, which a real crash would close


def test_budget_evicts_least_recently_used_but_never_a_blob_being_read(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, 100)
    store.open()
    a = _put(store, b"a" * 40)
    b = _put(store, b"b" * 40)
    with store.reading(a):  # a is older, but pinned by a reader
        c = _put(store, b"c" * 40)
    assert a in store and b not in store and c in store
    assert store.used_bytes == 80 and store.evictions == 1
    assert not store.path(b).exists()


def test_blob_larger_than_budget_is_refused(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, 10)
    store.open()
    with pytest.raises(NoSpace):
        _put(store, b"x" * 11)
    assert len(store) == 0


def test_disk_full_is_no_space(tmp_path: Path) -> None:
    if not Path("/dev/full").exists():
        pytest.fail("/dev/full is missing on this machine")
    store = BlobStore(tmp_path, 1 << 20)
    store.open()
    d = Digest.of(b"x" * 100_000)
    w = store.writer(d)
    w._file.close()
    w._file = open("/dev/full", "wb", buffering=0)  # noqa: SIM115 - a real ENOSPC
    with pytest.raises(NoSpace):
        w.write(b"x" * 100_000)
    w.abort()
    assert d not in store
    assert os.listdir(store.tmp_dir) == []


def test_reserve_evicts_for_disk_space_only_when_it_can_make_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import p2preg.node.store as store_module

    store = BlobStore(tmp_path, 1 << 30)
    store.open()
    a, b, c = (_put(store, bytes([i]) * 1000) for i in range(3))
    free = {"bytes": store_module.DISK_MARGIN_BYTES + 500}
    monkeypatch.setattr(store_module, "_free_bytes", lambda path: free["bytes"])
    store.reserve(500)  # fits: nothing goes
    assert len(store) == 3
    with store.reading(a):  # a is read (and so most recent): b, the oldest, makes the room
        store.reserve(1500)
    assert a in store and b not in store and c in store
    with pytest.raises(NoSpace):  # even without every unread blob it would not fit
        store.reserve(10_000)
    assert a in store  # and nothing was evicted for it
    with pytest.raises(NoSpace):
        store.reserve(2 << 30)  # over the budget


def test_eviction_spares_what_it_is_asked_to_until_nothing_else_frees_enough(
    tmp_path: Path,
) -> None:
    spared: set[Digest] = set()
    removed: list[Digest] = []
    store = BlobStore(tmp_path, 3000, on_remove=removed.append, spare=spared.__contains__)
    store.open()
    a, b, c = (_put(store, bytes([i]) * 1000) for i in range(3))
    spared.add(a)  # say a's swarm has no other seeder
    d = _put(store, b"\x09" * 1000)  # needs one blob's room: b goes, not the older a
    assert a in store and b not in store and c in store
    assert removed == [b]  # and whoever seeds it is told
    _put(store, b"\x0a" * 2500)  # needs more than every other unread blob: a goes too
    assert a not in store
    assert removed == [b, c, d, a]  # the spared one last
    assert store.used_bytes <= 3000


def test_eviction_never_takes_a_pinned_blob(tmp_path: Path) -> None:
    """A pinned blob is no victim, not even a last resort: the new blob is refused instead."""
    removed: list[Digest] = []
    spared: set[Digest] = set()
    store = BlobStore(tmp_path, 3000, on_remove=removed.append, spare=spared.__contains__)
    store.open()
    a, b, c = (_put(store, bytes([i]) * 1000) for i in range(3))
    store.pin([a])
    spared.add(b)  # spared is taken last; pinned is never taken
    assert store.pinned(a) and store.pinned_bytes == 1000
    d = _put(store, b"\x09" * 1000)  # a is the least recently used, c goes
    assert a in store and c not in store and removed == [c]
    e = _put(store, b"\x0a" * 2000)  # only b and d may go for it, never a
    assert a in store and removed == [c, d, b]
    with pytest.raises(NoSpace, match="1000 bytes are pinned"):
        _put(store, b"\x0b" * 2500)  # fits the budget only without a: refused, a stays
    assert a in store and e in store  # and nothing was evicted for a blob that cannot fit
    assert removed == [c, d, b] and store.used_bytes == 3000
    store.pin([a])  # a second pin of the same blob (two images share a layer)
    store.unpin([a])
    assert store.pinned(a)
    store.unpin([a])  # the last pin gone, a is an ordinary blob again
    assert not store.pinned(a) and store.pinned_bytes == 0
    _put(store, b"\x0b" * 2500)
    assert a not in store


def test_reserve_does_not_count_pinned_blobs_as_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import p2preg.node.store as store_module

    store = BlobStore(tmp_path, 1 << 30)
    store.open()
    a, b = (_put(store, bytes([i]) * 1000) for i in range(2))
    store.pin([a])
    monkeypatch.setattr(store_module, "_free_bytes", lambda path: store_module.DISK_MARGIN_BYTES)
    with pytest.raises(NoSpace):  # b alone cannot free 1500 bytes; a is pinned
        store.reserve(1500)
    assert a in store and b in store  # and nothing was evicted for it
    store.reserve(800)  # b can
    assert a in store and b not in store


def test_a_pin_may_name_a_blob_not_stored_yet(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, 2000)
    store.open()
    data = b"\x05" * 1000
    store.pin([Digest.of(data)])  # pinned before its fetch: never evicted once it lands
    assert store.pinned_bytes == 0
    d = _put(store, data)
    assert store.pinned_bytes == 1000
    _put(store, b"\x06" * 1000)
    with pytest.raises(NoSpace):
        _put(store, b"\x07" * 1500)
    assert d in store
