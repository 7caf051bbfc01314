"""The per-image upstream queue (tracker/upstream_queue.py), driven directly: no trio, no service.

A hand-stepped clock and plain `Lease` values stand in for the lease book, the
way a cluster simulation drives it.
"""

from __future__ import annotations

from tracker.leases import Lease
from tracker.upstream_queue import GATHER_S, QUEUE_RECHECK_S, Place, Queued, UpstreamQueue

IMAGE = "sha256:" + "11" * 32
OTHER_IMAGE = "sha256:" + "22" * 32
LAYERS = ["sha256:" + f"{n:02x}" * 32 for n in range(1, 5)]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fetching(digest: str, holder: str, expires_at: float) -> Lease:
    return Lease(digest, f"id-{holder}", holder, expires_at, 10, 100, IMAGE)


def test_no_limit_never_queues() -> None:
    queue = UpstreamQueue(0, Clock())
    busy = [fetching(LAYERS[0], "a", 2000.0)] * 5
    assert queue.check(IMAGE, Place(3, LAYERS[2], "b"), busy) is None


def test_the_first_fetch_of_an_image_waits_a_moment_for_its_earlier_layers() -> None:
    clock = Clock()
    queue = UpstreamQueue(1, clock)
    # Place 3 asks first: it waits until GATHER_S after the image was first seen.
    later = Place(3, LAYERS[2], "c")
    assert queue.check(IMAGE, later, []) == Queued(1000.0 + GATHER_S, None)
    queue.enter(IMAGE, later)
    # Place 1 (and 0) never waits, and it goes first.
    assert queue.check(IMAGE, Place(1, LAYERS[0], "a"), []) is None
    queue.granted(IMAGE, "a")
    # Once a fetch has been granted the gathering is over: a free slot goes
    # to the earliest place waiting, and later ones see the fetch ahead.
    ahead = fetching(LAYERS[0], "a", 1030.0)
    assert queue.check(IMAGE, later, [ahead]) == Queued(1030.0, ahead)
    assert queue.check(IMAGE, later, []) is None


def test_an_earlier_place_waiting_goes_before_a_later_one() -> None:
    clock = Clock()
    queue = UpstreamQueue(1, clock)
    queue.granted(IMAGE, "x")  # not the image's first fetch: no gathering
    earlier = Place(2, LAYERS[1], "b")
    queue.enter(IMAGE, earlier)
    clock.now += 1
    assert queue.check(IMAGE, Place(3, LAYERS[2], "c"), []) == Queued(
        clock.now + QUEUE_RECHECK_S, None
    )
    assert queue.check(IMAGE, earlier, []) is None
    # Another image is not held back by this one's queue (its place 1 need not gather).
    assert queue.check(OTHER_IMAGE, Place(1, LAYERS[2], "c"), []) is None


def test_the_last_holder_yields_the_same_blob_to_another_waiting_node() -> None:
    queue = UpstreamQueue(1, Clock())
    queue.granted(IMAGE, "a")
    queue.enter(IMAGE, Place(2, LAYERS[1], "b"))
    assert isinstance(queue.check(IMAGE, Place(2, LAYERS[1], "a"), []), Queued)
    assert queue.check(IMAGE, Place(2, LAYERS[1], "b"), []) is None


def test_slots_per_image() -> None:
    queue = UpstreamQueue(2, Clock())
    queue.granted(IMAGE, "x")
    one = [fetching(LAYERS[0], "a", 1010.0)]
    two = [*one, fetching(LAYERS[1], "b", 1005.0)]
    assert queue.check(IMAGE, Place(3, LAYERS[2], "c"), one) is None
    # Both slots taken: wait for the fetch that runs out first.
    assert queue.check(IMAGE, Place(3, LAYERS[2], "c"), two) == Queued(1005.0, two[1])


def test_a_freed_slot_wakes_the_earliest_blobs_waiting_each_until_it_leaves() -> None:
    queue = UpstreamQueue(1, Clock())
    place = Place(3, LAYERS[2], "c")
    queue.enter(IMAGE, place)
    queue.enter(IMAGE, place)  # the same node asking on two connections
    queue.enter(IMAGE, Place(4, LAYERS[3], "d"))
    assert queue.next_up(IMAGE) == [LAYERS[2]]
    # An earlier blob that queues later goes first; the later ones are not woken.
    queue.enter(IMAGE, Place(2, LAYERS[1], "b"))
    assert queue.next_up(IMAGE) == [LAYERS[1]]
    # Leaving says when the blob next in line moved up (it must look again).
    assert queue.leave(IMAGE, Place(2, LAYERS[1], "b"))
    assert not queue.leave(IMAGE, place)
    assert queue.next_up(IMAGE) == [LAYERS[2]]  # one of its two requests still waits
    assert not queue.leave(IMAGE, Place(4, LAYERS[3], "d"))  # not the first in line
    queue.enter(IMAGE, Place(4, LAYERS[3], "d"))
    assert queue.leave(IMAGE, place)
    assert not queue.leave(IMAGE, place)  # leaving twice is harmless
    assert queue.next_up(IMAGE) == [LAYERS[3]]
    assert not queue.leave(IMAGE, Place(4, LAYERS[3], "d"))  # nobody left to move up
    assert queue.next_up(IMAGE) == [] and queue.next_up(None) == []
    # With two slots an image's two earliest blobs may take them.
    two = UpstreamQueue(2, Clock())
    for n in (3, 1, 2):
        two.enter(IMAGE, Place(n + 1, LAYERS[n], "x"))
    assert two.next_up(IMAGE) == [LAYERS[1], LAYERS[2]]


def test_images_beyond_the_limit_are_forgotten_least_recent_first() -> None:
    clock = Clock()
    queue = UpstreamQueue(1, clock, max_images=1)
    queue.check(IMAGE, Place(1, LAYERS[0], "a"), [])
    clock.now += 10  # well past the gathering
    queue.check(OTHER_IMAGE, Place(1, LAYERS[0], "a"), [])
    # IMAGE was forgotten: seen again now, so its place 2 gathers again.
    assert queue.check(IMAGE, Place(2, LAYERS[1], "b"), []) == Queued(clock.now + GATHER_S, None)
