"""The per-image upstream queue: which blob of an image may be fetched from upstream next.

`UpstreamQueue` is a sans-IO state machine over an injected clock, like
leases.py's `LeaseBook`: it remembers, per image (a lease request's `group`,
the manifest digest), the requests waiting for one of the image's
`upstream_fetches_per_image` slots, when the image was first asked for and who
fetched its latest blob, and answers one question — may this request take a
lease now, or must it wait, and until when. Why a queue at all: one stream
fills the upstream link, so fetching an image's layers one by one finishes the
last of them no later than fetching all at once, and every earlier layer is
complete, and spreading, far sooner. It must not hold leases (the caller passes
the image's fetching leases in), sleep or wake anybody (the caller's `Waiters`
do), or persist anything: after a restart the queue starts empty.

The hand-off: between one fetch's last byte and the next one's first, the link
would idle (the holder's report, the next node's wake-up, its request). So a
holder whose renewals predict its last byte within `handoff_s` (its bytes left
at its rate since its lease's rate mark; once acknowledged but before it
reported a byte, at the image's last fetch rate, since a fetch shorter than a
renewal interval reports none) gives up its slot that early, to one fetch at
a time: the image then has at most one fetch beyond its slots, for about
`handoff_s`.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tracker.leases import Lease

# A request queued behind an earlier blob of its image looks again this soon
# when no fetch is running (the earlier one's requester is taking the slot).
QUEUE_RECHECK_S = 0.5
# How long an image's first upstream fetch waits for the requests of its earlier
# layers (the config is place 0, the first layer 1: those never wait).
GATHER_S = 0.25
# Images remembered (the least recently asked go first).
MAX_IMAGES_REMEMBERED = 10_000
# A renewal wakes the image's next blob (`next_up`) when the hand-off it
# predicts falls within this many of the holder's renewal intervals (the next
# renewal comes too late).
HANDOFF_HORIZON_RENEWALS = 1.5
# A fetch's rate counts for the image's next predictions only over at least this
# long (and `handoff_s`): renewals the tracker ran late can make a short span
# shorter still, and its rate many times too high.
MIN_RATE_SPAN_S = 0.2


def handoff_at(lease: Lease, handoff_s: float, rate: float | None = None) -> float | None:
    """When the image's next fetch may start beside `lease`'s: `handoff_s` before
    the last byte its renewals predict, at its rate since the lease's rate mark
    (its grant, in a fetch shorter than a rate window); an acknowledged lease
    that has reported no byte yet, at `rate` (bytes/s: the image's last fetch's)
    from its last renewal. None: no prediction (no size, no progress since the
    mark and no `rate` to use) or no hand-off (`handoff_s` 0).
    """
    if handoff_s <= 0 or lease.size is None or lease.fetched:
        return None
    left = lease.size - lease.bytes_done
    done, span = lease.bytes_done - lease.mark_bytes, lease.renewed_at - lease.mark_at
    if done > 0 and span > 0:
        return lease.renewed_at + left * span / done - handoff_s
    if rate and lease.acked and lease.bytes_done == 0:
        return lease.renewed_at + left / rate - handoff_s
    return None


@dataclass(frozen=True, slots=True, order=True)
class Place:
    """One lease request's place in its image: `order` is the blob's place in the manifest."""

    order: int
    digest: str
    node: str


@dataclass(frozen=True, slots=True)
class Queued:
    """Wait; look again at `wake_at` (or when woken). `ahead` is the fetch in the way, if any."""

    wake_at: float
    ahead: Lease | None


@dataclass(slots=True)
class _Image:
    first_seen: float
    # The node granted the image's latest fetch.
    last_holder: str | None = None
    # Bytes/s of the image's latest fetch to report its last byte (from the rate
    # mark before that report): a fetch that has reported no byte yet is
    # predicted with it.
    rate: float | None = None


class UpstreamQueue:
    def __init__(
        self,
        fetches_per_image: int,
        clock: Callable[[], float],
        *,
        max_images: int = MAX_IMAGES_REMEMBERED,
        handoff_s: float = 0.0,
    ) -> None:
        self.fetches_per_image = fetches_per_image
        self.handoff_s = handoff_s
        self._clock = clock
        self._max_images = max_images
        # Per image: the places waiting for a slot, counted (one node may ask twice),
        # and the same counted per blob, (order, digest): `check` reads only the
        # latter, so it costs the image's blob count, not its waiting requests
        # (10,000 nodes queue 90,000 places behind a 10-layer image's first fetch).
        self._queued: dict[str, Counter[Place]] = {}
        self._blobs: dict[str, Counter[tuple[int, str]]] = {}
        self._images: OrderedDict[str, _Image] = OrderedDict()

    def check(self, group: str, place: Place, fetching: Sequence[Lease]) -> Queued | None:
        """None when `place` may take its lease now; else how long to wait.

        `fetching` are the image's live leases whose holders are still fetching
        from upstream at the minimum rate (a slow one gives its slot up). The
        caller asks only for a digest nobody holds a lease on (a held lease
        decides by itself who fetches).
        """
        if self.fetches_per_image == 0:
            return None
        now = self._clock()
        image = self._image(group)
        blobs = self._blobs.get(group) or Counter()
        blob = (place.order, place.digest)
        earlier = bool(blobs) and min(blobs) < blob
        # A client asks for all the layers at once, in no set order: before the
        # image's first fetch, give its earlier layers' requests a moment to arrive.
        gather_until = image.first_seen + GATHER_S
        gathering = image.last_holder is None and place.order > 1 and now < gather_until
        # The node that fetched the image's last blob is seeding it now: its
        # uplink is full, which slows the ACKs of a download. Another node
        # waiting for the same blob takes it instead.
        own = self._queued.get(group, Counter())[place]
        busy = image.last_holder == place.node and blobs[blob] > own
        handoff = self._handoff(fetching, image.rate)
        taken = len(fetching) - (handoff is not None and handoff[0] <= now)
        if taken < self.fetches_per_image and not (earlier or gathering or busy):
            return None
        if not fetching:
            # A slot is free and another request is about to take it.
            return Queued(gather_until if gathering else now + QUEUE_RECHECK_S, None)
        first = min(fetching, key=lambda lease: lease.expires_at)
        if handoff is not None and now < handoff[0] < first.expires_at:
            return Queued(handoff[0], handoff[1])
        return Queued(first.expires_at, first)

    def _handoff(
        self, fetching: Sequence[Lease], rate: float | None
    ) -> tuple[float, Lease] | None:
        """The earliest hand-off among the image's fetches, while none is out: with
        more fetches than slots, one already started early."""
        if len(fetching) != self.fetches_per_image:
            return None
        ends = [(at, lease) for lease in fetching
                if (at := handoff_at(lease, self.handoff_s, rate)) is not None]  # fmt: skip
        return min(ends, key=lambda end: end[0]) if ends else None

    def renewed(self, before: Lease | None, lease: Lease) -> bool:
        """A holder renewed `before` into `lease`: once it reports its last byte, its
        rate is the image's for the next predictions. Whether the renewal should
        wake the image's next blob (`next_up`): its fetch ended or fell below the
        rate (the slot is free), it acknowledged its grant (a hand-off can be
        predicted from then), or the hand-off it now predicts comes before its
        next renewal would tell (queued requests slept on an older prediction, or
        on the expiry)."""
        if before is None or before.fetched or before.slow:
            return False
        image = None if lease.group is None else self._images.get(lease.group)
        if lease.fetched and image is not None:
            # From `before`'s mark: this renewal may have started a new window.
            done, span = lease.bytes_done - before.mark_bytes, lease.renewed_at - before.mark_at
            if done > 0 and span >= max(self.handoff_s, MIN_RATE_SPAN_S):
                image.rate = done / span
        if lease.fetched or lease.slow:
            return True
        if not before.acked and image is not None and image.rate and self.handoff_s > 0:
            # The acknowledgement: its end can be predicted at the image's rate
            # from now, and the next blob slept on the expiry (it looked while
            # the grant was unacknowledged).
            return True
        # (Without the image's rate: a renewal that reports no byte only puts the
        # prediction later, and the queue already sleeps until the earlier one.)
        at = handoff_at(lease, self.handoff_s)
        interval = lease.renewed_at - before.renewed_at
        return at is not None and at <= lease.renewed_at + HANDOFF_HORIZON_RENEWALS * interval

    def enter(self, group: str, place: Place) -> None:
        """`place` waits for a slot from now until it is answered, wake-ups included,
        so that a later blob cannot take a freed slot from an earlier one woken with it."""
        self._queued.setdefault(group, Counter())[place] += 1
        self._blobs.setdefault(group, Counter())[place.order, place.digest] += 1

    def leave(self, group: str, place: Place) -> bool:
        """`place` is answered, or no longer waits for a slot. True when that took
        the image's earliest blob out of the queue: the blob next in line slept on
        the fetch ahead of the one that left, and must look again (`next_up`)."""
        queue = self._queued.get(group)
        if queue is None or place not in queue:
            return False
        queue[place] -= 1
        if queue[place] <= 0:
            del queue[place]
        blobs = self._blobs[group]
        blob = (place.order, place.digest)
        first = blob == min(blobs)
        blobs[blob] -= 1
        if blobs[blob] <= 0:
            del blobs[blob]
        else:
            first = False
        if not queue:
            del self._queued[group]
            del self._blobs[group]
        return first and bool(queue)

    def granted(self, group: str, node: str) -> None:
        """`node` got a lease on one of `group`'s blobs."""
        self._image(group).last_holder = node

    def next_up(self, group: str | None) -> list[str]:
        """The digests to wake when a slot of `group` frees: its earliest blobs
        waiting, as many as it has slots (`check` grants only the earliest; the
        others are sent back to wait). Wake only these: at 10,000 nodes the
        requests queued for later blobs are tens of thousands, each woken to be
        sent back. Those sleep on the fetch ahead until they are next (`leave`)."""
        blobs = self._blobs.get(group) if group is not None else None
        return [digest for _, digest in sorted(blobs or ())[: self.fetches_per_image]]

    def queued(self) -> dict[str, int]:
        """Per image, the lease requests waiting for one of its slots (the cluster page)."""
        return {group: queue.total() for group, queue in self._queued.items()}

    def _image(self, group: str) -> _Image:
        image = self._images.get(group)
        if image is None:
            image = self._images[group] = _Image(self._clock())
            while len(self._images) > self._max_images:
                self._images.popitem(last=False)
        self._images.move_to_end(group)
        return image
