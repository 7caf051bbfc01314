"""The hand-off between an image's upstream fetches (tracker/upstream_queue.py, `handoff_s`).

A holder whose renewals (before its first byte, the image's last fetch rate) put
its last byte within `handoff_s` gives its slot to the image's next fetch, one at a
time. First the rule alone, over a hand-stepped clock and plain `Lease`
values; then through the service (coordinator.py) on trio's MockClock, with
renewals waking the queue.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import trio
import trio.testing

from p2preg.core import wire
from p2preg.core.config import ConfigError
from tests.tracker_helpers import make_tracker
from tracker.leases import Lease
from tracker.upstream_queue import Place, Queued, UpstreamQueue, handoff_at

IMAGE = "sha256:" + "11" * 32
LAYERS = ["sha256:" + f"{n:02x}" * 32 for n in range(1, 5)]
T0 = 1000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def lease(
    digest: str, holder: str, done: int, renewed_at: float, *, size: int | None = 100
) -> Lease:
    """Granted at T0 (its rate mark), renewed at `renewed_at` with `done` bytes."""
    return Lease(
        digest, f"id-{holder}", holder, renewed_at + 30, done, size, IMAGE,
        mark_at=T0, mark_bytes=0, renewed_at=renewed_at,
    )  # fmt: skip


def test_the_handoff_is_predicted_from_the_rate_since_the_mark() -> None:
    # 50 of 100 bytes in 2 s: the last byte at T0 + 4, the hand-off 0.3 s before.
    assert handoff_at(lease(LAYERS[0], "a", 50, T0 + 2), 0.3) == pytest.approx(T0 + 3.7)
    # No prediction: no progress since the mark, no size, fetched, or the rule off.
    assert handoff_at(lease(LAYERS[0], "a", 0, T0 + 2), 0.3) is None
    assert handoff_at(lease(LAYERS[0], "a", 50, T0 + 2, size=None), 0.3) is None
    assert handoff_at(lease(LAYERS[0], "a", 100, T0 + 2), 0.3) is None
    assert handoff_at(lease(LAYERS[0], "a", 50, T0 + 2), 0.0) is None


def test_before_its_first_byte_a_fetch_is_predicted_at_the_images_last_rate() -> None:
    # Acknowledged, no byte yet: 100 bytes at 50 B/s from the last renewal.
    fresh = lease(LAYERS[0], "a", 0, T0 + 2)
    assert handoff_at(fresh, 0.3, 50.0) == pytest.approx(T0 + 3.7)
    # Its own progress, once reported, counts over the image's rate.
    assert handoff_at(lease(LAYERS[0], "a", 50, T0 + 2), 0.3, 1e6) == pytest.approx(T0 + 3.7)
    # Not before its holder acknowledged the grant, nor once it reported bytes
    # (a new rate window with nothing in it yet is its own business).
    assert handoff_at(replace(fresh, acked=False), 0.3, 50.0) is None
    new_window = replace(lease(LAYERS[0], "a", 50, T0 + 2), mark_at=T0 + 2, mark_bytes=50)
    assert handoff_at(new_window, 0.3, 50.0) is None


def queue_after(before: Lease, fetched: Lease) -> tuple[Clock, UpstreamQueue, Lease]:
    """A queue whose image's first fetch was renewed from `before` to `fetched`, and
    the next fetch, B, granted then (acknowledged, no byte yet)."""
    clock = Clock()
    queue = UpstreamQueue(1, clock, handoff_s=0.3)
    queue.granted(IMAGE, "a")
    assert queue.renewed(before, fetched)
    clock.now = fetched.renewed_at
    queue.granted(IMAGE, "b")
    return clock, queue, lease(LAYERS[1], "b", 0, fetched.renewed_at)


def test_the_images_rate_is_its_last_fetchs_to_its_last_byte() -> None:
    third = Place(3, LAYERS[2], "c")
    # 100 bytes in 0.5 s: 200 B/s, so B's 100 bytes are due 0.5 s after its
    # grant, and C goes 0.3 s before that.
    a_done = lease(LAYERS[0], "a", 100, T0 + 0.5)
    clock, queue, b = queue_after(lease(LAYERS[0], "a", 0, T0), a_done)
    assert queue.check(IMAGE, third, [b]) == Queued(pytest.approx(T0 + 0.7), b)
    clock.now = T0 + 0.7
    assert queue.check(IMAGE, third, [b]) is None
    # A renewal from B with no byte moves nothing and wakes nobody.
    assert not queue.renewed(b, replace(b, renewed_at=T0 + 0.6, expires_at=T0 + 30.6))
    # The last byte's renewal opened a new rate window: measured from the one before.
    reset = replace(lease(LAYERS[0], "a", 100, T0 + 2), mark_at=T0 + 2, mark_bytes=100)
    _, queue, b = queue_after(lease(LAYERS[0], "a", 50, T0 + 1), reset)
    assert queue.check(IMAGE, third, [b]) == Queued(pytest.approx(T0 + 3.7), b)
    # Over a span too short to tell (renewals the tracker ran late), no rate.
    _, queue, b = queue_after(lease(LAYERS[0], "a", 0, T0), lease(LAYERS[0], "a", 100, T0 + 0.1))
    assert queue.check(IMAGE, third, [b]) == Queued(b.expires_at, b)


def test_the_next_fetch_starts_at_the_handoff_and_only_one_starts_early() -> None:
    clock = Clock()
    queue = UpstreamQueue(1, clock, handoff_s=0.3)
    queue.granted(IMAGE, "a")  # not the image's first fetch: no gathering
    clock.now = T0 + 2
    a = lease(LAYERS[0], "a", 50, T0 + 2)
    second = Place(2, LAYERS[1], "b")
    assert queue.check(IMAGE, second, [a]) == Queued(pytest.approx(T0 + 3.7), a)
    clock.now = T0 + 3.7
    assert queue.check(IMAGE, second, [a]) is None
    queue.granted(IMAGE, "b")
    # The early fetch has no progress yet; even once both are within their last
    # bytes, the image's third fetch waits for a slot to free for real.
    b = Lease(LAYERS[1], "id-b", "b", T0 + 33.7, 0, 100, IMAGE, T0 + 3.7, 0, renewed_at=T0 + 3.7)
    third = Place(3, LAYERS[2], "c")
    waiting = queue.check(IMAGE, third, [a, b])
    assert waiting == Queued(a.expires_at, a)
    clock.now = T0 + 4.9
    b = Lease(LAYERS[1], "id-b", "b", T0 + 34.9, 99, 100, IMAGE, T0 + 3.7, 0, renewed_at=T0 + 4.9)
    assert isinstance(queue.check(IMAGE, third, [a, b]), Queued)
    # A has reported its last byte: B alone holds the slot, and hands it off.
    assert queue.check(IMAGE, third, [b]) is None


def test_an_earlier_blob_waiting_takes_the_handoff_before_a_later_one() -> None:
    clock = Clock()
    queue = UpstreamQueue(1, clock, handoff_s=0.3)
    queue.granted(IMAGE, "a")
    earlier, later = Place(2, LAYERS[1], "b"), Place(3, LAYERS[2], "c")
    queue.enter(IMAGE, earlier)
    queue.enter(IMAGE, later)
    clock.now = T0 + 3.8
    a = lease(LAYERS[0], "a", 50, T0 + 2)
    assert isinstance(queue.check(IMAGE, later, [a]), Queued)
    assert queue.check(IMAGE, earlier, [a]) is None


def test_without_a_handoff_the_slot_frees_only_at_the_last_byte() -> None:
    clock = Clock()
    queue = UpstreamQueue(1, clock)
    queue.granted(IMAGE, "a")
    clock.now = T0 + 3.99
    a = lease(LAYERS[0], "a", 99, T0 + 3.96)
    assert queue.check(IMAGE, Place(2, LAYERS[1], "b"), [a]) == Queued(a.expires_at, a)


def test_a_renewal_wakes_the_queue_when_the_slot_frees_or_the_handoff_is_near() -> None:
    queue = UpstreamQueue(1, Clock(), handoff_s=0.3)
    granted = lease(LAYERS[0], "a", 0, T0)
    # Renewals 1 s apart: a hand-off 2.7 s ahead is left to the next renewal;
    # one within 1.5 intervals wakes the queue now.
    assert not queue.renewed(granted, lease(LAYERS[0], "a", 25, T0 + 1))
    near = lease(LAYERS[0], "a", 80, T0 + 2)  # the last byte due at T0 + 2.5
    assert queue.renewed(lease(LAYERS[0], "a", 25, T0 + 1), near)
    assert queue.renewed(granted, lease(LAYERS[0], "a", 100, T0 + 1))  # fetched
    done = lease(LAYERS[0], "a", 100, T0 + 4)
    assert not queue.renewed(done, done)  # its slot was freed before
    assert not queue.renewed(None, granted)
    off = UpstreamQueue(1, Clock())
    assert not off.renewed(lease(LAYERS[0], "a", 25, T0 + 1), near)


class Service:
    """The coordinator on trio's MockClock (hand-off 0.3 s), with `a` granted the
    image's first layer at `start`; `ask` waits for another layer's lease."""

    def __init__(self, tmp_path: Path) -> None:
        self.t = make_tracker(tmp_path, lease_ttl_s=10.0, lease_silence_s=0.0,
                              lease_grant_ack_s=0.0, upstream_handoff_s=0.3)  # fmt: skip
        self.start = trio.current_time()
        self.got: dict[str, tuple[float, wire.LeaseReply]] = {}

    async def grant_first(self) -> str:
        a = await self.t.acquire_lease(LAYERS[0], wire.LeaseRequest("a", 100, 0, IMAGE, 1))
        assert a.status is wire.LeaseStatus.GRANTED and a.lease_id
        return a.lease_id

    async def ask(self, node: str, n: int) -> None:
        msg = wire.LeaseRequest(node, 100, 25, IMAGE, n + 1)
        reply = await self.t.acquire_lease(LAYERS[n], msg)
        self.got[node] = (trio.current_time() - self.start, reply)

    async def renew(self, n: int, lease_id: str, done: int) -> None:
        await self.t.renew_lease(LAYERS[n], wire.LeaseRenew(lease_id, done, 100))

    def granted(self, node: str) -> tuple[float, str]:
        """When `node` was granted its lease, and the lease."""
        at, reply = self.got[node]
        assert reply.status is wire.LeaseStatus.GRANTED and reply.lease_id
        return at, reply.lease_id


async def test_through_the_service_a_renewal_near_the_end_starts_the_next_fetch(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    s = Service(tmp_path)
    a = await s.grant_first()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(s.ask, "b", 1)
        await trio.sleep(1)
        await s.renew(0, a, 25)
        await trio.sleep(1)
        assert not s.got
        # The last byte due at 2.5 s: B is granted at 2.2 s, while A still fetches.
        await s.renew(0, a, 80)
        await trio.sleep(0.5)
        at, b = s.granted("b")
        assert at == pytest.approx(2.2)
        # A third fetch waits while both are upstream, and through A's last byte
        # (B has reported nothing yet, and A's rate puts B's end at 4.9 s) ...
        nursery.start_soon(s.ask, "c", 2)
        await trio.sleep(0.2)
        await s.renew(0, a, 100)
        await trio.sleep(0.9)
        assert "c" not in s.got
        # ... until B's renewal puts its own last byte within the hand-off.
        await s.renew(1, b, 99)
    assert s.granted("c")[0] == pytest.approx(3.6)
    # Both were granted beside a fetch in its last bytes.
    handoffs = s.t.metrics.registry.get_sample_value("p2preg_tracker_upstream_handoffs_total")
    assert handoffs == 2


async def test_through_the_service_a_fetch_too_short_to_renew_is_handed_off_at_the_last_rate(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # A fetch shorter than a renewal interval reports nothing before its last byte:
    # the image's previous fetch says when that will be.
    s = Service(tmp_path)
    a = await s.grant_first()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(s.ask, "b", 1)
        await trio.sleep(1)
        # A's 100 bytes in 1 s: B takes the slot at once, and C queues behind it.
        await s.renew(0, a, 100)
        await trio.sleep(0.01)
        assert s.granted("b")[0] == pytest.approx(1.0)
        nursery.start_soon(s.ask, "c", 2)
    # B reports nothing; at A's 100 B/s its last byte is due at 2.0 s.
    assert s.granted("c")[0] == pytest.approx(1.7)


async def test_a_freed_slot_wakes_only_the_next_blobs_requests(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # At 10,000 nodes the requests queued for an image's later blobs are tens of
    # thousands: waking them when a slot frees only sends them back to wait.
    s = Service(tmp_path)
    woken: list[str] = []
    notify = s.t.desk._waiters.notify

    def spy(digest: str) -> None:
        woken.append(digest)
        notify(digest)

    s.t.desk._waiters.notify = spy  # type: ignore[method-assign]
    a = await s.grant_first()
    async with trio.open_nursery() as nursery:
        for node, n in (("d", 3), ("c", 2), ("b", 1)):
            nursery.start_soon(s.ask, node, n)
        await trio.sleep(1)
        await s.renew(0, a, 100)  # A's last byte: its slot frees
        await trio.sleep(0.01)
        assert s.granted("b")[0] == pytest.approx(1.0)
        # B's blob took the slot; C's, first in line now, looked once to sleep
        # on B's fetch (no longer on A's); D's slept through both.
        assert woken == [LAYERS[1], LAYERS[2]]
        woken.clear()
        await s.renew(1, s.granted("b")[1], 100)
        await trio.sleep(0.01)
        assert s.granted("c")[0] == pytest.approx(1.01)
        assert woken == [LAYERS[2], LAYERS[3]]
        await s.renew(2, s.granted("c")[1], 100)
    assert s.granted("d")[0] == pytest.approx(1.02)


def test_the_handoff_must_not_be_negative_nor_past_the_ttl(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="upstream_handoff_s"):
        make_tracker(tmp_path, upstream_handoff_s=-1.0)
    with pytest.raises(ConfigError, match="upstream_handoff_s"):
        make_tracker(tmp_path, lease_ttl_s=10.0, upstream_handoff_s=11.0)
