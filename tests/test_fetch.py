"""Where a blob comes from (p2preg/node/fetch.py), every branch, in-process.

The real pull path — Blobs, BlobFetcher, PeerDownload, Seeding and a BlobStore
on tmp_path — over the fakes of tests/fakes.py: no socket, no thread, so trio's
MockClock jumps over every wait (a 30 s lease expiry takes no real time).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from p2preg.core.digest import Digest
from p2preg.core.wire import LeaseStatus
from p2preg.node.errors import UpstreamUnavailable
from p2preg.node.fetch import SwarmSettings
from p2preg.node.leasewait import LONG_POLL_S
from tests.fakes import FakeTrackerServer, FakeUpstream, PullNode, blob, open_pull_node

REPO = "team/app"
SETTINGS = SwarmSettings(min_bytes=1024, stall_s=30.0, max_hash_failures=4, lease_wait_max_s=60.0)


def stored(node: PullNode, digest: Digest) -> bytes:
    with node.store.reading(digest) as path:
        return path.read_bytes()


async def test_a_blob_in_the_store_is_served_without_asking_anyone(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    digest, data = blob()
    upstream = FakeUpstream({(REPO, digest): data})
    server = FakeTrackerServer()
    async with open_pull_node(tmp_path / "a", server, settings=SETTINGS) as node:
        await node.blobs.ensure(upstream, REPO, digest)
        gets, asks = upstream.gets, len(server.replies)
        await node.blobs.ensure(upstream, REPO, digest)  # tenancy held, bytes stored
    assert (upstream.gets, len(server.replies)) == (gets, asks) == (1, 1)
    assert upstream.heads == 1


async def test_the_first_node_fetches_upstream_as_holder_and_the_next_from_peers(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    digest, data = blob()
    upstream = FakeUpstream({(REPO, digest): data})
    server = FakeTrackerServer()
    async with (
        open_pull_node(tmp_path / "a", server, name="a", settings=SETTINGS) as a,
        open_pull_node(tmp_path / "b", server, name="b", settings=SETTINGS) as b,
    ):
        await a.blobs.ensure(upstream, REPO, digest)
        assert a.fetches("upstream") == 1 and a.tracker is not None
        assert a.tracker.published == [digest]  # published once, by the holder
        assert a.swarm is not None and a.swarm.seeding() == [digest]
        await trio.sleep(1)  # the holder lets its lease go once announced
        assert server.leases.current(str(digest)) is None
        await b.blobs.ensure(upstream, REPO, digest)
        assert b.fetches("peers") == 1 and b.fetches("upstream") == 0
        assert stored(b, digest) == data
        assert b.swarm is not None and b.swarm.seeding() == [digest]  # and seeds it on
        assert b.tracker is not None and b.tracker.published == []
    assert upstream.gets == 1
    assert server.replies == [("a", LeaseStatus.GRANTED), ("b", LeaseStatus.SEEDED)]
    assert (tmp_path / "b" / "torrents" / f"sha256-{digest.hex}.torrent").exists()


async def test_corrupt_bytes_from_peers_fall_back_to_upstream_and_are_never_stored(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    digest, data = blob()
    upstream = FakeUpstream({(REPO, digest): data})
    server = FakeTrackerServer()
    async with (
        open_pull_node(tmp_path / "a", server, name="a", settings=SETTINGS) as a,
        open_pull_node(tmp_path / "b", server, name="b", settings=SETTINGS) as b,
    ):
        await a.blobs.ensure(upstream, REPO, digest)
        server.corrupt_peers = True
        await b.blobs.ensure(upstream, REPO, digest)
        assert b.fallbacks("digest_mismatch") == 1
        assert b.fetches("upstream") == 1 and b.fetches("peers") == 0
        assert stored(b, digest) == data
        # It seeds what it verified, under the same (good) metainfo: nothing to report.
        assert b.tracker is not None and b.tracker.published == [digest]
        assert server.reports == []
    assert upstream.gets == 2


async def test_a_node_told_verify_fetches_upstream_and_its_publish_settles_the_dispute(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    digest, data = blob()
    upstream = FakeUpstream({(REPO, digest): data})
    server = FakeTrackerServer()
    async with (
        open_pull_node(tmp_path / "a", server, name="a", settings=SETTINGS) as a,
        open_pull_node(tmp_path / "b", server, name="b", settings=SETTINGS) as b,
    ):
        # A poisoned torrent with a seeder, disputed: nobody is sent to its swarm.
        server.metainfo[digest] = b"poison"
        server.seeders[digest] = {"evil": tmp_path / "nothing"}
        server.disputed.add(digest)
        await a.blobs.ensure(upstream, REPO, digest)
        assert a.fetches("upstream") == 1 and a.fallbacks("bad_metainfo") == 0
        assert a.tracker is not None and a.tracker.published == [digest]
        assert server.disputed == set() and server.metainfo[digest] != b"poison"
        await trio.sleep(1)
        await b.blobs.ensure(upstream, REPO, digest)
        assert b.fetches("peers") == 1 and stored(b, digest) == data
    assert upstream.gets == 1
    assert server.replies == [("a", LeaseStatus.VERIFY), ("b", LeaseStatus.SEEDED)]


async def test_a_torrent_for_another_size_is_reported_whatever_its_root(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A torrent that does not even parse for the blob's size is no CA rotation: the
    holder that fetched the blob disputes it."""
    digest, data = blob()
    upstream = FakeUpstream({(REPO, digest): data})
    server = FakeTrackerServer()
    server.metainfo[digest], server.sizes[digest] = b"poison", len(data) + 1
    async with open_pull_node(tmp_path / "a", server, name="a", settings=SETTINGS) as a:
        await a.blobs.ensure(upstream, REPO, digest)
        assert stored(a, digest) == data
    assert server.reports == [("a", digest)]


async def test_a_waiter_follows_a_holder_that_makes_progress_past_lease_wait_max_s(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    digest, data = blob(size=2_000_000)
    # 31 chunks, 5 s apart: the holder needs 155 s, far past lease_wait_max_s (60 s).
    upstream = FakeUpstream({(REPO, digest): data}, delay_s=5.0)
    server = FakeTrackerServer()
    async with (
        open_pull_node(tmp_path / "a", server, name="a", settings=SETTINGS) as a,
        open_pull_node(tmp_path / "b", server, name="b", settings=SETTINGS) as b,
    ):
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.blobs.ensure, upstream, REPO, digest)
            await trio.sleep(1)
            await b.blobs.ensure(upstream, REPO, digest)
        assert trio.current_time() - start > 2 * SETTINGS.lease_wait_max_s
        assert a.fetches("upstream") == 1
        assert b.fetches("peers") == 1 and b.fallbacks("lease_wait") == 0
        assert stored(b, digest) == data
    assert upstream.gets == 1
    assert ("b", LeaseStatus.WAIT) in server.replies


async def test_a_holder_that_stops_making_progress_is_given_up_on(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    digest, data = blob()
    upstream = FakeUpstream({(REPO, digest): data})
    server = FakeTrackerServer(ttl_s=30.0)
    stuck = server.client("stuck")
    granted = await stuck.acquire_lease(digest, size=len(data))
    assert granted.lease_id is not None

    async def renew_without_progress() -> None:
        while True:  # alive, and stuck at 0 bytes
            await trio.sleep(10)
            await stuck.renew_lease(digest, granted.lease_id, 0, len(data))

    async with (
        trio.open_nursery() as nursery,
        open_pull_node(tmp_path / "b", server, name="b", settings=SETTINGS) as b,
    ):
        nursery.start_soon(renew_without_progress)
        start = trio.current_time()
        await b.blobs.ensure(upstream, REPO, digest)
        waited = trio.current_time() - start
        nursery.cancel_scope.cancel()
    assert b.fallbacks("lease_wait") == 1
    assert b.fetches("upstream") == 1
    # lease_wait_max_s from the first WAIT, which the tracker held one long poll.
    assert SETTINGS.lease_wait_max_s <= waited <= SETTINGS.lease_wait_max_s + LONG_POLL_S
    # What it verified it seeds, so the cluster has a seeder despite the stuck holder.
    assert b.swarm is not None and b.swarm.seeding() == [digest]


async def test_when_the_holder_dies_its_lease_expires_and_a_waiter_takes_it(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    digest, data = blob()
    upstream = FakeUpstream({(REPO, digest): data})
    server = FakeTrackerServer(ttl_s=30.0)
    dead = await server.client("dead").acquire_lease(digest, size=len(data))
    assert dead.status is LeaseStatus.GRANTED  # and it never renews
    async with open_pull_node(tmp_path / "b", server, name="b", settings=SETTINGS) as b:
        start = trio.current_time()
        await b.blobs.ensure(upstream, REPO, digest)
        waited = trio.current_time() - start
        assert b.fetches("upstream") == 1
        assert b.fallbacks("lease_wait") == 0  # it fetched as the new holder, not in despair
        assert b.tracker is not None and b.tracker.published == [digest]
    assert 30.0 <= waited < SETTINGS.lease_wait_max_s
    assert server.replies[-1] == ("b", LeaseStatus.GRANTED)


async def test_a_tracker_that_is_down_costs_an_upstream_fetch_and_metainfo_is_filed_later(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    digest, data = blob()
    upstream = FakeUpstream({(REPO, digest): data})
    server = FakeTrackerServer()
    server.down = True
    async with open_pull_node(tmp_path / "a", server, name="a", settings=SETTINGS) as a:
        await a.blobs.ensure(upstream, REPO, digest)
        assert a.fallbacks("tracker") == 1 and a.fetches("upstream") == 1
        assert stored(a, digest) == data
        assert a.swarm is not None and a.swarm.seeding() == [digest]  # seeds anyway
        assert digest not in server.metainfo
        server.down = False
        await trio.sleep(10)  # the background filing retries with backoff
        assert digest in server.metainfo


async def test_an_upstream_that_is_down_fails_the_pull_and_frees_the_lease(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    digest, data = blob()
    upstream = FakeUpstream({(REPO, digest): data})
    server = FakeTrackerServer()
    async with open_pull_node(tmp_path / "a", server, name="a", settings=SETTINGS) as a:
        a.tenancy.grant(upstream.upstream.ns, REPO, [digest])  # a manifest proved it earlier
        await a.blobs.size(upstream, REPO, digest)  # HEAD works ...
        upstream.down = True  # ... then the registry goes away
        with pytest.raises(UpstreamUnavailable):
            await a.blobs.ensure(upstream, REPO, digest)
        assert digest not in a.store
        assert a.blobs.recent[-1].source == "failed"
    assert server.leases.current(str(digest)) is None  # the next asker need not wait it out


async def test_an_upstream_that_is_down_does_not_stop_what_the_store_holds(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    digest, data = blob()
    upstream = FakeUpstream({(REPO, digest): data})
    server = FakeTrackerServer()
    async with open_pull_node(tmp_path / "a", server, name="a", settings=SETTINGS) as a:
        await a.blobs.ensure(upstream, REPO, digest)
        upstream.down = server.down = True
        assert await a.blobs.size(upstream, REPO, digest) == len(data)
        await a.blobs.ensure(upstream, REPO, digest)
        assert stored(a, digest) == data
    assert upstream.heads == 1


async def test_without_a_tracker_or_below_p2p_min_bytes_it_is_upstream_straight_away(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    small, small_data = blob(size=512)
    big, big_data = blob(seed=2)
    upstream = FakeUpstream({(REPO, small): small_data, (REPO, big): big_data})
    server = FakeTrackerServer()
    async with (
        open_pull_node(tmp_path / "a", server, name="a", settings=SETTINGS) as a,
        open_pull_node(tmp_path / "plain", None, name="plain") as plain,
    ):
        await a.blobs.ensure(upstream, REPO, small)
        await plain.blobs.ensure(upstream, REPO, big)
        assert a.fetches("upstream") == 1 and plain.fetches("upstream") == 1
        assert a.tracker is not None and a.tracker.published == []
    assert server.replies == []  # nobody asked the tracker


async def test_upstream_bytes_that_do_not_match_are_tried_twice_then_refused(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    digest, data = blob()
    upstream = FakeUpstream({(REPO, digest): data})
    upstream.corrupt = True
    async with open_pull_node(tmp_path / "plain", None) as node:
        with pytest.raises(Exception, match="do not match"):
            await node.blobs.ensure(upstream, REPO, digest)
        assert digest not in node.store
        assert node.metrics.registry.get_sample_value("p2preg_digest_mismatches_total") == 2
    assert upstream.gets == 2
