"""A blob cut into 1 MiB chunks with real chunk torrents, for tests of the tracker's chunk book.

`Cut.make` writes a blob of three chunks (the last one byte) and the torrent of
each chunk; `lie=True` alters chunk 0's bytes first, as a holder gone bad would
(its torrent is then made from the altered bytes: the chunk's own digest checks
out, the blob does not). `publish` files chunks as `node` does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from p2preg.core import wire
from p2preg.core.digest import Digest
from p2preg.core.metainfo import Metainfo
from tracker.client import TrackerClient
from tracker.metainfo import make_metainfo

MiB = 1 << 20
SIZE = 2 * MiB + 1


@dataclass(frozen=True)
class Cut:
    blob: Digest
    chunks: list[tuple[Digest, Metainfo]]

    @classmethod
    def make(cls, where: Path, data: bytes, *, lie: bool = False) -> Cut:
        where.mkdir(parents=True, exist_ok=True)
        blob = Digest.of(data)
        chunks = []
        for i in range(0, len(data), MiB):
            part = data[i : i + MiB]
            if lie and i == 0:
                part = b"\0" + part[1:]
            digest = Digest.of(part)
            path = where / digest.hex
            path.write_bytes(part)
            chunks.append((digest, make_metainfo(path, digest, len(part))))
        return cls(blob, chunks)

    def msg(self, node: str, index: int) -> wire.PublishChunk:
        digest, meta = self.chunks[index]
        return wire.PublishChunk(node, SIZE, MiB, index, str(digest), meta.data)

    async def publish(self, client: TrackerClient, count: int | None = None) -> None:
        for i in range(len(self.chunks) if count is None else count):
            await client.publish_chunk(self.blob, self.msg(client.node, i))

    @property
    def digests(self) -> list[str]:
        return [str(d) for d, _ in self.chunks]


def blob_data() -> bytes:
    return os.urandom(SIZE)
