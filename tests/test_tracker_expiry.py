"""Metainfo nobody announces is forgotten (tracker/expiry.py and the coordinator's sweep).

The book over plain numbers; the coordinator over a clock the test moves
(MemoryStore): a digest with a live peer, a lease or a pinned digest stays,
an idle one goes from memory and store, and can be filed again; and the real
tracker on SQLite, restarted: what expired stays gone, the pinned digest stays.
"""

from __future__ import annotations

from pathlib import Path

import trio

from p2preg.core import errors, wire
from p2preg.core.config import HostPort
from tests.tracker_helpers import (
    SteppedClock,
    blob_meta,
    file_as_holder,
    publish_as_holder,
    running_tracker,
)
from tracker.announce import AnnounceRequest, Event
from tracker.client import open_tracker_client
from tracker.config import TrackerConfig
from tracker.coordinator import Tracker
from tracker.expiry import SCAN_BATCH, IdleMetainfo
from tracker.state import MemoryStore

IDLE_S = 300.0
# The longest the expiry may be is twice the seeders' announce interval.
SEEDER_S = int(IDLE_S / 2)


def test_idle_digests_expire_in_use_ones_restart_their_clock_pinned_never() -> None:
    book = IdleMetainfo(100.0, pinned=["p"])
    busy = {"b"}
    digests = ["a", "b", "p"]

    def scan(now: float) -> list[str]:
        return list(book.expired(lambda: list(digests), busy.__contains__, now))

    assert scan(0.0) == []
    assert scan(99.0) == []
    busy.clear()  # b was last seen in use at 99: its idle time counts from there
    assert scan(150.0) == ["a"]
    digests.remove("a")
    assert scan(198.0) == []
    assert scan(199.0) == ["b"]
    assert scan(10_000.0) == []  # p is pinned
    assert book.idle_since("p") is None


def test_a_pass_over_many_digests_is_spread_over_sweeps() -> None:
    book = IdleMetainfo(1.0)
    many = [f"d{n}" for n in range(SCAN_BATCH + 5)]
    assert list(book.expired(lambda: many, lambda d: False, 0.0)) == []
    assert list(book.expired(lambda: many, lambda d: False, 0.0)) == []  # the last 5
    first = list(book.expired(lambda: many, lambda d: False, 2.0))
    assert first == many[:SCAN_BATCH]
    assert list(book.expired(lambda: many, lambda d: False, 2.0)) == many[SCAN_BATCH:]


def _tracker(tmp_path: Path, clock: SteppedClock, **overrides: object) -> Tracker:
    config = TrackerConfig(
        listen=HostPort("127.0.0.1", 0), data_dir=tmp_path, metainfo_idle_expiry_s=IDLE_S,
        seeder_announce_interval_s=SEEDER_S, **overrides,  # type: ignore[arg-type]
    )
    return Tracker(config, MemoryStore(), clock=clock)


def _announce(info_hash: bytes, port: int) -> AnnounceRequest:
    peer_id = b"-qB0000-%012d" % port
    return AnnounceRequest(info_hash, peer_id, port, 0, 0, 0, Event.NONE, None, None)


async def test_the_sweep_forgets_idle_metainfo_in_memory_and_in_the_store(tmp_path: Path) -> None:
    clock = SteppedClock()
    idle, seeded, leased, pinned = (blob_meta(tmp_path, 1000 + n) for n in range(4))
    tracker = _tracker(tmp_path, clock, pinned_digests=(str(pinned.digest),), lease_ttl_s=100.0)
    store = tracker._store
    assert isinstance(store, MemoryStore)
    for meta in (idle, seeded, leased, pinned):
        await publish_as_holder(tracker, meta, "a")
    await tracker.confirm_seed(str(idle.digest), wire.ConfirmSeed("b", idle.info_hash_v2))
    await tracker.sweep()  # first sight: every clock starts now
    lease = await tracker.acquire_lease(str(leased.digest), wire.LeaseRequest("a", leased.size))
    assert lease.status is wire.LeaseStatus.GRANTED
    for _ in range(4):
        clock.step(IDLE_S / 4)
        # A seeder announcing every interval keeps its digest; a held lease does too.
        tracker.announce(_announce(seeded.swarm_keys[0], 7000), "127.0.0.1", "http")
        await tracker.renew_lease(
            str(leased.digest), wire.LeaseRenew(lease.lease_id or "", 10, leased.size)
        )
        await tracker.sweep()
    assert tracker.registry.get(str(idle.digest)) is None
    assert str(idle.digest) not in store.metainfo
    # Its confirmations go too, from memory (they count against the tracker's caps)
    # and from the store.
    admission = tracker.swarms.admission
    assert not admission.is_seeder(str(idle.digest), idle.info_hash_v2, "b", "a")
    assert admission.entries == 0 and store.confirmations == {}
    try:
        tracker.announce(_announce(idle.swarm_keys[0], 7001), "127.0.0.1", "http")
    except errors.UnknownTorrent:
        pass
    else:
        raise AssertionError("an announce for expired metainfo was taken")
    for kept in (seeded, leased, pinned):
        assert tracker.registry.get(str(kept.digest)) is not None
        assert str(kept.digest) in store.metainfo
    text = tracker.metrics.render().decode()
    assert "p2preg_tracker_metainfo_expired_total 1.0" in text
    # The next holder of the blob files the same torrent again.
    _, created = await publish_as_holder(tracker, idle, "b")
    assert created and str(idle.digest) in store.metainfo


async def test_an_expiry_survives_a_restart_and_a_pinned_digest_is_kept(tmp_path: Path) -> None:
    idle, pinned = blob_meta(tmp_path, 2000), blob_meta(tmp_path, 2001)
    settings = dict(
        metainfo_idle_expiry_s=IDLE_S, seeder_announce_interval_s=SEEDER_S,
        pinned_digests=(str(pinned.digest),),
        # The sweeper runs every lease_ttl_s/2: often, so the test waits little
        # (and the hand-off, which must fit in the TTL, is off).
        lease_ttl_s=0.2, upstream_handoff_s=0.0,
    )
    clock = SteppedClock()
    async with (
        running_tracker(tmp_path, clock=clock, **settings) as url,
        open_tracker_client(url, node="a") as client,
    ):
        for meta in (idle, pinned):
            await file_as_holder(client, meta)
        # Move the tracker's clock a tenth of the idle time per sweep until it forgets.
        for _ in range(200):
            if await client.lookup_metainfo(idle.digest) is None:
                break
            clock.step(IDLE_S / 10)
            await trio.sleep(0.1)
        else:
            raise AssertionError("idle metainfo was never forgotten")
        assert await client.lookup_metainfo(pinned.digest) is not None
    async with (
        running_tracker(tmp_path, **settings) as url,
        open_tracker_client(url, node="b") as client,
    ):
        assert await client.lookup_metainfo(idle.digest) is None
        record = await client.lookup_metainfo(pinned.digest)
        assert record is not None and record.metainfo == pinned.data
