"""The hand-off between an image's upstream fetches (tracker/upstream_queue.py, `handoff_s`).

A holder whose renewals put its last byte within `handoff_s` gives its slot to
the image's next fetch, one at a time. First the rule alone, over a
hand-stepped clock and plain `Lease` values; then through the service
(coordinator.py) on trio's MockClock, with renewals waking the queue.
"""

from __future__ import annotations

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
    assert not queue.wake_on_renewal(granted, lease(LAYERS[0], "a", 25, T0 + 1))
    near = lease(LAYERS[0], "a", 80, T0 + 2)  # the last byte due at T0 + 2.5
    assert queue.wake_on_renewal(lease(LAYERS[0], "a", 25, T0 + 1), near)
    assert queue.wake_on_renewal(granted, lease(LAYERS[0], "a", 100, T0 + 1))  # fetched
    done = lease(LAYERS[0], "a", 100, T0 + 4)
    assert not queue.wake_on_renewal(done, done)  # its slot was freed before
    assert not queue.wake_on_renewal(None, granted)
    off = UpstreamQueue(1, Clock())
    assert not off.wake_on_renewal(lease(LAYERS[0], "a", 25, T0 + 1), near)


async def test_through_the_service_a_renewal_near_the_end_starts_the_next_fetch(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    t = make_tracker(tmp_path, lease_ttl_s=10.0, lease_silence_s=0.0, lease_grant_ack_s=0.0,
                     upstream_handoff_s=0.3)
    start = trio.current_time()
    a = await t.acquire_lease(LAYERS[0], wire.LeaseRequest("a", 100, 0, IMAGE, 1))
    assert a.status is wire.LeaseStatus.GRANTED and a.lease_id
    got: dict[str, tuple[float, wire.LeaseReply]] = {}

    async def ask(node: str, n: int) -> None:
        reply = await t.acquire_lease(LAYERS[n], wire.LeaseRequest(node, 100, 25, IMAGE, n + 1))
        got[node] = (trio.current_time() - start, reply)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask, "b", 1)
        await trio.sleep(1)
        await t.renew_lease(LAYERS[0], wire.LeaseRenew(a.lease_id, 25, 100))
        await trio.sleep(1)
        assert not got
        # The last byte due at 2.5 s: B is granted at 2.2 s, while A still fetches.
        await t.renew_lease(LAYERS[0], wire.LeaseRenew(a.lease_id, 80, 100))
        await trio.sleep(0.5)
        at, b = got["b"]
        assert b.status is wire.LeaseStatus.GRANTED and b.lease_id
        assert at == pytest.approx(2.2)
        # A third fetch waits while both are upstream, and through A's last byte
        # (B has reported nothing yet) ...
        nursery.start_soon(ask, "c", 2)
        await trio.sleep(0.2)
        await t.renew_lease(LAYERS[0], wire.LeaseRenew(a.lease_id, 100, 100))
        await trio.sleep(0.9)
        assert "c" not in got
        # ... until B's renewal puts its own last byte within the hand-off.
        await t.renew_lease(LAYERS[1], wire.LeaseRenew(b.lease_id, 99, 100))
    at, c = got["c"]
    assert c.status is wire.LeaseStatus.GRANTED
    assert at == pytest.approx(3.6)
    # Both were granted beside a fetch in its last bytes.
    handoffs = t.metrics.registry.get_sample_value("p2preg_tracker_upstream_handoffs_total")
    assert handoffs == 2


def test_the_handoff_must_not_be_negative_nor_past_the_ttl(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="upstream_handoff_s"):
        make_tracker(tmp_path, upstream_handoff_s=-1.0)
    with pytest.raises(ConfigError, match="upstream_handoff_s"):
        make_tracker(tmp_path, lease_ttl_s=10.0, upstream_handoff_s=11.0)
