"""Deterministic metainfo and its checks (p2preg/core/metainfo.py, tracker/metainfo.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import libtorrent as lt
import pytest

from p2preg.core.digest import Digest
from p2preg.core.metainfo import (
    MAX_PIECE_BYTES,
    MIN_PIECE_BYTES,
    MetainfoError,
    MetainfoTooLarge,
    info_name,
    piece_size_for,
)
from tracker.metainfo import make_metainfo, parse_metainfo


@pytest.fixture
def blob(tmp_path: Path) -> tuple[Path, Digest, int]:
    data = os.urandom(300_000)
    path = tmp_path / "some-store-name"
    path.write_bytes(data)
    return path, Digest.of(data), len(data)


def _decoded(data: bytes) -> Any:
    return lt.bdecode(data)


def _encoded(top: Any) -> bytes:
    out: bytes = lt.bencode(top)
    return out


def test_piece_size_rule() -> None:
    assert piece_size_for(1) == MIN_PIECE_BYTES
    assert piece_size_for(100_000_000) == 1024 * 1024  # the size measured fastest
    assert piece_size_for(10**12) == MAX_PIECE_BYTES
    for size in (1, 5_000, 70_000, 10**7, 3 * 10**9):
        p = piece_size_for(size)
        assert p & (p - 1) == 0 and MIN_PIECE_BYTES <= p <= MAX_PIECE_BYTES
    with pytest.raises(MetainfoError):
        piece_size_for(0)


def test_two_nodes_make_identical_metainfo(blob: tuple[Path, Digest, int], tmp_path: Path) -> None:
    path, digest, size = blob
    other = tmp_path / "elsewhere" / "another-name"
    other.parent.mkdir()
    other.write_bytes(path.read_bytes())
    a = make_metainfo(path, digest, size)
    b = make_metainfo(other, digest, size)
    assert a.data == b.data
    assert a.info_hash_v1 is None and len(a.info_hash_v2) == 32
    assert a.swarm_keys == (a.info_hash_v2[:20],)
    info = _decoded(a.data)[b"info"]
    assert info[b"private"] == 1
    assert info[b"name"] == info_name(digest).encode() == f"sha256-{digest.hex}".encode()
    assert set(_decoded(a.data)) == {b"info", b"piece layers"}


def test_hybrid_has_two_swarm_keys(blob: tuple[Path, Digest, int]) -> None:
    path, digest, size = blob
    meta = make_metainfo(path, digest, size, hybrid=True)
    assert meta.info_hash_v1 is not None
    assert meta.swarm_keys == (meta.info_hash_v1, meta.info_hash_v2[:20])
    assert parse_metainfo(meta.data, digest, size).swarm_keys == meta.swarm_keys


def test_parse_accepts_what_make_produces(blob: tuple[Path, Digest, int]) -> None:
    path, digest, size = blob
    meta = make_metainfo(path, digest, size)
    assert parse_metainfo(meta.data, digest, size) == meta


def _mutated(data: bytes, change: Any) -> bytes:
    top = _decoded(data)
    change(top)
    return _encoded(top)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda t: t[b"info"].pop(b"private"), "not private"),
        (lambda t: t[b"info"].__setitem__(b"private", 0), "not private"),
        (lambda t: t.__setitem__(b"announce", b"http://x/announce"), "node-specific"),
        (lambda t: t.__setitem__(b"creation date", 1), "node-specific"),
        (lambda t: t[b"info"].__setitem__(b"source", b"node7"), "unexpected keys"),
        (lambda t: t[b"info"].__setitem__(b"piece length", 32768), "piece length"),
        (lambda t: t[b"info"].__setitem__(b"name", b"other"), "name"),
        (lambda t: t[b"info"].__setitem__(b"meta version", 1), "v2"),
        (lambda t: t.pop(b"piece layers"), "piece layers"),
    ],
)
def test_parse_refuses_inconsistent_metainfo(
    blob: tuple[Path, Digest, int], change: Any, message: str
) -> None:
    path, digest, size = blob
    bad = _mutated(make_metainfo(path, digest, size).data, change)
    with pytest.raises(MetainfoError, match=message):
        parse_metainfo(bad, digest, size)


def test_parse_refuses_wrong_digest_size_or_garbage(blob: tuple[Path, Digest, int]) -> None:
    path, digest, size = blob
    data = make_metainfo(path, digest, size).data
    with pytest.raises(MetainfoError, match="name"):
        parse_metainfo(data, Digest.of(b"something else"), size)
    with pytest.raises(MetainfoError, match="length"):
        parse_metainfo(data, digest, size + 1)
    with pytest.raises(MetainfoError, match="decode"):
        parse_metainfo(b"\x00garbage", digest, size)
    with pytest.raises(MetainfoError, match="canonical"):
        parse_metainfo(data + b"trailing", digest, size)
    with pytest.raises(MetainfoError, match="dictionary"):
        parse_metainfo(b"li1ee", digest, size)


def test_parse_refuses_tampered_piece_layers(blob: tuple[Path, Digest, int]) -> None:
    path, digest, size = blob

    def flip(top: Any) -> None:
        (root,) = top[b"piece layers"]
        layer = bytearray(top[b"piece layers"][root])
        layer[0] ^= 0xFF
        top[b"piece layers"][root] = bytes(layer)

    with pytest.raises(MetainfoError, match="invalid"):
        parse_metainfo(_mutated(make_metainfo(path, digest, size).data, flip), digest, size)


def test_parse_refuses_oversized(blob: tuple[Path, Digest, int]) -> None:
    path, digest, size = blob
    data = make_metainfo(path, digest, size).data
    with pytest.raises(MetainfoTooLarge):
        parse_metainfo(data, digest, size, max_bytes=len(data) - 1)


def test_empty_blob_has_no_torrent(tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(MetainfoError, match="0 bytes"):
        make_metainfo(tmp_path / "empty", Digest.of(b""), 0)
