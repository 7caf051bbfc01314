"""The node's libtorrent session (p2preg/node/swarm.py) under the real pull path, in-process.

Two real `Swarm`s on loopback and a tracker served in this process, the node's
real tracker client, and the fake seed registry of tests/fakes.py: the first
node fetches from upstream as the lease holder and seeds; the second gets the
blob from it through libtorrent, verifies it, and seeds it on. Real time and
worker threads here (libtorrent runs its own), so no MockClock.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from p2preg.core.config import HostPort
from p2preg.node.fetch import SwarmSettings
from p2preg.node.metrics import NodeMetrics
from p2preg.node.relay import open_relay
from p2preg.node.seams import in_thread
from p2preg.node.swarm import Swarm, open_swarm
from tests.fakes import FakeUpstream, PullPath, blob, open_pull_path
from tracker.client import TrackerClient, open_tracker_client
from tracker.config import TrackerConfig
from tracker.serve import serve_tracker

pytestmark = pytest.mark.slow

TOKEN = "swarm-secret"
REPO = "team/app"
SETTINGS = SwarmSettings(min_bytes=1024, stall_s=20.0, max_hash_failures=4, lease_wait_max_s=60.0)


@asynccontextmanager
async def running_tracker(tmp_path: Path) -> AsyncIterator[str]:
    config = TrackerConfig(
        listen=HostPort("127.0.0.1", 0), data_dir=tmp_path / "tracker", token=TOKEN,
        announce_interval_s=2, min_announce_interval_s=1, peer_ttl_s=10,
    )
    async with trio.open_nursery() as nursery:
        yield await nursery.start(serve_tracker, config)
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def real_node(
    tmp_path: Path, tracker_url: str, name: str
) -> AsyncIterator[tuple[PullPath, Swarm, TrackerClient]]:
    data_dir = tmp_path / name
    metrics = NodeMetrics()
    async with (
        open_tracker_client(tracker_url, node=name, token=TOKEN) as tracker,
        open_relay(tracker, metrics) as relay,
        open_swarm(data_dir, "127.0.0.1:0", relay.url, metrics) as swarm,
        open_pull_path(data_dir, (swarm, tracker), settings=SETTINGS, offload=in_thread) as path,
    ):
        relay.attach(swarm)
        yield path, swarm, tracker


def fetches(path: PullPath, source: str) -> int:
    sample = path.metrics.registry.get_sample_value
    return int(sample("p2preg_blob_fetches_total", {"source": source}) or 0)


async def test_a_blob_crosses_upstream_once_and_reaches_the_next_node_through_libtorrent(
    tmp_path: Path,
) -> None:
    digest, data = blob(size=3 << 20)
    upstream = FakeUpstream({(REPO, digest): data})
    with trio.fail_after(90):
        async with (
            running_tracker(tmp_path) as url,
            real_node(tmp_path, url, "a") as (a, a_swarm, _),
            real_node(tmp_path, url, "b") as (b, b_swarm, b_tracker),
        ):
            await a.blobs.ensure(upstream, REPO, digest)
            assert fetches(a, "upstream") == 1
            assert a_swarm.seeding() == [digest]
            await b.blobs.ensure(upstream, REPO, digest)
            assert fetches(b, "peers") == 1 and fetches(b, "upstream") == 0
            with b.store.reading(digest) as path:
                assert path.read_bytes() == data
            assert b_swarm.seeding() == [digest]
            assert b_swarm.peer_bytes(digest) >= len(data)
            record = await b_tracker.lookup_metainfo(digest)
            assert record is not None and record.size == len(data)
            # The store dropping the blob stops its seeding: the hook given at construction.
            b.store.remove(digest)
            assert b_swarm.seeding() == [] and digest not in b_swarm
            assert not (tmp_path / "b" / "torrents" / f"sha256-{digest.hex}.torrent").exists()
    assert upstream.gets == 1
