"""Getting a blob into the verified store, once per node however many ask.

Owns the blob read path behind the facade: the tenancy check (the upstream
must have shown that the repository holds the blob — one HEAD, whose size the
fetch then uses), and the single flight that fetches a missing blob once
however many ask, with its metrics, log line and `recent` record. While
upstream is unreachable, a blob that the cluster's word granted the
repository (tenancy.py; only with `cluster_fallback`) is authorized without
upstream, its size the one its manifest declares, and fetched from peers only
(fetch.py); so is one upstream proved the repository holds (an evicted blob),
its size then the swarm's. A fetch runs
in the node's own nursery, not in the request that started it, so a client
that hangs up does not cancel the download the other waiters are counting on.
Where the bytes come from is fetch.py's decision: this module must not
ask the swarm or the tracker anything.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

import trio

from p2preg.core.digest import Digest
from p2preg.node.clusterword import ClusterWord
from p2preg.node.errors import BlobUnknown, RegistryError, UpstreamError
from p2preg.node.fetch import BlobFetcher
from p2preg.node.metrics import NodeMetrics
from p2preg.node.seams import UpstreamSeam
from p2preg.node.store import BlobStore
from p2preg.node.tagmap import stale_allowed
from p2preg.node.tenancy import Tenancy

log = logging.getLogger(__name__)

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


@dataclass(frozen=True, slots=True)
class _Grant:
    """Why a repository may have a blob: the size it was told (None: not asked now;
    -1: not said), and whether it rests on the cluster's word (peers only)."""

    size: int | None
    peers_only: bool = False


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
        fetcher: BlobFetcher,
        nursery: trio.Nursery,
        cluster: ClusterWord | None = None,
    ) -> None:
        self._store = store
        self._cluster = cluster
        self._tenancy = tenancy
        self._metrics = metrics
        self._fetcher = fetcher
        self._nursery = nursery
        self._flights: dict[Digest, _Flight] = {}
        self.recent: deque[FetchRecord] = deque(maxlen=RECENT_FETCHES)

    async def _authorize(
        self, upstream: UpstreamSeam, repository: str, digest: Digest
    ) -> _Grant:
        """Prove that `repository` holds the blob upstream (once; the answer is kept),
        or, while upstream is unreachable, find that the cluster's word granted it."""
        ns = upstream.upstream.ns
        if self._tenancy.holds(ns, repository, digest):
            return _Grant(None)
        down = None if self._cluster is None else self._cluster.outage(ns)
        if down is not None and self._tenancy.on_cluster_word(ns, repository, digest) is not None:
            return self._on_cluster_word(down, ns, repository, digest)
        try:
            size = await upstream.blob_size(repository, digest)
        except RegistryError as e:
            if self._cluster is not None and stale_allowed(e):
                self._cluster.note_down(ns, e)
            return self._on_cluster_word(e, ns, repository, digest)
        if size is None:
            raise BlobUnknown(f"blob {digest} is unknown to repository {repository}")
        self._tenancy.grant(ns, repository, [digest])
        return _Grant(size)

    def _on_cluster_word(
        self, error: RegistryError, ns: str, repository: str, digest: Digest
    ) -> _Grant:
        size = self._tenancy.on_cluster_word(ns, repository, digest)
        word = self._cluster
        if word is None or not word.enabled or size is None or not stale_allowed(error):
            raise error
        word.taken("blob", f"blob {digest} of {repository} on {ns}", error.message)
        return _Grant(size, peers_only=True)

    async def size(self, upstream: UpstreamSeam, repository: str, digest: Digest) -> int:
        """The blob's size for a HEAD, without downloading it when upstream says it."""
        grant = await self._authorize(upstream, repository, digest)
        stored = self._store.size(digest)
        if stored is not None:
            return stored
        if grant.size is None:
            grant = await self._size_or_peers(upstream, repository, digest)
        assert grant.size is not None
        if grant.size < 0:  # no length said: only the bytes themselves can tell
            await self._ensure(upstream, repository, digest, grant)
            return self._store.size(digest) or 0
        return grant.size

    async def ensure(self, upstream: UpstreamSeam, repository: str, digest: Digest) -> None:
        """Return once `repository` may have the blob and it is verified in the store."""
        grant = await self._authorize(upstream, repository, digest)
        await self._ensure(upstream, repository, digest, grant)

    async def _size_or_peers(
        self, upstream: UpstreamSeam, repository: str, digest: Digest
    ) -> _Grant:
        """Upstream's size of a blob it proved the repository holds; while it is down,
        a fetch from peers (the size unsaid: the swarm's torrent tells it)."""
        try:
            return _Grant(await self._upstream_size(upstream, repository, digest))
        except RegistryError as e:
            if self._cluster is None or not stale_allowed(e):
                raise
            return _Grant(-1, peers_only=True)

    async def _upstream_size(self, upstream: UpstreamSeam, repository: str, digest: Digest) -> int:
        size = await upstream.blob_size(repository, digest)
        if size is None:
            raise BlobUnknown(f"blob {digest} is unknown to repository {repository}")
        return size

    async def _ensure(
        self, upstream: UpstreamSeam, repository: str, digest: Digest, grant: _Grant
    ) -> None:
        """One fetch however many ask; `grant` has upstream's size if this request has one."""
        if digest in self._store:
            return
        flight = self._flights.get(digest)
        if flight is None:
            flight = self._flights[digest] = _Flight()
            self._nursery.start_soon(self._fly, flight, upstream, repository, digest, grant)
        else:
            self._metrics.blob_fetch_joins.inc()
        await flight.done.wait()
        if flight.error is not None:
            err = flight.error
            raise type(err)(err.message, headers=err.headers)

    async def _fly(
        self,
        flight: _Flight,
        upstream: UpstreamSeam,
        repository: str,
        digest: Digest,
        grant: _Grant,
    ) -> None:
        start = trio.current_time()
        try:
            if grant.size is None:
                grant = await self._size_or_peers(upstream, repository, digest)
            assert grant.size is not None
            source, size = await self._fetcher.fetch(
                upstream, repository, digest, grant.size, peers_only=grant.peers_only
            )
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
