"""Upstream leases: the sans-IO book, and long-polling through the service on trio's MockClock.

Everything here is pure trio (MemoryStore, no threads, no sockets), so the
autojumping MockClock is safe: virtual minutes pass in milliseconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from p2preg.config import HostPort
from p2preg.core import wire
from tracker.config import TrackerConfig
from tracker.errors import LeaseLost
from tracker.leases import Granted, Held, LeaseBook, Waiters
from tracker.service import Tracker
from tracker.state import MemoryStore

D = "sha256:" + "ab" * 32


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_one_lease_per_digest_until_it_expires() -> None:
    clock = FakeClock()
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
    clock = FakeClock()
    book = LeaseBook(10.0, clock)
    lease = book.acquire(D, "a").lease
    for done in (100, 200, 300):
        clock.now += 8
        lease = book.renew(D, lease.lease_id, done, 1000)
        assert isinstance(book.acquire(D, "b"), Held)
    assert (lease.bytes_done, lease.size, lease.expires_at) == (300, 1000, clock.now + 10)


def test_renewing_an_expired_or_foreign_lease_fails() -> None:
    clock = FakeClock()
    book = LeaseBook(10.0, clock)
    lease = book.acquire(D, "a").lease
    with pytest.raises(LeaseLost):
        book.renew(D, "not-the-id", 1, None)
    clock.now += 11
    with pytest.raises(LeaseLost):
        book.renew(D, lease.lease_id, 1, None)


def test_holder_asking_again_keeps_its_lease_and_release_frees_it() -> None:
    clock = FakeClock()
    book = LeaseBook(10.0, clock)
    lease = book.acquire(D, "a").lease
    again = book.acquire(D, "a")
    assert isinstance(again, Granted) and again.lease.lease_id == lease.lease_id
    assert book.release(D, "wrong") is None
    assert book.release(D, lease.lease_id) == again.lease
    assert isinstance(book.acquire(D, "b"), Granted)


def test_expire_sweeps_and_restore_skips_dead_leases() -> None:
    clock = FakeClock()
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
    config = TrackerConfig(
        listen=HostPort("127.0.0.1", 0),
        data_dir=tmp_path,
        lease_ttl_s=10.0,
        lease_wait_max_s=25.0,
        **overrides,  # type: ignore[arg-type]
    )
    return Tracker(config, MemoryStore())


async def test_live_holder_is_never_overtaken_and_expired_lease_passes_on(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    t = tracker(tmp_path)
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
