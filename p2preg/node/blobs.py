"""Getting a blob into the verified store, once per node however many ask.

Owns the blob read path behind the facade: the tenancy check (the upstream
must have shown that the repository holds the blob), and the single-flight
fetch that streams a missing blob into the store. A fetch runs in the node's
own nursery, not in the request that started it, so a client that hangs up
does not cancel the download the other waiters are counting on. A blob is
visible to readers only once its whole digest matched.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

import trio

from p2preg.core.digest import Digest
from p2preg.node.errors import BlobUnknown, RegistryError, StoreFull, UpstreamError
from p2preg.node.metrics import NodeMetrics
from p2preg.node.p2p import P2P, Fallback, Progress
from p2preg.node.pullorder import PullOrder
from p2preg.node.store import BlobStore, BlobWriter, DigestMismatch, NoSpace, StoreError
from p2preg.node.tenancy import Tenancy
from p2preg.node.upstream import UpstreamClient

log = logging.getLogger(__name__)

# Blob bytes are handed to the hashing/writing thread in batches this large, so
# the per-batch thread hop stays small next to the work it carries.
WRITE_BATCH_BYTES = 1 << 20
# A seed registry that sends corrupt bytes gets one more chance.
MISMATCH_ATTEMPTS = 2
# How many finished fetches `p2preg status` can show.
RECENT_FETCHES = 50


@dataclass(frozen=True, slots=True)
class FetchRecord:
    """One finished fetch into the store: where the blob came from (or `failed`)."""

    at_unix: float
    digest: str
    repository: str
    source: str
    size: int
    seconds: float


class _StoreSink:
    """Feeds upstream bytes to a BlobWriter in a worker thread, in large batches."""

    def __init__(self, writer: BlobWriter, progress: Progress | None = None) -> None:
        self._writer = writer
        self._progress = progress or (lambda n: None)
        self._buffer = bytearray()
        self.offset = 0

    async def write(self, chunk: bytes) -> None:
        self._buffer += chunk
        self.offset += len(chunk)
        self._progress(self.offset)
        if len(self._buffer) >= WRITE_BATCH_BYTES:
            await self.flush()

    async def flush(self) -> None:
        if self._buffer:
            batch, self._buffer = bytes(self._buffer), bytearray()
            await trio.to_thread.run_sync(self._writer.write, batch)

    async def reset(self) -> None:
        self._buffer.clear()
        self.offset = 0
        await trio.to_thread.run_sync(self._writer.reset)


@dataclass
class _Flight:
    done: trio.Event = field(default_factory=trio.Event)
    error: RegistryError | None = None


class Blobs:
    def __init__(
        self,
        store: BlobStore,
        tenancy: Tenancy,
        metrics: NodeMetrics,
        nursery: trio.Nursery,
        pull_order: PullOrder,
        p2p: P2P | None = None,
    ) -> None:
        self._p2p = p2p
        self._pull_order = pull_order
        self._store = store
        self._tenancy = tenancy
        self._metrics = metrics
        self._nursery = nursery
        self._flights: dict[Digest, _Flight] = {}
        self.recent: deque[FetchRecord] = deque(maxlen=RECENT_FETCHES)

    async def authorize(
        self, client: UpstreamClient, repository: str, digest: Digest
    ) -> int | None:
        """Prove that `repository` holds the blob upstream (once; the answer is kept).

        Returns the upstream's size when it had to be asked, else None.
        """
        ns = client.upstream.ns
        if self._tenancy.holds(ns, repository, digest):
            return None
        size = await client.blob_size(repository, digest)
        if size is None:
            raise BlobUnknown(f"blob {digest} is unknown to repository {repository}")
        self._tenancy.grant(ns, repository, [digest])
        return size

    async def size(self, client: UpstreamClient, repository: str, digest: Digest) -> int:
        """The blob's size for a HEAD, without downloading it when upstream says it."""
        size = await self.authorize(client, repository, digest)
        stored = self._store.size(digest)
        if stored is not None:
            return stored
        if size is None:
            size = await client.blob_size(repository, digest)
            if size is None:
                raise BlobUnknown(f"blob {digest} is unknown to repository {repository}")
        if size < 0:  # upstream sent no length: only the bytes themselves can tell
            await self.ensure(client, repository, digest)
            return self._store.size(digest) or 0
        return size

    async def ensure(self, client: UpstreamClient, repository: str, digest: Digest) -> None:
        """Return once the blob is verified in the store; one fetch however many ask."""
        if digest in self._store:
            return
        flight = self._flights.get(digest)
        if flight is None:
            flight = self._flights[digest] = _Flight()
            self._nursery.start_soon(self._fly, flight, client, repository, digest)
        else:
            self._metrics.blob_fetch_joins.inc()
        await flight.done.wait()
        if flight.error is not None:
            err = flight.error
            raise type(err)(err.message, headers=err.headers)

    async def _fly(
        self, flight: _Flight, client: UpstreamClient, repository: str, digest: Digest
    ) -> None:
        start = trio.current_time()
        try:
            source, size = await self._fetch(client, repository, digest)
        except RegistryError as e:
            flight.error = e
            log.warning("blob %s: every source failed: %s", digest, e.message)
            self._remember(digest, repository, "failed", 0, start)
        except Exception as e:
            flight.error = UpstreamError(f"fetching blob {digest} failed: {type(e).__name__}")
            log.exception("blob %s: unexpected failure", digest)
            self._remember(digest, repository, "failed", 0, start)
        else:
            elapsed = trio.current_time() - start
            self._metrics.blob_fetches.labels(source).inc()
            self._metrics.blob_fetch_seconds.labels(source).observe(elapsed)
            log.info(
                "blob %s source=%s size=%d time=%.3fs repository=%s",
                digest, source, size, elapsed, repository,
                extra={"digest": str(digest), "source": source, "size": size,
                       "seconds": round(elapsed, 3), "repository": repository},
            )
            self._remember(digest, repository, source, size, start)
        finally:
            del self._flights[digest]
            flight.done.set()

    def _remember(
        self, digest: Digest, repository: str, source: str, size: int, start: float
    ) -> None:
        elapsed = round(trio.current_time() - start, 3)
        self.recent.append(FetchRecord(time.time(), str(digest), repository, source, size, elapsed))

    async def _fetch(
        self, client: UpstreamClient, repository: str, digest: Digest
    ) -> tuple[str, int]:
        """Fetch into the store by the best path; returns (source, size)."""

        async def upstream(progress: Progress | None = None) -> int:
            return await self._from_upstream(client, repository, digest, progress)

        size = await client.blob_size(repository, digest)
        if size is None:
            raise BlobUnknown(f"blob {digest} is unknown to repository {repository}")
        if size > 0:
            # Fail fast, or evict, before downloading into a disk that cannot hold it.
            try:
                self._store.reserve(size)
            except NoSpace as e:
                raise StoreFull(f"no space to store blob {digest}: {e}") from None
        if self._p2p is None:
            return "upstream", await upstream()
        if 0 <= size < self._p2p.settings.min_bytes:
            return "upstream", await upstream()
        try:
            place = self._pull_order.of(digest)
            source = await self._p2p.fetch(digest, size, upstream, place)
        except Fallback as e:
            self._metrics.fallbacks.labels(e.reason).inc()
            log.warning("blob %s: falling back to upstream (%s): %s", digest, e.reason, e)
            size = await upstream()
            # Seed what we verified: the swarm may lack a seeder, or hold bad metainfo.
            await self._p2p.publish(digest, size)
            return "upstream", size
        return source, self._store.size(digest) or size

    async def _from_upstream(
        self,
        client: UpstreamClient,
        repository: str,
        digest: Digest,
        progress: Progress | None = None,
    ) -> int:
        for attempt in range(1, MISMATCH_ATTEMPTS + 1):
            writer = self._store.writer(digest)
            sink = _StoreSink(writer, progress)
            try:
                await client.fetch_blob(repository, digest, sink)
                await sink.flush()
                size = await trio.to_thread.run_sync(writer.finish)
            except DigestMismatch as e:
                self._metrics.digest_mismatches.inc()
                log.warning("blob %s: upstream sent bad bytes (attempt %d): %s", digest, attempt, e)
                continue
            except NoSpace as e:
                writer.abort()
                raise StoreFull(f"no space to store blob {digest}: {e}") from None
            except StoreError as e:
                writer.abort()
                raise UpstreamError(f"cannot store blob {digest}: {e}") from None
            except BaseException:
                writer.abort()
                raise
            try:
                writer.commit()
            except NoSpace as e:
                writer.abort()
                raise StoreFull(str(e)) from None
            return size
        raise UpstreamError(f"seed registry kept sending bytes that do not match {digest}")
