"""The node's chunk rules without a network: the chunk size of a blob, and the cutter."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from p2preg.core.digest import Digest
from p2preg.node.chunks import ChunkSettings, Cutter
from p2preg.node.store import StoreError

MiB = 1 << 20


def _settings(chunk_bytes: int = 4 * MiB, min_count: int = 2) -> ChunkSettings:
    return ChunkSettings(chunk_bytes, min_count, stall_s=30, max_hash_failures=16)


@pytest.mark.parametrize(
    ("size", "chunk"),
    [
        (1, None),
        (8 * MiB - 1, None),  # under two whole chunks: moves whole
        (8 * MiB, 4 * MiB),
        (25_000_000, 4 * MiB),  # the benchmark's layers: 6 chunks
        (100 * MiB, 4 * MiB),  # 1 MiB pieces: 4 MiB is a multiple
        (1 << 30, 8 * MiB),  # 8 MiB pieces: a chunk is one piece at least
        (8 * MiB + 1, 4 * MiB),
        (128 << 30, None),  # past the tracker's chunk count
    ],
)
def test_the_chunk_size_is_aligned_to_the_blob_pieces(size: int, chunk: int | None) -> None:
    assert _settings().cut_for(size) == chunk


def test_the_cutter_writes_one_file_per_chunk_whatever_the_batches(tmp_path: Path) -> None:
    data = os.urandom(3 * MiB + 123)
    cutter = Cutter(Digest.of(data), len(data), MiB, tmp_path)
    cuts = []
    for start in range(0, len(data), 700_001):  # batches across chunk boundaries
        cuts += cutter.write(data[start:start + 700_001])
    assert [c.index for c in cuts] == [0, 1, 2, 3]
    for c in cuts:
        part = data[c.index * MiB:(c.index + 1) * MiB]
        assert c.path.read_bytes() == part and c.length == len(part)
        assert c.digest == Digest.parse("sha256:" + hashlib.sha256(part).hexdigest())
    with pytest.raises(StoreError):
        cutter.write(b"one byte too many")


def test_a_cutter_closed_midway_leaves_no_partial_chunk(tmp_path: Path) -> None:
    cutter = Cutter(Digest.of(b"x"), 3 * MiB, MiB, tmp_path)
    assert len(cutter.write(bytes(MiB + 5))) == 1
    cutter.close()
    assert [p.name.endswith("-0.part") for p in tmp_path.iterdir()] == [True]
