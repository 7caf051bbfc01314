"""A lease whose holder went silent stops holding up its blob and its image long before its TTL.

The LeaseBook over a hand-moved clock: a holder with no sign of life (grant,
renewal, asking again) for `silence_s` is taken over by the next asker, at
most once per blob per rate window; a grant never renewed is the same case;
the silent lease gives up its image's upstream slot; `turned_silent` reports
each silence once. Then the coordinator on trio's MockClock over a
MemoryStore (pure trio, so autojump is safe), with its sweeper running: long
polls are woken when the holder goes silent, not at the TTL or the 5 s sweep,
and a paused holder that wakes after the takeover still files its torrent.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from p2preg.core import errors, wire
from p2preg.core.errors import LeaseLost
from tests.tracker_helpers import FakeClock, blob_meta, make_tracker
from tracker.leases import SILENCE_CHECKS, Granted, Held, LeaseBook, RateRule

D = "sha256:" + "5a" * 32
E = "sha256:" + "5b" * 32
IMAGE = "sha256:" + "11" * 32
KiB = 1024
SIZE = 64 * 1024 * KiB
TTL = 30.0
SILENCE = 2.5
RATE = RateRule(min_bytes_s=256 * KiB, window_s=30.0)


def book(clock: FakeClock, silence_s: float = SILENCE) -> LeaseBook:
    return LeaseBook(TTL, clock, rate=RATE, silence_s=silence_s)


def test_a_holder_renewing_is_kept_and_one_gone_silent_is_taken_over_once_per_window() -> None:
    clock = FakeClock()
    b = book(clock)
    first = b.acquire(D, "a", SIZE).lease
    done = 0
    for _ in range(30):  # 24 s of renewals every 0.8 s at well over the rate
        clock.now += 0.8
        done += 1024 * KiB
        b.renew(D, first.lease_id, done, SIZE, holder="a")
        assert isinstance(b.acquire(D, "b", SIZE), Held)
    clock.now += SILENCE - 0.01  # a stops: not silent yet...
    assert isinstance(b.acquire(D, "b", SIZE), Held)
    clock.now += 0.01  # ...now it is: the next asker takes the fetch over
    taken = b.acquire(D, "b", SIZE)
    assert isinstance(taken, Granted) and taken.replaced is not None
    assert taken.replaced.holder == "a" and taken.lease.holder == "b"
    with pytest.raises(LeaseLost, match=r"handed from 'a' to 'b': no renewal for 2.5 s"):
        b.renew(D, first.lease_id, done + 1, SIZE, holder="a")
    # b renews once, then goes silent as well: within the window nobody takes over again.
    clock.now += 1
    b.renew(D, taken.lease.lease_id, 1, SIZE, holder="b")
    clock.now += SILENCE * 4
    assert isinstance(b.acquire(D, "c", SIZE), Held)
    clock.now = taken.lease.mark_at + RATE.window_s
    third = b.acquire(D, "c", SIZE)
    assert isinstance(third, Granted) and third.replaced is not None
    assert third.replaced.holder == "b" and b.replacements == 2 and b.expired == 0


def test_a_grant_never_renewed_passes_on_after_the_silence_and_frees_its_images_slot() -> None:
    clock = FakeClock()
    b = book(clock)
    granted = b.acquire(D, "dead", SIZE, group=IMAGE).lease  # into a long poll nobody reads
    assert b.fetching(IMAGE) == [granted]
    clock.now += SILENCE - 0.01
    assert b.fetching(IMAGE) == [granted] and b.turned_silent() == []
    assert isinstance(b.acquire(D, "b", SIZE), Held)
    clock.now += 0.01
    assert b.fetching(IMAGE) == []  # the image's next blob may start
    assert b.turned_silent() == [granted]
    taken = b.acquire(D, "b", SIZE, group=IMAGE)
    assert isinstance(taken, Granted) and taken.replaced == granted
    assert b.fetching(IMAGE) == [taken.lease]


def test_silence_is_reported_once_and_again_only_after_the_holder_came_back() -> None:
    clock = FakeClock()
    b = book(clock)
    lease = b.acquire(D, "a", SIZE).lease
    clock.now += SILENCE
    assert b.turned_silent() == [lease]
    clock.now += 1
    assert b.turned_silent() == []
    # Nobody asked meanwhile: a paused holder that wakes keeps its lease.
    lease = b.renew(D, lease.lease_id, 10, SIZE, holder="a")
    assert not b.is_silent(lease) and b.turned_silent() == []
    assert isinstance(b.acquire(D, "b", SIZE), Held)
    clock.now += SILENCE
    assert b.turned_silent() == [lease]


def test_asking_again_is_a_sign_of_life_and_without_a_silence_only_the_ttl_counts() -> None:
    clock = FakeClock()
    b = book(clock)
    b.acquire(D, "a", SIZE)
    for _ in range(10):
        clock.now += SILENCE / 2
        assert isinstance(b.acquire(D, "a", SIZE), Granted)
        assert isinstance(b.acquire(D, "b", SIZE), Held)
    quiet = book(clock, silence_s=0.0)
    quiet.acquire(D, "a", SIZE)
    clock.now += TTL - 0.01
    assert isinstance(quiet.acquire(D, "b", SIZE), Held) and quiet.turned_silent() == []
    clock.now += 0.01
    taken = quiet.acquire(D, "b", SIZE)
    assert isinstance(taken, Granted) and taken.replaced is None  # expired, not taken over


# -- through the coordinator, its sweeper running -------------------------------------


async def test_a_long_poll_is_woken_and_handed_the_fetch_when_the_holder_goes_silent(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    t = make_tracker(tmp_path, lease_silence_s=SILENCE)
    held = await t.acquire_lease(D, wire.LeaseRequest("a", SIZE), identity="a")
    assert held.lease_id and held.silence_s == SILENCE and held.ttl_s == TTL
    await t.renew_lease(D, wire.LeaseRenew(held.lease_id, 0), identity="a")  # the ack
    got: list[tuple[float, wire.LeaseReply]] = []
    answered = trio.Event()
    last_renewal = trio.current_time()

    async def waiter() -> None:
        reply = await t.acquire_lease(D, wire.LeaseRequest("b", SIZE, wait_s=25), identity="b")
        got.append((trio.current_time(), reply))
        answered.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(t.sweep_forever)
        nursery.start_soon(waiter)
        for n in range(1, 6):  # 4 s of renewals every 0.8 s, then a dies
            await trio.sleep(0.8)
            await t.renew_lease(D, wire.LeaseRenew(held.lease_id, n * 1024 * KiB), identity="a")
            last_renewal = trio.current_time()
        await answered.wait()
        nursery.cancel_scope.cancel()
    at, reply = got[0]
    assert reply.status is wire.LeaseStatus.GRANTED and reply.replaced == "a"
    # Woken within a quarter of the silence after it began: not by the TTL, the
    # 5 s sweep or the end of the 25 s long poll.
    assert last_renewal + SILENCE <= at <= last_renewal + SILENCE + SILENCE / SILENCE_CHECKS
    assert t.leases.replacements == 1 and t.leases.expired == 0


async def test_a_queued_blob_starts_when_the_fetch_ahead_of_it_goes_silent(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # The silence alone (a grant never acknowledged passes on sooner: test_lease_grant_ack.py).
    t = make_tracker(tmp_path, lease_silence_s=SILENCE, lease_grant_ack_s=0.0)
    first = wire.LeaseRequest("dead", SIZE, group=IMAGE, order=1)
    held = await t.acquire_lease(D, first, identity="dead")
    assert held.lease_id
    start = trio.current_time()
    got: list[tuple[float, wire.LeaseReply]] = []
    answered = trio.Event()

    async def next_layer() -> None:
        msg = wire.LeaseRequest("b", SIZE, wait_s=25, group=IMAGE, order=2)
        reply = await t.acquire_lease(E, msg, identity="b")
        got.append((trio.current_time(), reply))
        answered.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(t.sweep_forever)
        nursery.start_soon(next_layer)
        await answered.wait()
        nursery.cancel_scope.cancel()
    at, reply = got[0]
    assert reply.status is wire.LeaseStatus.GRANTED and reply.replaced is None
    assert start + SILENCE <= at <= start + SILENCE + SILENCE / SILENCE_CHECKS
    # The silent lease is still there (not revoked), just no longer in the way.
    assert t.leases.current(D) is not None


async def test_a_paused_holder_that_wakes_after_the_takeover_finishes_and_files_its_torrent(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    t = make_tracker(tmp_path, lease_silence_s=SILENCE)
    meta = blob_meta(tmp_path)
    digest, size = str(meta.digest), meta.size
    paused = await t.acquire_lease(digest, wire.LeaseRequest("a", size), identity="a")
    assert paused.lease_id
    await t.renew_lease(digest, wire.LeaseRenew(paused.lease_id, 0, size), identity="a")
    await trio.sleep(SILENCE)  # a is paused (a stopped VM, a long GC)
    taken = await t.acquire_lease(digest, wire.LeaseRequest("b", size), identity="b")
    assert taken.status is wire.LeaseStatus.GRANTED and taken.replaced == "a"
    # a wakes: its renewal is refused with the reason, and it finishes its copy anyway.
    with pytest.raises(LeaseLost, match="no renewal for"):
        await t.renew_lease(digest, wire.LeaseRenew(paused.lease_id, size, size), identity="a")
    # A third node never held it: it may not define the torrent.
    with pytest.raises(errors.Forbidden, match="does not hold it"):
        await t.publish(digest, wire.PublishMetainfo("c", size, meta.data))
    # a's copy is as verified as b's will be: first to finish, it files the torrent.
    record, created = await t.publish(digest, wire.PublishMetainfo("a", size, meta.data))
    assert created and t.registry.get(digest).published_by == "a"  # type: ignore[union-attr]
    # b, finishing second, files the same deterministic torrent: nothing changes.
    assert await t.publish(digest, wire.PublishMetainfo("b", size, meta.data)) == (record, False)
