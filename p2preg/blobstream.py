"""Streaming a verified blob from the store to one client.

Owns the hot path of the facade: bytes of a stored blob go out in large chunks
with one chunk in memory per open stream, and the number of open streams is
capped by the node's semaphore. The blob stays pinned in the store while it is
read so that eviction cannot pull it away mid-response.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import trio

from p2preg.core.digest import Digest
from p2preg.httprange import ByteRange

if TYPE_CHECKING:
    from p2preg.node import Node


async def stream_blob(node: Node, digest: Digest, rng: ByteRange) -> AsyncIterator[bytes]:
    """The verified blob's bytes in `rng`, one chunk in memory at a time."""
    chunk = node.config.stream_chunk_bytes
    async with node.streams:
        node.metrics.streams_active.inc()
        try:
            with node.store.reading(digest) as path:
                fd = os.open(path, os.O_RDONLY)
                try:
                    offset, end = rng.start, rng.end + 1
                    while offset < end:
                        n = min(chunk, end - offset)
                        data = await trio.to_thread.run_sync(os.pread, fd, n, offset)
                        if not data:
                            return
                        offset += len(data)
                        node.metrics.bytes_served.inc(len(data))
                        yield data
                finally:
                    os.close(fd)
        finally:
            node.metrics.streams_active.dec()
