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
