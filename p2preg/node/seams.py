"""The three seams of the pull path, as Protocols: the swarm, the tracker, the upstream.

Owns the shape of what the pull path asks of each outside party, no more: the
libtorrent session (`swarm.Swarm`), the tracker's control API
(`tracker.client.TrackerClient`, whose tag answers and manifest shelf are a
seam of their own)
and a seed registry (`upstream.UpstreamClient`)
satisfy these structurally, and in-memory fakes (tests/fakes.py) do too, so
the pull path runs in-process without sockets. `Offload` says where blocking
store work (hashing, fsync) runs: a worker thread in the node (`in_thread`),
the trio thread in tests that move a fake clock. Beside the Protocols it holds
only the swarm seam's error and the real `Offload`; it must not hold pull-path
behaviour or import the real implementations.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

import trio

from p2preg.core.digest import Digest
from p2preg.core.metainfo import Metainfo
from p2preg.core.wire import LeaseReply, ManifestBody, MetainfoRecord, TagAnswer
from p2preg.node.config import Upstream

if TYPE_CHECKING:
    from p2preg.node.upstream import BlobSink, Fetched

T = TypeVar("T")


class Offload(Protocol):
    """Runs a blocking call away from the event loop (or, in tests, right here)."""

    def __call__(self, fn: Callable[[], T], /) -> Awaitable[T]: ...


async def in_thread(fn: Callable[[], T], /) -> T:
    return await trio.to_thread.run_sync(fn)


class SwarmError(Exception):
    """A download from peers cannot finish; `reason` names why (a metric label)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class SwarmSeam(Protocol):
    """One node's BitTorrent session: it downloads and seeds; it decides nothing."""

    @property
    def listen_port(self) -> int: ...

    def __contains__(self, digest: Digest) -> bool: ...

    def seeding(self) -> list[Digest]: ...

    def peers(self) -> int: ...

    def seed(self, meta: Metainfo, verified: Path) -> None: ...

    async def download(
        self,
        meta: Metainfo,
        *,
        stall_s: float,
        max_hash_failures: int,
        report_as: Digest | None = None,
    ) -> Path:
        """The downloaded file (every piece checked, the whole digest not); raises SwarmError.
        Stalling peers are reported as peers of `report_as` (default: `meta`'s digest)."""
        ...

    def mark_seeding(self, digest: Digest) -> None: ...

    def remove(self, digest: Digest) -> None: ...

    def reannounce(self, digest: Digest) -> None: ...

    async def wait_announced(self, digest: Digest, timeout_s: float) -> bool: ...

    def last_seeder_of_live_swarm(self, digest: Digest) -> bool: ...


class HolderSeam(Protocol):
    """What of the tracker's control API a lease holder uses (holding.py)."""

    async def renew_lease(
        self,
        digest: Digest,
        lease_id: str,
        bytes_done: int,
        size: int | None = None,
        *,
        timeout_s: float | None = None,
    ) -> LeaseReply: ...

    async def release_lease(self, digest: Digest, lease_id: str) -> None: ...


class TrackerSeam(HolderSeam, Protocol):
    """The tracker's control API as the node uses it; failures raise core.errors.TrackerError."""

    @property
    def node(self) -> str: ...

    async def acquire_lease(
        self,
        digest: Digest,
        *,
        size: int | None = None,
        wait_s: float = 0.0,
        group: str | None = None,
        order: int = 0,
    ) -> LeaseReply: ...

    async def publish_metainfo(self, digest: Digest, size: int, metainfo: bytes) -> MetainfoRecord:
        ...

    async def lookup_metainfo(self, digest: Digest) -> MetainfoRecord | None: ...

    async def report_bad(
        self, digest: Digest, bad_info_hash: bytes, size: int, replacement: bytes, reason: str
    ) -> MetainfoRecord: ...

    async def confirm_seed(self, digest: Digest, info_hash: bytes) -> None: ...


class UpstreamSeam(Protocol):
    """One seed registry; failures raise RegistryError subclasses, 404 is None."""

    @property
    def upstream(self) -> Upstream: ...

    async def blob_size(self, repository: str, digest: Digest) -> int | None:
        """The blob's size (-1: not said) if `repository` holds it upstream, else None."""
        ...

    async def fetch_blob(self, repository: str, digest: Digest, sink: BlobSink) -> None: ...

    async def fetch(
        self,
        method: str,
        repository: str,
        path: str,
        *,
        headers: Mapping[str, str] | None = None,
        max_bytes: int,
    ) -> Fetched | None: ...

    async def tags(self, repository: str) -> list[str] | None: ...


class ClusterWordSeam(Protocol):
    """The tracker's tag answers (tracker/tags.py) and manifest shelf
    (tracker/manifest_shelf.py) as the node uses them; failures raise
    core.errors.TrackerError."""

    async def report_tag(
        self, ns: str, repository: str, tag: str, digest: Digest, accept: str = ""
    ) -> None: ...

    async def query_tag(
        self, ns: str, repository: str, tag: str, accept: str = ""
    ) -> TagAnswer: ...

    async def put_manifest(
        self, digest: Digest, ns: str, repository: str, media_type: str, body: bytes
    ) -> None: ...

    async def get_manifest(self, digest: Digest) -> ManifestBody | None: ...
