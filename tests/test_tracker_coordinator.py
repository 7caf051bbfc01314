"""The tracker's service without sockets (tracker/coordinator.py): swarms, registry, restore."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
import trio.testing

from harness.tlscerts import ClusterCA
from p2preg.core import errors, wire
from p2preg.core.config import HostPort
from p2preg.core.metainfo import Metainfo, canonical_roots
from tests.tracker_helpers import (
    blob_meta,
    blob_path,
    make_tracker,
    publish_as_holder,
    remake,
)
from tracker.announce import AnnounceRequest, Event, ScrapeRequest, SwarmStats
from tracker.config import TrackerConfig
from tracker.coordinator import Tracker
from tracker.metainfo import make_metainfo
from tracker.peers import compact_address
from tracker.state import MemoryStore, StoredMetainfo


def ann(
    ih: bytes,
    n: int,
    *,
    left: int = 1,
    event: Event = Event.NONE,
    token: bytes | None = None,
    ip: str | None = None,
    numwant: int | None = None,
    node: str | None = None,
) -> AnnounceRequest:
    """Peer `n`'s announce; it asserts the node name `node` or, by default, `n<n>`."""
    return AnnounceRequest(
        ih, bytes([n]) * 20, 7000 + n, 0, 0, left, event, numwant, token, ip, node or f"n{n}"
    )


async def publish(t: Tracker, meta: Metainfo, node: str = "n1") -> tuple[wire.MetainfoRecord, bool]:
    """Publish as a node does: holding the digest's lease if it can get it, and letting
    it go after."""
    return await publish_as_holder(t, meta, node)


async def test_hybrid_info_hashes_share_one_swarm(tmp_path: Path) -> None:
    t = make_tracker(tmp_path)
    meta = blob_meta(tmp_path, hybrid=True)
    await publish(t, meta)
    v1, v2 = meta.swarm_keys
    t.announce(ann(v1, 1, left=0), "10.0.0.1", "http")
    reply = t.announce(ann(v2, 2), "10.0.0.2", "udp")
    assert reply.peers == [compact_address("10.0.0.1", 7001)]
    assert (reply.complete, reply.incomplete) == (1, 1)
    stats = t.scrape(ScrapeRequest((v1, v2, b"\x00" * 20), None), "http")
    assert [s for _, s in stats] == [SwarmStats(1, 1, 0), SwarmStats(1, 1, 0), None]


async def test_announce_rules(tmp_path: Path) -> None:
    t = make_tracker(
        tmp_path, token="tok", max_numwant=3, default_numwant=3, trusted_ip_sources=("10.9.0.0/16",)
    )
    meta = blob_meta(tmp_path)
    await publish(t, meta)
    (ih,) = meta.swarm_keys
    with pytest.raises(errors.Unauthorized):
        t.announce(ann(ih, 1), "10.0.0.1", "http")
    with pytest.raises(errors.Unauthorized):
        t.announce(ann(ih, 1, token=b"wrong"), "10.0.0.1", "http")
    with pytest.raises(errors.UnknownTorrent):
        t.announce(ann(b"\x00" * 20, 1, token=b"tok"), "10.0.0.1", "http")
    for n in range(1, 8):
        t.announce(ann(ih, n, token=b"tok"), f"10.0.0.{n}", "http")
    reply = t.announce(ann(ih, 1, token=b"tok", numwant=50), "10.0.0.1", "http")
    assert len(reply.peers) == 3  # capped at max_numwant
    assert compact_address("10.0.0.1", 7001) not in reply.peers
    # `ip=` from an untrusted source is ignored; from a trusted one it counts.
    for node in ("n20", "n21"):  # downloaded and verified it: they count as seeders
        await t.confirm_seed(str(meta.digest), wire.ConfirmSeed(node, ih))
    t.announce(ann(ih, 20, token=b"tok", ip="192.0.2.1", left=0), "10.0.0.20", "http")
    t.announce(ann(ih, 21, token=b"tok", ip="192.0.2.2", left=0), "10.9.1.1", "http")
    swarm = t.peers.swarm(str(meta.digest))
    assert swarm is not None
    assert {p.compact for p in swarm.seeders} == {
        compact_address("10.0.0.20", 7020),
        compact_address("192.0.2.2", 7021),
    }
    # A seeder is handed downloaders (capped at max_numwant), never seeders.
    seeder_reply = t.announce(ann(ih, 20, token=b"tok", left=0), "10.0.0.20", "http")
    leechers = {p.compact for p in swarm.leechers}
    assert len(seeder_reply.peers) == 3 and set(seeder_reply.peers) <= leechers
    t.announce(ann(ih, 20, token=b"tok", event=Event.STOPPED), "10.0.0.20", "http")
    assert len(swarm.seeders) == 1


async def test_completed_counts_downloads_and_peers_expire(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    t = make_tracker(tmp_path, announce_interval_s=10, min_announce_interval_s=5, peer_ttl_s=30)
    meta = blob_meta(tmp_path)
    await publish(t, meta)
    (ih,) = meta.swarm_keys
    t.announce(ann(ih, 1, left=0, event=Event.COMPLETED), "10.0.0.1", "http")
    await trio.sleep(20)
    t.announce(ann(ih, 2), "10.0.0.2", "http")
    assert t.peers.totals().peers == 2
    await trio.sleep(15)
    await t.sweep()
    # Peer 1 fell silent 35 s ago (ttl 30); peer 2 spoke 15 s ago.
    assert t.peers.totals().peers == 1 and t.peers.seeders(str(meta.digest)) == 0
    assert t.peers.swarm(str(meta.digest)).downloaded == 1  # type: ignore[union-attr]


async def test_publish_is_idempotent_and_conflicts_are_refused(tmp_path: Path) -> None:
    t = make_tracker(tmp_path)
    meta = blob_meta(tmp_path)
    digest = str(meta.digest)
    record, created = await publish(t, meta)
    assert created and record.info_hashes == list(meta.swarm_keys)
    assert await publish(t, meta, "n2") == (record, False)
    hybrid = remake(tmp_path, meta, hybrid=True)
    with pytest.raises(errors.MetainfoConflict, match="already has metainfo"):
        await publish(t, hybrid)
    assert t.lookup(digest).metainfo == meta.data
    # A stale report (naming a torrent no longer stored) changes nothing.
    with pytest.raises(errors.MetainfoConflict, match="no longer"):
        late = wire.ReportBad("n4", b"\x01" * 20, "late", meta.size, hybrid.data)
        await t.report_bad(digest, late)
    with pytest.raises(errors.InvalidMetainfo, match="replacement is the metainfo"):
        same = wire.ReportBad("n4", meta.swarm_keys[0], "x", meta.size, meta.data)
        await t.report_bad(digest, same)


async def test_only_the_lease_holder_defines_a_first_torrent(tmp_path: Path) -> None:
    t = make_tracker(tmp_path)
    meta = blob_meta(tmp_path)
    digest = str(meta.digest)
    msg = wire.PublishMetainfo("n2", meta.size, meta.data)
    with pytest.raises(errors.Forbidden, match="only the holder of the upstream lease"):
        await t.publish(digest, msg)
    lease = await t.acquire_lease(digest, wire.LeaseRequest("n1", meta.size))
    assert lease.status is wire.LeaseStatus.GRANTED
    with pytest.raises(errors.Forbidden, match="'n2' does not hold it"):
        await t.publish(digest, msg)
    forbidden = t.metrics.registry.get_sample_value(
        "p2preg_tracker_metainfo_rejected_total", {"code": "forbidden"}
    )
    assert forbidden == 2
    record, created = await t.publish(digest, wire.PublishMetainfo("n1", meta.size, meta.data))
    assert created and t.registry.get(digest).published_by == "n1"  # type: ignore[union-attr]
    # Once it is filed, anyone may file the same torrent again (it defines nothing).
    assert await t.publish(digest, msg) == (record, False)


def _garbage(tmp_path: Path, like: Metainfo) -> Metainfo:
    path = tmp_path / f"garbage-{like.digest.hex}"
    path.write_bytes(os.urandom(like.size))
    return make_metainfo(path, like.digest, like.size)


def _disputes(t: Tracker, outcome: str) -> float | None:
    return t.metrics.registry.get_sample_value(
        "p2preg_tracker_disputes_total", {"outcome": outcome}
    )


async def test_a_report_is_evidence_settled_by_a_third_nodes_verification(
    tmp_path: Path,
) -> None:
    """The issue's sequence: honest publish → a report with a torrent made from
    garbage → the honest torrent stays and the reporter loses its rights."""
    store = MemoryStore()
    t = make_tracker(tmp_path, store)
    meta = blob_meta(tmp_path)
    digest = str(meta.digest)
    garbage = _garbage(tmp_path, meta)
    await publish(t, meta, "honest")
    t.announce(ann(meta.swarm_keys[0], 1, left=0, node="honest"), "10.0.0.1", "http")
    got = await t.report_bad(
        digest, wire.ReportBad("evil", meta.swarm_keys[0], "mismatch", meta.size, garbage.data)
    )
    assert got.metainfo == garbage.data and t.lookup(digest).metainfo == meta.data
    assert _disputes(t, "opened") == 1 and digest in store.disputes
    # While disputed nobody is told SEEDED; neither side may verify.
    for party in ("honest", "evil"):
        reply = await t.acquire_lease(digest, wire.LeaseRequest(party, meta.size))
        assert reply.status is wire.LeaseStatus.WAIT and reply.lease_id is None
    verify = await t.acquire_lease(digest, wire.LeaseRequest("third", meta.size))
    assert verify.status is wire.LeaseStatus.VERIFY and verify.lease_id
    waiting = await t.acquire_lease(digest, wire.LeaseRequest("fourth", meta.size))
    assert waiting.status is wire.LeaseStatus.WAIT and waiting.holder == "third"
    # A publish by anyone else settles nothing.
    assert (await publish(t, meta, "fourth"))[1] is False and t.registry.dispute(digest)
    record, changed = await t.publish(digest, wire.PublishMetainfo("third", meta.size, meta.data))
    assert record.metainfo == meta.data and not changed
    assert t.registry.dispute(digest) is None and store.disputes == {}
    assert _disputes(t, "upheld") == 1 and set(store.quarantines) == {"evil"}
    # The loser may not define torrents for a while: no lease, no publish, no report.
    other = blob_meta(tmp_path)
    with pytest.raises(errors.Forbidden, match="may not take an upstream lease"):
        await t.acquire_lease(str(other.digest), wire.LeaseRequest("evil", other.size))
    with pytest.raises(errors.Forbidden, match="may not report metainfo"):
        await t.report_bad(
            digest, wire.ReportBad("evil", meta.swarm_keys[0], "again", meta.size, garbage.data)
        )
    # The stored torrent's swarm serves again.
    seeded = await t.acquire_lease(digest, wire.LeaseRequest("fourth", meta.size))
    assert seeded.status is wire.LeaseStatus.SEEDED
    # A restart keeps the quarantine.
    again = make_tracker(tmp_path, store)
    again.restore(await store.load())
    with pytest.raises(errors.Forbidden, match="may not take an upstream lease"):
        await again.acquire_lease(str(other.digest), wire.LeaseRequest("evil", other.size))


async def test_poison_published_first_loses_and_a_restart_keeps_the_dispute(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    store = MemoryStore()
    t = make_tracker(tmp_path, store, dispute_quarantine_s=100)
    meta = blob_meta(tmp_path)
    digest = str(meta.digest)
    garbage = _garbage(tmp_path, meta)
    # The attacker holds the lease, so it defines the first torrent, and keeps the lease.
    lease = await t.acquire_lease(digest, wire.LeaseRequest("evil", meta.size))
    assert lease.status is wire.LeaseStatus.GRANTED
    await t.publish(digest, wire.PublishMetainfo("evil", meta.size, garbage.data))
    # An honest node that fetched the blob reports it: the attacker's lease is dropped.
    await t.report_bad(
        digest, wire.ReportBad("honest", garbage.swarm_keys[0], "x", meta.size, meta.data)
    )
    assert t.leases.current(digest) is None and digest not in store.leases
    again = make_tracker(tmp_path, store, dispute_quarantine_s=100)
    again.restore(await store.load())
    assert again.registry.dispute(digest) is not None
    verify = await again.acquire_lease(digest, wire.LeaseRequest("third", meta.size))
    assert verify.status is wire.LeaseStatus.VERIFY
    _, changed = await again.publish(digest, wire.PublishMetainfo("third", meta.size, meta.data))
    assert changed and again.lookup(digest).metainfo == meta.data
    assert again.registry.get(digest).published_by == "honest"  # type: ignore[union-attr]
    assert store.metainfo[digest].data == meta.data and _disputes(again, "overturned") == 1
    with pytest.raises(errors.UnknownTorrent):
        again.announce(ann(garbage.swarm_keys[0], 1, left=0), "10.0.0.1", "http")
    with pytest.raises(errors.Forbidden):
        await again.acquire_lease(str(blob_meta(tmp_path).digest), wire.LeaseRequest("evil"))
    # Quarantines expire: no permanent blacklist from one report.
    await trio.sleep(101)
    reply = await again.acquire_lease(str(blob_meta(tmp_path).digest), wire.LeaseRequest("evil"))
    assert reply.status is wire.LeaseStatus.GRANTED


async def test_invalid_and_oversized_metainfo_and_limits(tmp_path: Path) -> None:
    t = make_tracker(tmp_path, max_metainfo=1, max_metainfo_bytes=4096)
    meta = blob_meta(tmp_path)
    with pytest.raises(errors.InvalidRequest, match="digest"):
        await t.publish("sha256:nothex", wire.PublishMetainfo("n", 1, meta.data))
    with pytest.raises(errors.InvalidMetainfo, match="length"):
        await t.publish(str(meta.digest), wire.PublishMetainfo("n", meta.size + 1, meta.data))
    big = blob_meta(tmp_path, size=8_000_000)  # 123 pieces: ~4.2 kB of metainfo
    with pytest.raises(errors.MetainfoTooLarge):
        await publish(t, big)
    await publish(t, meta)
    with pytest.raises(errors.LimitReached):
        await publish(t, blob_meta(tmp_path))


async def test_a_seeder_appearing_wakes_lease_waiters_with_seeded(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    t = make_tracker(tmp_path, lease_ttl_s=30)
    meta = blob_meta(tmp_path)
    digest = str(meta.digest)
    holder = await t.acquire_lease(digest, wire.LeaseRequest("a"))
    assert holder.status is wire.LeaseStatus.GRANTED
    got: list[tuple[float, wire.LeaseReply]] = []

    async def waiter() -> None:
        reply = await t.acquire_lease(digest, wire.LeaseRequest("b", wait_s=25))
        got.append((trio.current_time(), reply))

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.sleep(3)
        # The holder files it (metainfo alone is not a seeder) and keeps its lease.
        await t.publish(digest, wire.PublishMetainfo("a", meta.size, meta.data))
        await trio.sleep(3)
        t.announce(ann(meta.swarm_keys[0], 1, left=0, node="a"), "10.0.0.1", "http")
    when, reply = got[0]
    assert when == pytest.approx(start + 6)
    assert reply.status is wire.LeaseStatus.SEEDED and reply.metainfo == meta.data


async def test_restore_brings_back_metainfo_and_leases(tmp_path: Path) -> None:
    store = MemoryStore()
    t = make_tracker(tmp_path, store)
    meta = blob_meta(tmp_path)
    await publish(t, meta)
    lease = await t.acquire_lease(str(meta.digest), wire.LeaseRequest("a"))
    again = make_tracker(tmp_path, store)
    again.restore(await store.load())
    assert again.lookup(str(meta.digest)).metainfo == meta.data
    again.announce(ann(meta.swarm_keys[0], 1), "10.0.0.1", "http")
    reply = await again.acquire_lease(str(meta.digest), wire.LeaseRequest("b"))
    assert reply.status is wire.LeaseStatus.WAIT and reply.holder == "a"
    renewed = await again.renew_lease(str(meta.digest), wire.LeaseRenew(lease.lease_id or "", 5))
    assert renewed.bytes_done == 5


class SlowStore(MemoryStore):
    """A MemoryStore whose metainfo commits wait until the test lets them through."""

    def __init__(self) -> None:
        super().__init__()
        self.committing = trio.Event()
        self.go = trio.Event()

    async def put_metainfo(self, record: StoredMetainfo) -> None:
        self.committing.set()
        await self.go.wait()
        await super().put_metainfo(record)


async def test_a_slow_metainfo_commit_holds_up_nothing_else(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    store = SlowStore()
    t = make_tracker(tmp_path, store)
    meta, other = blob_meta(tmp_path), blob_meta(tmp_path)
    results: list[tuple[wire.MetainfoRecord, bool]] = []

    async def publish_as(node: str) -> None:
        results.append(await publish(t, meta, node))

    # Whatever waits on a lock held across the commit would run into this.
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(publish_as, "n1")
            await store.committing.wait()
            # Meanwhile: leases of other blobs, lookups and announces go on...
            lease = await t.acquire_lease(str(other.digest), wire.LeaseRequest("a", 10))
            assert lease.status is wire.LeaseStatus.GRANTED
            renewed = await t.renew_lease(
                str(other.digest), wire.LeaseRenew(lease.lease_id or "", 5)
            )
            assert renewed.bytes_done == 5 and str(other.digest) in store.leases
            # ... the metainfo being committed is not served before it is durable ...
            with pytest.raises(errors.NotFound):
                t.lookup(str(meta.digest))
            with pytest.raises(errors.UnknownTorrent):
                t.announce(ann(meta.swarm_keys[0], 1), "10.0.0.1", "http")
            # ... and a second write of the same digest waits for the first's outcome.
            nursery.start_soon(publish_as, "n2")
            await trio.testing.wait_all_tasks_blocked()
            assert results == []
            store.go.set()
    # Either may return first (n1 still gives its lease back): one filed it, the
    # other found it filed.
    assert {r.digest for r, _ in results} == {str(meta.digest)}
    assert sorted(created for _, created in results) == [False, True]
    assert store.metainfo[str(meta.digest)].published_by == "n1"


async def test_a_ca_rotation_replaces_metainfo_persists_it_and_restore_drops_a_gone_root(
    tmp_path: Path,
) -> None:
    """With ca.crt holding both CAs, the tracker re-issued under the new one takes the
    new-root torrent of the same bytes in place of the old-root one, and no other; a
    restart whose ca.crt no longer holds a record's root does not bring that record back."""
    old_ca, new_ca = ClusterCA.make("rot"), ClusterCA.make("rot")
    tls_dir = old_ca.tls_dir(
        tmp_path / "tls", "tracker", "t", trust=old_ca.cert_pem + new_ca.cert_pem
    )
    current = [canonical_roots([old_ca.cert_pem])[0]]
    store = MemoryStore()
    config = TrackerConfig(listen=HostPort("127.0.0.1", 0), data_dir=tmp_path, tls_dir=tls_dir)
    t = Tracker(config, store, current_root=lambda: current[0])
    plain = blob_meta(tmp_path)
    old, new = (
        make_metainfo(blob_path(tmp_path, plain.digest), plain.digest, plain.size, root=ca.cert_pem)
        for ca in (old_ca, new_ca)
    )
    digest = str(plain.digest)
    assert (await publish(t, old))[1]
    t.announce(ann(old.swarm_keys[0], 1, left=0), "10.0.0.1", "http")
    # Still on the old CA: a node already re-issued meets a conflict.
    with pytest.raises(errors.MetainfoConflict):
        await publish(t, new, "n2")
    current[0] = canonical_roots([new_ca.cert_pem])[0]
    # A rotation moves the same bytes to the new root, never other bytes: a
    # new-root torrent of garbage is a conflict, not a reroot.
    garbage = tmp_path / "garbage"
    garbage.write_bytes(os.urandom(plain.size))
    poison = make_metainfo(garbage, plain.digest, plain.size, root=new_ca.cert_pem)
    with pytest.raises(errors.MetainfoConflict):
        await publish(t, poison, "evil")
    assert t.lookup(digest).metainfo == old.data
    record, stored = await publish(t, new, "n2")
    assert stored and record.metainfo == new.data and t.lookup(digest).metainfo == new.data
    # The old swarm is gone: its members announce a torrent the tracker no longer knows.
    assert t.peers.swarm(digest) is None
    with pytest.raises(errors.UnknownTorrent):
        t.announce(ann(old.swarm_keys[0], 1, left=0), "10.0.0.1", "http")
    assert t.metrics.registry.get_sample_value("p2preg_tracker_metainfo_rerooted_total") == 1
    assert store.metainfo[digest].data == new.data and store.disputes == {}
    # A node still on the old CA cannot take the digest back.
    with pytest.raises(errors.MetainfoConflict):
        await publish(t, old, "n1")
    # A restart after the old CA left ca.crt: a record still rooted there is dropped.
    stale_plain = blob_meta(tmp_path)
    stale = make_metainfo(
        blob_path(tmp_path, stale_plain.digest), stale_plain.digest, stale_plain.size,
        root=old_ca.cert_pem,
    )
    await publish(t, stale)
    new_ca.tls_dir(tmp_path / "tls", "tracker", "t")  # ca.crt: the new CA alone
    again = Tracker(config, store, current_root=lambda: current[0])
    again.restore(await store.load())
    assert again.lookup(digest).metainfo == new.data
    with pytest.raises(errors.NotFound):
        again.lookup(str(stale.digest))
