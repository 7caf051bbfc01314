"""Leases that cannot be held hostage: the LeaseBook's rate, progress, identity and cap rules.

Sans-IO over a hand-moved clock (the book), and the coordinator on trio's
MockClock over a MemoryStore (pure trio, so autojump is safe): a holder that
fakes progress is replaced after one window, an honest one at the rate never
is, at most one handover per blob per window, and one node cannot hold more
than its cap. No sockets.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from p2preg.core import wire
from p2preg.core.errors import Forbidden, InvalidRequest, LeaseCapReached, LeaseLost
from tests.tracker_helpers import FakeClock, make_tracker
from tracker.leases import Granted, Held, LeaseBook, RateRule

D = "sha256:" + "cd" * 32
E = "sha256:" + "ef" * 32
KiB = 1024
RATE = RateRule(min_bytes_s=256 * KiB, window_s=30.0)
TTL = 30.0
SIZE = 64 * 1024 * KiB


def book(clock: FakeClock, **kw: object) -> LeaseBook:
    return LeaseBook(TTL, clock, rate=RATE, **kw)  # type: ignore[arg-type]


def test_a_lease_dropped_as_passed_on_still_lets_its_holder_file_its_copy() -> None:
    b = book(FakeClock())
    b.acquire("d1", "n1", SIZE)
    b.acquire("d2", "n1", SIZE)
    b.drop("d1")
    b.drop("d2", passed=True)
    assert b.current("d1") is None and b.current("d2") is None
    assert not b.passed_from("d1", "n1")
    assert b.passed_from("d2", "n1") and not b.passed_from("d2", "n2")


def test_one_byte_per_renewal_is_replaced_after_the_window_and_told_why() -> None:
    clock = FakeClock()
    b = book(clock)
    lease = b.acquire(D, "evil", SIZE).lease
    done = 0
    for _ in range(2):  # renewals every 10 s, one more byte each
        clock.now += 10
        done += 1
        b.renew(D, lease.lease_id, done, SIZE, holder="evil")
        assert isinstance(b.acquire(D, "honest", SIZE), Held)  # within the window
    clock.now += 10
    slow = b.renew(D, lease.lease_id, done + 1, SIZE, holder="evil")
    assert slow.slow and b.is_slow(slow)
    taken = b.acquire(D, "honest", SIZE)
    assert isinstance(taken, Granted) and taken.replaced is not None
    assert taken.lease.holder == "honest" and taken.lease.lease_id != lease.lease_id
    assert taken.replaced.holder == "evil" and b.replacements == 1
    with pytest.raises(LeaseLost, match=r"handed from 'evil' to 'honest'.*below the minimum"):
        b.renew(D, lease.lease_id, done + 2, SIZE, holder="evil")


def test_an_honest_holder_at_the_rate_is_never_replaced() -> None:
    clock = FakeClock()
    b = book(clock)
    lease = b.acquire(D, "a", SIZE).lease
    done = 0
    for _ in range(25):  # 250 s at exactly the minimum rate, renewing every 10 s
        clock.now += 10
        done += RATE.min_bytes_s * 10
        lease = b.renew(D, lease.lease_id, done, SIZE, holder="a")
        assert not b.is_slow(lease)
        assert isinstance(b.acquire(D, "b", SIZE), Held)
    assert b.replacements == 0


def test_a_holder_that_only_asks_again_never_renewing_is_slow_after_a_window_and_a_ttl() -> None:
    clock = FakeClock()
    b = book(clock)
    b.acquire(D, "evil", SIZE)
    for _ in range(5):  # 50 s of "signs of life" without one progress report
        clock.now += 10
        assert isinstance(b.acquire(D, "evil", SIZE), Granted)
    assert not b.is_slow(b.current(D))  # type: ignore[arg-type]
    clock.now += 10  # 60 s = window + TTL since the grant
    assert isinstance(b.acquire(D, "evil"), Granted)
    taken = b.acquire(D, "honest")
    assert isinstance(taken, Granted) and taken.replaced is not None


def test_at_most_one_replacement_per_blob_per_window() -> None:
    clock = FakeClock()
    b = book(clock)
    first = b.acquire(D, "x", SIZE).lease
    for n in range(3):
        clock.now += 10
        b.renew(D, first.lease_id, n, SIZE)
    second = b.acquire(D, "y", SIZE)
    assert isinstance(second, Granted) and second.replaced is not None
    handed_at = clock.now
    # y is slow too (a shared thin link): it still keeps the fetch a whole window.
    for _ in range(29):
        clock.now += 1
        b.renew(D, second.lease.lease_id, 1, SIZE)
        assert isinstance(b.acquire(D, "z", SIZE), Held)
    clock.now += 1
    b.renew(D, second.lease.lease_id, 2, SIZE)
    third = b.acquire(D, "z", SIZE)
    assert isinstance(third, Granted) and third.replaced is not None
    assert third.replaced.holder == "y" and clock.now - handed_at == pytest.approx(30)
    assert b.replacements == 2


def test_progress_only_grows_and_never_passes_the_size() -> None:
    clock = FakeClock()
    b = book(clock)
    lease = b.acquire(D, "a", 1000).lease
    b.renew(D, lease.lease_id, 500, 1000)
    expires = b.current(D).expires_at  # type: ignore[union-attr]
    clock.now += 5
    with pytest.raises(InvalidRequest, match="below the 500 already reported"):
        b.renew(D, lease.lease_id, 499, 1000)
    with pytest.raises(InvalidRequest, match="past the blob's size 1000"):
        b.renew(D, lease.lease_id, 1001, 1000)
    with pytest.raises(InvalidRequest, match="size 2000 is not its size 1000"):
        b.renew(D, lease.lease_id, 600, 2000)
    with pytest.raises(InvalidRequest):
        b.renew(D, lease.lease_id, -1, None)
    # Refused renewals extend nothing and record nothing.
    assert b.current(D).expires_at == expires and b.current(D).bytes_done == 500  # type: ignore[union-attr]
    assert b.renew(D, lease.lease_id, 1000, None).fetched


def test_a_finished_holder_keeps_its_lease_one_window_to_seed_then_it_passes_on() -> None:
    clock = FakeClock()
    b = book(clock)
    lease = b.acquire(D, "a", 1000).lease
    clock.now += 5
    b.renew(D, lease.lease_id, 1000, 1000)  # fetched in 5 s
    for _ in range(5):  # still renewing, never seeding
        clock.now += 10
        b.renew(D, lease.lease_id, 1000, 1000)
        assert isinstance(b.acquire(D, "b"), Held)
    clock.now += 10  # 30 s (the window the fetch ended in) + 30 s more without a seeder
    b.renew(D, lease.lease_id, 1000, 1000)
    assert isinstance(b.acquire(D, "b"), Granted)


def test_a_lease_id_goes_to_its_holder_only() -> None:
    clock = FakeClock()
    b = book(clock)
    lease = b.acquire(D, "a", SIZE).lease
    other = b.acquire(D, "b", SIZE)
    assert isinstance(other, Held)
    assert other.lease.holder == "a"  # shown who holds it, for the wait's progress…
    with pytest.raises(Forbidden):  # …but the id alone is no credential
        b.renew(D, lease.lease_id, 1, SIZE, holder="b")
    with pytest.raises(Forbidden):
        b.release(D, lease.lease_id, holder="b")


def test_one_node_holds_at_most_its_cap_of_open_leases() -> None:
    clock = FakeClock()
    b = book(clock, max_per_holder=2)
    digests = ["sha256:" + f"{n:02x}" * 32 for n in range(4)]
    for d in digests[:2]:
        assert isinstance(b.acquire(d, "flood"), Granted)
    with pytest.raises(LeaseCapReached, match="holds 2 open leases"):
        b.acquire(digests[2], "flood")
    assert isinstance(b.acquire(digests[0], "flood"), Granted)  # its own, asked again
    assert isinstance(b.acquire(digests[2], "other"), Granted)  # others are not affected
    b.release(digests[0], b.current(digests[0]).lease_id)  # type: ignore[union-attr]
    assert isinstance(b.acquire(digests[3], "flood"), Granted)
    clock.now += TTL  # expired leases no longer count
    assert b.held_by("flood") == 0
    assert isinstance(b.acquire(digests[2], "flood"), Granted)


def test_without_a_minimum_rate_a_renewing_holder_is_never_replaced() -> None:
    clock = FakeClock()
    b = LeaseBook(TTL, clock, rate=RateRule(0, 30.0))
    lease = b.acquire(D, "a").lease
    for n in range(20):
        clock.now += 10
        b.renew(D, lease.lease_id, n, None)
    assert isinstance(b.acquire(D, "b"), Held)


# -- through the coordinator ---------------------------------------------------------


async def test_a_waiter_is_woken_and_handed_the_fetch_when_the_holder_falls_behind(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    t = make_tracker(tmp_path, lease_ttl_s=3.0, lease_rate_window_s=6.0)
    held = await t.acquire_lease(D, wire.LeaseRequest("evil", SIZE), identity="evil")
    assert held.lease_id and held.min_rate_bytes_s == 256 * KiB and held.rate_window_s == 6.0
    # Acknowledged at once, as a node does: the rate window starts here.
    await t.renew_lease(D, wire.LeaseRenew(held.lease_id, 0), identity="evil")
    start = trio.current_time()
    got: list[wire.LeaseReply] = []
    granted_at: list[float] = []

    async def waiter() -> None:
        while not got or got[-1].status is wire.LeaseStatus.WAIT:
            got.append(await t.acquire_lease(D, wire.LeaseRequest("b", SIZE, wait_s=25)))
        granted_at.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        for n in range(1, 8):  # +1 byte a second
            await trio.sleep(1)
            try:
                await t.renew_lease(D, wire.LeaseRenew(held.lease_id, n), identity="evil")
            except LeaseLost as e:
                assert "handed from 'evil' to 'b'" in str(e)
                break
    final = got[-1]
    assert final.status is wire.LeaseStatus.GRANTED and final.replaced == "evil"
    assert final.lease_id and final.lease_id != held.lease_id
    # Woken by the renewal that closed the window, not by a poll or an expiry.
    assert granted_at == [pytest.approx(start + 6)]
    assert t.metrics.lease_replacements._value.get() == 1


async def test_a_request_naming_the_holder_under_another_identity_gets_no_lease_id(
    tmp_path: Path,
) -> None:
    t = make_tracker(tmp_path)
    held = await t.acquire_lease(D, wire.LeaseRequest("a", SIZE), identity="a")
    assert held.lease_id
    # The route would refuse the mismatch outright under TLS; the coordinator,
    # told the identity, does not take the message's word for it either.
    reply = await t.acquire_lease(D, wire.LeaseRequest("a", SIZE), identity="mallory")
    assert reply.status is wire.LeaseStatus.WAIT and reply.lease_id is None
    with pytest.raises(Forbidden):
        await t.renew_lease(D, wire.LeaseRenew(held.lease_id, 1), identity="mallory")


async def test_bad_progress_and_the_cap_are_counted(tmp_path: Path) -> None:
    t = make_tracker(tmp_path, max_leases_per_node=1)
    held = await t.acquire_lease(D, wire.LeaseRequest("a", 100), identity="a")
    with pytest.raises(InvalidRequest):
        await t.renew_lease(D, wire.LeaseRenew(held.lease_id or "", 101), identity="a")
    with pytest.raises(LeaseCapReached):
        await t.acquire_lease(E, wire.LeaseRequest("a", 100), identity="a")
    text = t.metrics.render().decode()
    assert 'p2preg_tracker_lease_refused_total{reason="bad_progress"} 1.0' in text
    assert 'p2preg_tracker_lease_refused_total{reason="lease_cap"} 1.0' in text


async def test_a_never_finishing_lease_frees_its_images_upstream_slot_after_the_window(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    image = "sha256:" + "11" * 32
    t = make_tracker(tmp_path, lease_ttl_s=3.0, lease_rate_window_s=6.0)
    first = wire.LeaseRequest("evil", SIZE, group=image, order=1)
    held = await t.acquire_lease(D, first, identity="evil")
    assert held.lease_id
    await t.renew_lease(D, wire.LeaseRenew(held.lease_id, 0), identity="evil")  # the ack
    start = trio.current_time()
    got: list[float] = []

    async def next_layer() -> None:
        msg = wire.LeaseRequest("b", SIZE, wait_s=25, group=image, order=2)
        reply = await t.acquire_lease(E, msg)
        while reply.status is wire.LeaseStatus.WAIT:
            reply = await t.acquire_lease(E, msg)
        assert reply.status is wire.LeaseStatus.GRANTED
        got.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(next_layer)
        for n in range(1, 7):  # +1 byte a second: slow once the 6 s window closes
            await trio.sleep(1)
            await t.renew_lease(D, wire.LeaseRenew(held.lease_id, n), identity="evil")
    assert got == [pytest.approx(start + 6)]
