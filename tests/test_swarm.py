"""The node's libtorrent session (p2preg/node/swarm.py) under the real pull path, in-process.

Two real `Swarm`s on loopback and a tracker served in this process, the node's
real tracker client, and the fake seed registry of tests/fakes.py: the first
node fetches from upstream as the lease holder and seeds; the second gets the
blob from it through libtorrent, verifies it, and seeds it on. Real time and
worker threads here (libtorrent runs its own), so no MockClock.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from p2preg.core.config import HostPort
from p2preg.node import peersockets
from p2preg.node.fetch import SwarmSettings
from p2preg.node.limits import cover_every_peer
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


def nagle_by_port(ports: set[int]) -> dict[tuple[int, int], bool]:
    """(local port, remote port or 0) -> Nagle still on, for this process's TCP sockets
    with an end on one of `ports`."""
    found = {}
    for sock in peersockets.tcp_sockets():  # the node's own walk of its sockets
        with sock:
            local = sock.getsockname()[1]
            try:
                remote = sock.getpeername()[1]
            except OSError:
                remote = 0  # a listener
            if ports & {local, remote}:
                nodelay = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                found[(local, remote)] = not nodelay
    return found


def connected_without_nagle(ports: set[int]) -> bool:
    """Both listeners and a connection between them are here, none with Nagle on."""
    nagle = nagle_by_port(ports)
    dialled = any(remote in ports and local not in ports for local, remote in nagle)
    listening = {(port, 0) for port in ports} <= nagle.keys()
    return dialled and listening and not any(nagle.values())


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
            # b downloads at 1 MiB/s (3 s), so that its connection to a is seen.
            cover_every_peer(b_swarm.session)
            b_swarm.session.apply_settings({"download_rate_limit": 1 << 20})
            downloaded = trio.Event()

            async def download() -> None:
                await b.blobs.ensure(upstream, REPO, digest)
                downloaded.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(download)
                # b dialled a, a accepted: neither end nor either listener keeps Nagle
                # on (peersockets.py) while the download runs; the connection goes after.
                ports = {a_swarm.listen_port, b_swarm.listen_port}
                while not connected_without_nagle(ports):
                    if downloaded.is_set():
                        raise AssertionError(f"a connection kept Nagle on: {nagle_by_port(ports)}")
                    await trio.sleep(0.05)
            b_swarm.session.apply_settings({"download_rate_limit": 0})
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
