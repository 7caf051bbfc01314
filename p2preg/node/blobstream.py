"""Streaming a verified blob from the store to one client.

Owns the hot path of the facade. A `BlobBody` is the body of a blob response:
while it is open it holds one of the node's stream slots (the semaphore that
caps concurrent blob streams), keeps the blob pinned in the store so that
eviction cannot pull it away mid-response, and holds the file open. Where the
server offers zero-copy send (hypercorn's HTTP/1.1 over plain TCP), the fence
(`p2preg.node.hypercorn_internals.ZeroCopyConnection`) lets the body hand the
server the open file and the byte range, and the kernel moves the bytes from
the page cache to the socket with sendfile: no blob byte enters Python.
Elsewhere (HTTP/2, TLS, another server) the body is read in chunks of
`stream_chunk_bytes`, one chunk in memory per open stream. This module must
not reach into hypercorn or Quart beyond their public API and the fence's
public names.

Chunks are read with `pread` on the event loop, not in a worker thread: a
page-cache read of 1 MiB costs about as much as the thread hop it would replace
(measured in docs/BENCHMARKS.md), and the same holds for sendfile. A blob not
in the page cache stalls the loop for one chunk's disk read, as nginx's
default `sendfile on` does. It gets its store, slots and metrics as one
`BlobStreams` and must not fetch, verify or decide anything: it serves only
what the store holds verified.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import BinaryIO

import trio
from quart.wrappers.response import ResponseBody

from p2preg.core.digest import Digest
from p2preg.node.httprange import ByteRange
from p2preg.node.hypercorn_internals import SendFile
from p2preg.node.metrics import NodeMetrics
from p2preg.node.store import BlobStore


@dataclass(frozen=True)
class BlobStreams:
    """What every blob body shares: the store it reads, the slots that cap open
    streams, the chunk size of the copying path, and the metrics it counts in."""

    store: BlobStore
    slots: trio.Semaphore
    chunk_bytes: int
    metrics: NodeMetrics


class BlobBody(ResponseBody):
    """The bytes of a stored blob in `rng`, as a Quart response body."""

    def __init__(self, streams: BlobStreams, digest: Digest, rng: ByteRange) -> None:
        self._streams = streams
        self._digest = digest
        self._rng = rng
        self._file: BinaryIO | None = None
        self._exit = contextlib.AsyncExitStack()

    async def __aenter__(self) -> BlobBody:
        streams = self._streams
        async with contextlib.AsyncExitStack() as stack:
            streams.metrics.streams_waiting.inc()
            try:
                await streams.slots.acquire()
            finally:
                streams.metrics.streams_waiting.dec()
            stack.callback(streams.slots.release)
            streams.metrics.streams_active.inc()
            stack.callback(streams.metrics.streams_active.dec)
            path = stack.enter_context(streams.store.reading(self._digest))
            # Opening a local file does not block the way reading it might.
            file = open(path, "rb", buffering=0)  # noqa: ASYNC230, SIM115
            self._file = stack.enter_context(file)
            self._exit = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._file = None
        await self._exit.aclose()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        assert self._file is not None, "iterated outside `async with`"
        fd, chunk = self._file.fileno(), self._streams.chunk_bytes
        served = self._streams.metrics.bytes_served
        offset, end = self._rng.start, self._rng.end + 1
        while offset < end:
            data = os.pread(fd, min(chunk, end - offset), offset)
            if not data:
                return
            offset += len(data)
            served.inc(len(data))
            yield data

    async def send_zerocopy(self, send_file: SendFile) -> None:
        """The whole range as one zero-copy send that also ends the response."""
        assert self._file is not None, "sent outside `async with`"
        # Counted when handed to the server, as each chunk is on the other path.
        self._streams.metrics.bytes_served.inc(self._rng.length)
        await send_file(self._file, self._rng.start, self._rng.length)
