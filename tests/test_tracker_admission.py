"""Swarm admission (tracker/admission.py) over a clock, and its rules in the coordinator.

Who an announce is; a `left=0` claim counted only for the publisher or an
identity that confirmed the current torrent; stall reports that delist a peer
only when two identities make them within the window, expire, and end in a
cooling-off that ends too. The coordinator part drives the same rules through
`Tracker.announce`, `confirm_seed` and `report_stall` without sockets.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from p2preg.core import errors, wire
from tests.tracker_helpers import blob_meta, make_tracker, publish_as_holder
from tracker.admission import Admission, StallVerdict, announce_identity
from tracker.announce import AnnounceRequest, Event
from tracker.peers import compact_address
from tracker.state import StoredConfirmation, open_sqlite_store
from tracker.status import tracker_status


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def book(clock: Clock, *, max_entries: int = 100) -> Admission:
    return Admission(
        stall_window_s=60, stall_cooloff_s=300, stall_reporters=2, max_entries=max_entries,
        clock=clock,
    )


def test_who_an_announce_is() -> None:
    assert announce_identity("cert-node", "claimed", "10.0.0.1") == "cert-node"
    assert announce_identity(None, "claimed", "10.0.0.1") == "claimed"
    assert announce_identity(None, None, "10.0.0.1") == "10.0.0.1"
    assert announce_identity(None, "", "10.0.0.1") == "10.0.0.1"


def test_a_seed_counts_for_the_publisher_and_confirmers_of_the_current_torrent() -> None:
    clock = Clock()
    a = book(clock)
    ih, other = b"\x01" * 32, b"\x02" * 32
    assert a.is_seeder("d", ih, "pub", publisher="pub")
    assert not a.is_seeder("d", ih, "x", publisher="pub")  # left=0 alone is a claim
    assert a.confirm("d", ih, "x") and not a.confirm("d", ih, "x")
    assert a.is_seeder("d", ih, "x", publisher="pub")
    # Another torrent for the digest (a settled dispute, a CA rotation): nobody confirmed it.
    assert not a.is_seeder("d", other, "x", publisher="pub")
    assert a.confirm("d", other, "y")
    assert not a.is_seeder("d", ih, "x", publisher="pub")
    a.forget("d")
    assert not a.is_seeder("d", other, "y", publisher="pub")


def test_two_identities_delist_a_staller_one_cannot_and_reports_expire() -> None:
    clock = Clock()
    a = book(clock)
    # Nobody delists alone: not by repeating, not by reporting itself.
    for _ in range(5):
        assert not a.report_stall("d", "bad", "r1").delisted
    assert a.report_stall("d", "r1", "r1") == StallVerdict(False, False)
    # A second identity's report, but after the first one expired: still one.
    clock.now += 61
    assert not a.report_stall("d", "bad", "r2").delisted
    # Within the window of r2's: delisted, for this swarm only.
    clock.now += 30
    verdict = a.report_stall("d", "bad", "r3")
    assert verdict.delisted and verdict.counted
    assert a.cooling("d", "bad") and not a.cooling("other", "bad")
    assert not a.is_seeder("d", b"h", "bad", publisher="bad")  # not even as the publisher
    assert a.report_stall("d", "bad", "r4") == StallVerdict(False, False)  # already cooling
    assert a.cooling_count() == 1 and a.delisted == 1
    # The cooling-off ends; the reports that led to it are gone.
    clock.now += 301
    assert not a.cooling("d", "bad")
    assert not a.report_stall("d", "bad", "r1").delisted


def test_records_are_bounded_and_swept() -> None:
    clock = Clock()
    a = book(clock, max_entries=3)
    a.confirm("d", b"h", "x")
    a.report_stall("d", "bad", "r1")
    a.report_stall("e", "bad", "r1")
    with pytest.raises(errors.LimitReached):
        a.confirm("d", b"h", "y")
    clock.now += 61  # the reports expire: room again
    a.confirm("d", b"h", "y")
    a.sweep()
    assert a.cooling_count() == 0
    with pytest.raises(ValueError, match="at least 2"):
        Admission(stall_window_s=1, stall_cooloff_s=1, stall_reporters=1, max_entries=1,
                  clock=clock)


def ann(ih: bytes, port: int, node: str, *, left: int = 0, pid: int = 1) -> AnnounceRequest:
    return AnnounceRequest(ih, bytes([pid]) * 20, port, 0, 0, left, Event.NONE, 200, None,
                           None, node)


async def test_the_coordinator_admits_one_peer_per_identity_and_confirmed_seeders(
    tmp_path: Path,
) -> None:
    t = make_tracker(tmp_path)
    meta = blob_meta(tmp_path)
    digest = str(meta.digest)
    (ih,) = meta.swarm_keys
    await publish_as_holder(t, meta, "pub")
    # 1,000 fake seeders of one identity: one entry, never counted as a seeder.
    for i in range(1000):
        t.announce(ann(ih, 10_000 + i, "mallory", pid=i % 256), "10.0.0.66", "http")
    assert t.peers.totals().peers == 1 and t.peers.seeders(digest) == 0
    assert t.metrics.peers_replaced._value.get() == 999
    lease = await t.acquire_lease(digest, wire.LeaseRequest("honest"))
    assert lease.status is wire.LeaseStatus.GRANTED  # not SEEDED because of mallory
    # A downloader announces left=0 before it confirms (libtorrent's `completed`
    # comes before the node has hashed the blob); its confirmation promotes it.
    t.announce(ann(ih, 7001, "b", left=0), "10.0.0.2", "http")
    assert t.peers.seeders(digest) == 0
    await t.confirm_seed(digest, wire.ConfirmSeed("b", meta.info_hash_v2))
    assert t.peers.seeders(digest) == 1
    # The publisher counts from its first left=0 announce.
    reply = t.announce(ann(ih, 7000, "pub", left=0), "10.0.0.1", "http")
    assert reply.complete == 2
    # A confirmation must name the torrent filed now.
    with pytest.raises(errors.MetainfoConflict):
        await t.confirm_seed(digest, wire.ConfirmSeed("c", b"\x00" * 32))
    with pytest.raises(errors.NotFound):
        await t.confirm_seed(str(blob_meta(tmp_path).digest), wire.ConfirmSeed("c", ih))
    # Publishing the same torrent again is a confirmation too.
    await t.publish(digest, wire.PublishMetainfo("c", meta.size, meta.data))
    t.announce(ann(ih, 7003, "c", left=0), "10.0.0.3", "http")
    assert t.peers.seeders(digest) == 3
    # A torrent that changes (a settled dispute, a CA rotation) starts with nobody
    # confirmed: Tracker._drop_swarm forgets the digest's confirmations.
    t._drop_swarm(digest)
    t.announce(ann(ih, 7002, "b", left=0), "10.0.0.2", "http")
    assert t.peers.seeders(digest) == 0


async def test_the_coordinator_delists_a_peer_two_identities_report(tmp_path: Path) -> None:
    t = make_tracker(tmp_path)
    meta = blob_meta(tmp_path)
    digest = str(meta.digest)
    (ih,) = meta.swarm_keys
    await publish_as_holder(t, meta, "pub")
    silent = compact_address("10.0.0.66", 6666)
    t.announce(ann(ih, 6666, "pub", left=0), "10.0.0.66", "http")  # the publisher, gone silent
    for n in (1, 2, 3):
        t.announce(ann(ih, 7000 + n, f"n{n}", left=5), f"10.0.0.{n}", "http")
    t.report_stall(digest, wire.ReportStall("n1", silent))
    t.report_stall(digest, wire.ReportStall("n1", silent))
    assert silent in t.announce(ann(ih, 7003, "n3", left=5), "10.0.0.3", "http").peers
    t.report_stall(digest, wire.ReportStall("n2", silent))
    assert silent not in t.announce(ann(ih, 7003, "n3", left=5), "10.0.0.3", "http").peers
    assert t.peers.seeders(digest) == 0
    # While it cools off its announces are answered but it stays out of the swarm.
    reply = t.announce(ann(ih, 6666, "pub", left=0), "10.0.0.66", "http")
    assert reply.complete == 0 and len(reply.peers) == 3
    assert silent not in t.announce(ann(ih, 7003, "n3", left=5), "10.0.0.3", "http").peers
    t.report_stall(digest, wire.ReportStall("n1", compact_address("10.9.9.9", 1)))
    outcomes = {o: c._value.get() for o, c in t.metrics.stall_reports.items()}
    assert outcomes == {"counted": 1, "ignored": 1, "unknown_peer": 1, "delisted": 1}
    assert tracker_status(t, 10).seeders == 0


async def test_a_node_that_reported_every_seeder_is_not_sent_back_to_the_swarm(
    tmp_path: Path,
) -> None:
    t = make_tracker(tmp_path)
    meta = blob_meta(tmp_path)
    digest = str(meta.digest)
    (ih,) = meta.swarm_keys
    await publish_as_holder(t, meta, "pub")
    silent = compact_address("10.0.0.66", 6666)
    t.announce(ann(ih, 6666, "pub", left=0), "10.0.0.66", "http")

    async def ask(node: str) -> wire.LeaseReply:
        return await t.acquire_lease(digest, wire.LeaseRequest(node, meta.size))

    assert (await ask("n1")).status is wire.LeaseStatus.SEEDED
    t.report_stall(digest, wire.ReportStall("n1", silent))
    # n1 reported the only seeder: it fetches; n2, who did not, still joins the swarm.
    granted = await ask("n1")
    assert granted.status is wire.LeaseStatus.GRANTED and granted.holder == "n1"
    assert (await ask("n2")).status is wire.LeaseStatus.SEEDED
    # A second seeder n1 has not reported: the swarm again, for n1 too.
    await t.confirm_seed(digest, wire.ConfirmSeed("n3", ih))
    t.announce(ann(ih, 6667, "n3", left=0), "10.0.0.3", "http")
    assert (await ask("n1")).status is wire.LeaseStatus.SEEDED


async def test_confirmations_survive_a_tracker_restart_on_its_store(tmp_path: Path) -> None:
    meta = blob_meta(tmp_path)
    digest = str(meta.digest)
    (ih,) = meta.swarm_keys
    async with open_sqlite_store(tmp_path / "state") as store:
        t = make_tracker(tmp_path, store)
        await publish_as_holder(t, meta, "pub")
        await t.confirm_seed(digest, wire.ConfirmSeed("b", meta.info_hash_v2))
        # A row of a torrent the digest no longer has (replaced since): void, and it
        # must not reset the current torrent's confirmations whatever the load order.
        for node in ("a", "z"):
            await store.put_confirmation(StoredConfirmation(digest, b"\x01" * 32, node))
    # A new process on the same store: b's left=0 announce counts at once, as it did.
    async with open_sqlite_store(tmp_path / "state") as store:
        again = make_tracker(tmp_path, store)
        again.restore(await store.load())
        assert again.announce(ann(ih, 7001, "b"), "10.0.0.2", "http").complete == 1
        assert again.announce(ann(ih, 7002, "c"), "10.0.0.3", "http").complete == 1  # c: no
        assert again.announce(ann(ih, 7003, "z"), "10.0.0.4", "http").complete == 1  # void row
        # The digest's metainfo expiring takes its confirmations with it.
        await store.delete_metainfo(digest)
        assert (await store.load()).confirmations == []

