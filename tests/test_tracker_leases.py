"""Upstream leases: the sans-IO book, and long-polling through the service on trio's MockClock.

Everything here is pure trio (MemoryStore, no threads, no sockets), so the
autojumping MockClock is safe: virtual minutes pass in milliseconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from p2preg.core import wire
from p2preg.core.config import ConfigError
from p2preg.core.errors import Forbidden, LeaseLost
from tests.tracker_helpers import FakeClock, make_tracker
from tracker.coordinator import Tracker
from tracker.leases import Granted, Held, LeaseBook
from tracker.waiters import Waiters

D = "sha256:" + "ab" * 32


def test_one_lease_per_digest_until_it_expires() -> None:
    clock = FakeClock(100.0)
    book = LeaseBook(10.0, clock)
    first = book.acquire(D, "a", 500)
    assert isinstance(first, Granted) and first.lease.size == 500
    second = book.acquire(D, "b")
    assert isinstance(second, Held) and second.lease.holder == "a"
    clock.now += 9.9
    assert isinstance(book.acquire(D, "c"), Held)
    clock.now += 0.2
    third = book.acquire(D, "c")
    assert isinstance(third, Granted) and third.lease.holder == "c"
    assert third.lease.lease_id != first.lease.lease_id
    assert (book.granted, book.expired) == (2, 1)


def test_renewal_keeps_the_lease_and_records_progress() -> None:
    clock = FakeClock(100.0)
    book = LeaseBook(10.0, clock)
    lease = book.acquire(D, "a").lease
    for done in (100, 200, 300):
        clock.now += 8
        lease = book.renew(D, lease.lease_id, done, 1000)
        assert isinstance(book.acquire(D, "b"), Held)
    assert (lease.bytes_done, lease.size, lease.expires_at) == (300, 1000, clock.now + 10)


def test_renewing_an_expired_or_foreign_lease_fails() -> None:
    clock = FakeClock(100.0)
    book = LeaseBook(10.0, clock)
    lease = book.acquire(D, "a").lease
    with pytest.raises(LeaseLost):
        book.renew(D, "not-the-id", 1, None)
    clock.now += 11
    with pytest.raises(LeaseLost):
        book.renew(D, lease.lease_id, 1, None)


def test_with_a_holder_only_that_node_renews_or_releases_even_knowing_the_id() -> None:
    clock = FakeClock(100.0)
    book = LeaseBook(10.0, clock)
    lease = book.acquire(D, "a").lease
    with pytest.raises(Forbidden, match="held by another node"):
        book.renew(D, lease.lease_id, 5, None, holder="b")
    with pytest.raises(Forbidden):
        book.release(D, lease.lease_id, holder="b")
    assert book.current(D) == lease
    assert book.renew(D, lease.lease_id, 5, None, holder="a").bytes_done == 5
    assert book.release(D, lease.lease_id, holder="a") is not None


def test_holder_asking_again_keeps_its_lease_and_release_frees_it() -> None:
    clock = FakeClock(100.0)
    book = LeaseBook(10.0, clock)
    lease = book.acquire(D, "a").lease
    again = book.acquire(D, "a")
    assert isinstance(again, Granted) and again.lease.lease_id == lease.lease_id
    assert book.release(D, "wrong") is None
    assert book.release(D, lease.lease_id) == again.lease
    assert isinstance(book.acquire(D, "b"), Granted)


def test_expire_sweeps_and_restore_skips_dead_leases() -> None:
    clock = FakeClock(100.0)
    book = LeaseBook(10.0, clock)
    lease = book.acquire(D, "a").lease
    clock.now += 10
    assert book.expire() == [lease] and len(book) == 0
    book.restore(lease)  # already past its time
    assert len(book) == 0


async def test_waiters_wake_on_notify_or_deadline(autojump_clock: trio.testing.MockClock) -> None:
    waiters = Waiters()
    woke: list[float] = []

    async def wait(deadline: float) -> None:
        await waiters.wait(D, deadline)
        woke.append(trio.current_time())

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait, start + 100)
        nursery.start_soon(wait, start + 3)
        await trio.sleep(5)
        assert D in waiters
        waiters.notify(D)
    assert woke == [start + 3, start + 5]
    assert D not in waiters


def tracker(tmp_path: Path, **overrides: object) -> Tracker:
    # The TTL's own rules: no silence or grant-ack rule (tests/test_lease_silence.py,
    # tests/test_lease_grant_ack.py have them).
    settings = {
        "lease_ttl_s": 10.0, "lease_wait_max_s": 25.0, "lease_silence_s": 0.0,
        "lease_grant_ack_s": 0.0,
    }
    return make_tracker(tmp_path, **{**settings, **overrides})


async def test_live_holder_is_never_overtaken_and_expired_lease_passes_on(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # 10 bytes every 5 s is exactly the minimum rate here: live, and keeping up.
    t = tracker(tmp_path, lease_min_rate_bytes_s=2, lease_rate_window_s=10.0)
    held = await t.acquire_lease(D, wire.LeaseRequest("a", 1000))
    assert held.status is wire.LeaseStatus.GRANTED and held.lease_id
    start = trio.current_time()
    last_renewal = start

    async def slow_but_live_holder() -> None:
        nonlocal last_renewal
        for step in range(1, 13):  # 60 s of renewals every 5 s, 10 bytes at a time
            await trio.sleep(5)
            assert held.lease_id is not None
            await t.renew_lease(D, wire.LeaseRenew(held.lease_id, step * 10))
            last_renewal = trio.current_time()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(slow_but_live_holder)
        # The long poll runs its full 25 s without being handed the lease...
        reply = await t.acquire_lease(D, wire.LeaseRequest("b", wait_s=60))
        assert reply.status is wire.LeaseStatus.WAIT
        assert trio.current_time() - start == pytest.approx(25)
        assert reply.holder == "a" and reply.bytes_done > 0 and reply.lease_id is None
        assert 0 < reply.retry_after_s <= 10
        # ...and again: the holder keeps renewing.
        reply = await t.acquire_lease(D, wire.LeaseRequest("b", wait_s=25))
        assert reply.status is wire.LeaseStatus.WAIT
    # The holder stopped renewing at last_renewal: the next asker gets the lease
    # exactly when it expires, not before.
    reply = await t.acquire_lease(D, wire.LeaseRequest("b", wait_s=25))
    assert reply.status is wire.LeaseStatus.GRANTED
    assert trio.current_time() == pytest.approx(last_renewal + 10)
    assert (t.leases.granted, t.leases.expired) == (2, 1)
    with pytest.raises(LeaseLost):
        await t.renew_lease(D, wire.LeaseRenew(held.lease_id or "", 999))


async def test_release_wakes_a_waiter_at_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    t = tracker(tmp_path)
    held = await t.acquire_lease(D, wire.LeaseRequest("a"))
    got: list[wire.LeaseReply] = []

    async def waiter() -> None:
        got.append(await t.acquire_lease(D, wire.LeaseRequest("b", wait_s=25)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.sleep(2)
        await t.release_lease(D, wire.LeaseRelease(held.lease_id or ""))
    assert got[0].status is wire.LeaseStatus.GRANTED and got[0].holder == "b"
    assert t.leases.expired == 0


async def test_sweeper_expires_leases(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    t = tracker(tmp_path)
    await t.acquire_lease(D, wire.LeaseRequest("a"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(t.sweep_forever)
        await trio.sleep(12)
        nursery.cancel_scope.cancel()
    assert len(t.leases) == 0 and t.leases.expired == 1


IMAGE = "sha256:" + "11" * 32
LAYERS = ["sha256:" + f"{n:02x}" * 32 for n in range(1, 5)]


@pytest.mark.parametrize("ack_s", [0.0, 0.5])
async def test_an_images_blobs_cross_upstream_one_at_a_time_in_manifest_order(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, ack_s: float
) -> None:
    # ack_s: holders acknowledge their grant 0.05 s after it (a 0-byte renewal),
    # within the tracker's window; the next layer still takes the hand-off.
    t = tracker(tmp_path, lease_grant_ack_s=ack_s)
    granted: list[tuple[float, int]] = []

    async def node(name: str, order: int) -> None:
        """Ask for one layer until granted, then fetch it in 4 s and report it done."""
        digest = LAYERS[order - 1]
        while True:
            msg = wire.LeaseRequest(name, 100, 25, IMAGE, order)
            reply = await t.acquire_lease(digest, msg)
            if reply.status is wire.LeaseStatus.GRANTED:
                break
            assert reply.status is wire.LeaseStatus.WAIT and reply.lease_id is None
        granted.append((trio.current_time(), order))
        assert reply.lease_id is not None
        if ack_s:
            await trio.sleep(0.05)
            await t.renew_lease(digest, wire.LeaseRenew(reply.lease_id, 0, 100))
            await trio.sleep(3.95)
        else:
            await trio.sleep(4)
        await t.renew_lease(digest, wire.LeaseRenew(reply.lease_id, 100, 100))

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        # The layers at places 2-4 asked for last first, within a few tens of ms,
        # as a client does (the first layer, place 1, never comes: say it is small).
        for order in (4, 3, 2):
            nursery.start_soon(node, f"n{order}", order)
            await trio.sleep(0.05)
    # The image's first fetch waited GATHER_S for earlier places, then each
    # layer went earliest first: the second as the first reported its last byte,
    # the third at the hand-off (0.3 s) before the second's last byte, which
    # reports nothing before it but is due at the first's rate (tests/test_tracker_handoff.py).
    assert [(round(at - start, 2), order) for at, order in granted] == [
        (0.25, 2),
        (4.25, 3),
        (7.95, 4),
    ]
    # A first layer (or config) never waits: no place comes before it.
    first = await t.acquire_lease(
        LAYERS[0], wire.LeaseRequest("n1", 100, 25, "sha256:" + "33" * 32, 1)
    )
    assert first.status is wire.LeaseStatus.GRANTED
    assert t.leases.granted == 4


async def test_a_queued_blob_waits_for_the_fetch_ahead_and_others_images_do_not(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    t = tracker(tmp_path)
    first = await t.acquire_lease(LAYERS[0], wire.LeaseRequest("a", 100, 0, IMAGE, 1))
    assert first.status is wire.LeaseStatus.GRANTED
    # Another image, or no image named: not held back by this image's fetch.
    elsewhere = wire.LeaseRequest("b", 100, 0, "sha256:" + "22" * 32, 1)
    other = await t.acquire_lease(LAYERS[1], elsewhere)
    assert other.status is wire.LeaseStatus.GRANTED
    bare = await t.acquire_lease(LAYERS[2], wire.LeaseRequest("c", 100))
    assert bare.status is wire.LeaseStatus.GRANTED
    # The same image: a WAIT showing the fetch ahead and its progress.
    await t.renew_lease(LAYERS[0], wire.LeaseRenew(first.lease_id or "", 40, 100))
    start = trio.current_time()
    queued = await t.acquire_lease(LAYERS[3], wire.LeaseRequest("d", 100, 5, IMAGE, 2))
    assert queued.status is wire.LeaseStatus.WAIT
    assert (queued.holder, queued.bytes_done, queued.size) == ("a", 40, 100)
    assert trio.current_time() - start == pytest.approx(5)
    # A holder that dies frees the slot when its lease expires (10 s TTL).
    queued = await t.acquire_lease(LAYERS[3], wire.LeaseRequest("d", 100, 25, IMAGE, 2))
    assert queued.status is wire.LeaseStatus.GRANTED
    assert trio.current_time() - start == pytest.approx(10)


async def test_releasing_a_failed_fetch_frees_the_images_slot_at_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    t = tracker(tmp_path, upstream_fetches_per_image=2)
    a = await t.acquire_lease(LAYERS[0], wire.LeaseRequest("a", 100, 0, IMAGE, 1))
    b = await t.acquire_lease(LAYERS[1], wire.LeaseRequest("b", 100, 0, IMAGE, 2))
    assert a.status is b.status is wire.LeaseStatus.GRANTED  # two slots
    got: list[tuple[float, wire.LeaseReply]] = []

    async def third() -> None:
        reply = await t.acquire_lease(LAYERS[2], wire.LeaseRequest("c", 100, 25, IMAGE, 3))
        got.append((trio.current_time(), reply))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(third)
        await trio.sleep(3)
        assert not got
        await t.release_lease(LAYERS[1], wire.LeaseRelease(b.lease_id or ""))
    assert got[0][1].status is wire.LeaseStatus.GRANTED and got[0][0] == pytest.approx(3)


def test_upstream_fetches_per_image_must_not_be_negative(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        tracker(tmp_path, upstream_fetches_per_image=-1)


async def test_the_next_blob_goes_to_a_node_that_did_not_just_fetch_one(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    t = tracker(tmp_path)
    holders: dict[str, str] = {}

    async def node(name: str, order: int, start_s: float) -> None:
        """Ask for layer `order` (from `start_s`); fetch it in 4 s if granted."""
        await trio.sleep(start_s)
        digest = LAYERS[order]
        while digest not in holders:
            reply = await t.acquire_lease(digest, wire.LeaseRequest(name, 100, 2, IMAGE, order))
            if reply.status is wire.LeaseStatus.GRANTED:
                holders[digest] = name
                await trio.sleep(4)
                await t.renew_lease(digest, wire.LeaseRenew(reply.lease_id or "", 100, 100))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(node, "a", 0, 0)
        for order in (1, 2, 3):
            # "a" is always first in line; the other node still gets every other blob.
            nursery.start_soon(node, "a", order, 0.1)
            nursery.start_soon(node, "b", order, 0.2)
    assert [holders[d] for d in LAYERS] == ["a", "b", "a", "b"]
