"""What the tracker's tests share: an in-process tracker, blobs and their metainfo, a clock.

`running_tracker` starts `serve_tracker` in the test's own trio run on a free
loopback port (real sockets, real SQLite) and stops it when the block ends;
`make_tracker` builds the coordinator alone over a MemoryStore, for pure-trio
tests. `blob_meta` writes random bytes under the test's directory and makes
their metainfo the way a node does. `SteppedClock` is a tracker clock the test
moves by hand, for in-process tests that also use sockets or threads, where
trio's autojumping MockClock would fire timeouts while a thread works.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import trio

from p2preg.core import wire
from p2preg.core.config import HostPort
from p2preg.core.digest import Digest
from p2preg.core.metainfo import Metainfo
from tracker.client import TrackerClient
from tracker.config import TrackerConfig
from tracker.coordinator import Tracker
from tracker.metainfo import make_metainfo
from tracker.serve import serve_tracker
from tracker.state import MemoryStore, TrackerStore


class SteppedClock:
    """A clock that moves only when the test steps it.

    It starts a day ahead of trio's clock: deadlines the tracker computes from
    it and hands to trio (a long poll's) then lie in trio's future, so a long
    poll ends when it is woken, never because real time passed.
    """

    def __init__(self) -> None:
        self.now = trio.current_time() + 86_400.0

    def __call__(self) -> float:
        return self.now

    def step(self, seconds: float) -> None:
        self.now += seconds


@asynccontextmanager
async def running_tracker(
    tmp_path: Path, *, clock: SteppedClock | None = None, **overrides: Any
) -> AsyncIterator[str]:
    """A tracker serving on 127.0.0.1:<free port>; yields its base URL."""
    settings: dict[str, Any] = dict(listen=HostPort("127.0.0.1", 0), data_dir=tmp_path / "tracker")
    settings.update(overrides)
    config = TrackerConfig(**settings)
    async with trio.open_nursery() as nursery:
        yield await nursery.start(partial(serve_tracker, config, clock=clock or trio.current_time))
        nursery.cancel_scope.cancel()


def make_tracker(tmp_path: Path, store: TrackerStore | None = None, **overrides: Any) -> Tracker:
    """The coordinator alone, on trio's clock, over a MemoryStore (or `store`)."""
    config = TrackerConfig(listen=HostPort("127.0.0.1", 0), data_dir=tmp_path, **overrides)
    return Tracker(config, store or MemoryStore())


def blob_path(tmp_path: Path, digest: Digest) -> Path:
    return tmp_path / f"blob-{digest.hex}"


def blob_meta(
    tmp_path: Path, size: int = 100_000, *, hybrid: bool = False, root: bytes | None = None
) -> Metainfo:
    """Random bytes of `size` written under `tmp_path`, and their metainfo.

    `root` (a cluster CA's PEM) makes it the SSL torrent a TLS cluster's tracker takes.
    """
    data = os.urandom(size)
    digest = Digest.of(data)
    blob_path(tmp_path, digest).write_bytes(data)
    return make_metainfo(blob_path(tmp_path, digest), digest, size, hybrid=hybrid, root=root)


def remake(tmp_path: Path, meta: Metainfo, *, hybrid: bool) -> Metainfo:
    """The same blob's metainfo made with other rules: a different torrent."""
    return make_metainfo(blob_path(tmp_path, meta.digest), meta.digest, meta.size, hybrid=hybrid)


async def publish_as_holder(
    t: Tracker, meta: Metainfo, node: str = "n1"
) -> tuple[wire.MetainfoRecord, bool]:
    """Publish `meta` as a node does: holding the digest's upstream lease (only the
    holder defines a first torrent) when it can get it, and giving it back after."""
    digest = str(meta.digest)
    lease = await t.acquire_lease(digest, wire.LeaseRequest(node, meta.size))
    try:
        return await t.publish(digest, wire.PublishMetainfo(node, meta.size, meta.data))
    finally:
        if lease.status is wire.LeaseStatus.GRANTED and lease.lease_id is not None:
            await t.release_lease(digest, wire.LeaseRelease(lease.lease_id))


async def file_as_holder(client: TrackerClient, meta: Metainfo) -> wire.MetainfoRecord:
    """File `meta` through `client` as a node does: holding the digest's lease first."""
    lease = await client.acquire_lease(meta.digest, size=meta.size)
    assert lease.status is wire.LeaseStatus.GRANTED, lease
    return await client.publish_metainfo(meta.digest, meta.size, meta.data)


class FakeClock:
    """A clock a test moves by hand (`clock.now += seconds`), for the tracker's
    sans-IO books."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
