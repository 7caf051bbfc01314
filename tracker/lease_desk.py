"""The tracker's lease desk: lease requests, renewals and releases, decided and committed.

`LeaseDesk` answers a lease request from the parts the coordinator hands it:
SEEDED when the swarm has a seeder the asker has not reported for stalling it
(or, for a manifest, when the shelf has its body); VERIFY, a fresh lease, when
the digest's torrent or chunk torrents are disputed and the asker is neither
side (a side waits for a node that can verify); else the `LeaseBook`'s grant or
WAIT, behind the image's `UpstreamQueue`. A request told to wait is held on the
`Waiters` until something changes or its `wait_s` ends. Each try decides on
memory synchronously, then awaits the store's commit of a grant: a new lease
that is not durable is not granted. The desk also renews and releases leases,
drops the leases the publishing side ends, expires them in the sweep, restores
them from a snapshot, and wakes the waiters of silent holders. The rules are
the parts' (leases.py, lease_rules.py, upstream_queue.py, disputes.py,
admission.py): it must hold no policy of its own, know nothing of sockets,
HTTP or encodings, and raise only `p2preg.core.errors`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import NamedTuple

import trio

from p2preg.core import errors, wire
from tracker import lease_replies as replies
from tracker.admission import Admission
from tracker.chunks import ChunkDispute
from tracker.config import TrackerConfig
from tracker.disputes import Quarantines
from tracker.images import ImageIndex
from tracker.leases import Granted, Lease, LeaseBook
from tracker.manifest_shelf import ManifestShelf
from tracker.metrics import TrackerMetrics
from tracker.peers import PeerTable
from tracker.registry import MetainfoRegistry
from tracker.state import StoredLease, TrackerStore
from tracker.swarms import checked_digest
from tracker.upstream_queue import Place, UpstreamQueue
from tracker.waiters import Waiters

log = logging.getLogger("p2preg.tracker")


class _Attempt(NamedTuple):
    """One try at a lease: the reply, and when to try again if it says wait."""

    reply: wire.LeaseReply
    wake_at: float | None
    # Waiting for the image's upstream slot, not for this digest's own lease.
    queued: bool = False
    # A lease granted in memory that the store has yet to commit, and whether
    # it is new (not its holder asking again).
    granted: Lease | None = None
    fresh: bool = False


class LeaseDesk:
    def __init__(
        self,
        config: TrackerConfig,
        store: TrackerStore,
        metrics: TrackerMetrics,
        *,
        leases: LeaseBook,
        queue: UpstreamQueue,
        waiters: Waiters,
        images: ImageIndex,
        registry: MetainfoRegistry,
        chunk_dispute: Callable[[str], ChunkDispute | None],
        manifests: ManifestShelf,
        peers: PeerTable,
        admission: Admission,
        quarantines: Quarantines,
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.leases = leases
        self.queue = queue
        self.images = images
        self.registry = registry
        self.manifests = manifests
        self.peers = peers
        self.quarantines = quarantines
        self._store = store
        self._waiters = waiters
        self._chunk_dispute = chunk_dispute
        self._admission = admission
        self._clock = clock
        self._wall = wall_clock

    async def acquire(
        self, digest_text: str, msg: wire.LeaseRequest, *, identity: str | None = None
    ) -> wire.LeaseReply:
        """Grant, refuse (wait) or point at the swarm; long-polls up to `msg.wait_s`.

        `identity` is the caller's (`Call.identity`); None: the node `msg` names.
        """
        digest = checked_digest(digest_text)
        who = identity if identity is not None else msg.node
        wait_s = min(max(0.0, msg.wait_s), self.config.lease_wait_max_s)
        deadline = self._clock() + wait_s
        place = Place(msg.order, digest, who)
        if msg.group is not None:
            self.images.note(msg.group, digest, msg.order)
        queued = False
        try:
            while True:
                attempt = self._try_acquire(digest, msg, place)
                if attempt.granted is not None:
                    await self._commit_grant(attempt.granted, attempt.fresh)
                if attempt.wake_at is None or self._clock() >= deadline:
                    return attempt.reply
                if attempt.queued != queued and msg.group is not None:
                    queued = attempt.queued
                    if queued:
                        self.queue.enter(msg.group, place)
                    else:
                        self._leave_queue(msg.group, place)
                # Wake when something changes, or when the lease in the way runs out.
                await self._waiters.wait(digest, min(deadline, attempt.wake_at))
        finally:
            if queued and msg.group is not None:
                self._leave_queue(msg.group, place)

    def _seeded_for(self, digest: str, node: str) -> bool:
        """Whether the swarm has a seeder `node` has not reported for stalling it: a
        node whose every seeder stalled it is let fetch, or wait for who does."""
        admission = self._admission
        return any(not admission.reported(digest, seeder, node)
                   for seeder in self.peers.seeder_identities(digest))  # fmt: skip

    def _try_acquire(self, digest: str, msg: wire.LeaseRequest, place: Place) -> _Attempt:
        """Decide one try on memory alone; a grant is committed by the caller."""
        entry, dispute = self.registry.get(digest), self.registry.dispute(digest)
        disputed = dispute or self._chunk_dispute(digest)  # chunk disputes settle alike
        if msg.manifest:  # its body comes from the shelf; torrents play no part
            if digest in self.manifests:
                return _Attempt(wire.LeaseReply(wire.LeaseStatus.SEEDED, digest=digest), None)
            entry = disputed = None
        if entry is not None and disputed is None:
            self.peers.expire_swarm(digest, self._clock())
            if self._seeded_for(digest, place.node):
                reply = wire.LeaseReply(wire.LeaseStatus.SEEDED, metainfo=entry.meta.data)
                return _Attempt(reply, None)
        self.quarantines.check(place.node, "take an upstream lease")
        held = self._lease_holder(digest) is not None
        if disputed is not None and disputed.party(place.node) and not held:
            # Neither side's fetch settles it: wait for a node that can verify.
            ttl = self.leases.ttl_s
            reply = wire.LeaseReply(wire.LeaseStatus.WAIT, ttl_s=ttl, retry_after_s=ttl)
            return _Attempt(reply, self._clock() + ttl)
        handoff = False
        if msg.group is not None and self.leases.current(digest) is None:
            fetching = self.leases.fetching(msg.group)
            waiting = self.queue.check(msg.group, place, fetching)
            if waiting is not None:
                reply = replies.queued(self.leases, waiting, self._clock())
                return _Attempt(reply, waiting.wake_at, True)
            handoff = 0 < self.queue.fetches_per_image <= len(fetching)
        size = msg.size if msg.size is not None else (entry.meta.size if entry else None)
        before = self.leases.current(digest)
        try:
            outcome = self.leases.acquire(digest, place.node, size, msg.group)
        except errors.LeaseCapReached:
            self.metrics.lease_refused.labels(errors.LeaseCapReached.code).inc()
            raise
        lease = outcome.lease
        if isinstance(outcome, Granted):
            if msg.group is not None:
                self.queue.granted(msg.group, place.node)
            if handoff:  # beside a fetch in its last bytes (upstream_queue.handoff_at)
                self.metrics.upstream_handoffs.inc()
            if outcome.replaced is not None:  # its holder fell below the minimum rate
                self.metrics.lease_replacements.inc()
                log.warning("%s", self.leases.why_replaced(outcome.replaced.lease_id))
            fresh = before is None or outcome.replaced is not None
            verify = disputed is not None
            reply = replies.granted(self.leases, lease, outcome.replaced, verify=verify)
            return _Attempt(reply, None, granted=lease, fresh=fresh)
        return _Attempt(replies.held(self.leases, lease, self._clock()), lease.expires_at)

    async def _commit_grant(self, lease: Lease, fresh: bool) -> None:
        try:
            await self._store.save_lease(self._stored_lease(lease))
        except BaseException:
            # A new lease that is not durable is not granted: the asker gets an
            # error, and the next asker the lease, rather than everyone waiting on
            # a lease nobody holds (unless it has moved on since: leave that).
            current = self.leases.current(lease.digest)
            if fresh and current is not None and current.lease_id == lease.lease_id:
                self.leases.release(lease.digest, lease.lease_id)
                self._waiters.notify(lease.digest)
            raise

    def _lease_holder(self, digest: str) -> str | None:
        lease = self.leases.current(digest)
        return None if lease is None else lease.holder

    async def drop(self, lease: Lease, *, passed: bool = False) -> None:
        """Take `lease` from its holder (its torrent was filed, or settled a dispute);
        `passed`: the copy it still finishes counts (`LeaseBook.drop`)."""
        self.leases.drop(lease.digest, passed=passed)
        await self._store.delete_lease(lease.digest, lease.lease_id)
        self._free_slot(lease)

    def _leave_queue(self, group: str, place: Place) -> None:
        """`place` leaves its image's queue; if that moved the next blob up, wake it
        to look at the fetch now ahead of it (it slept on the one before)."""
        if self.queue.leave(group, place):
            self._wake_next(group)

    def _free_slot(self, lease: Lease) -> None:
        """`lease` stopped using the upstream link: wake who may take its slot."""
        self._wake_next(lease.group)

    def _wake_next(self, group: str | None) -> None:
        for digest in self.queue.next_up(group):
            self._waiters.notify(digest)

    async def renew(
        self, digest_text: str, msg: wire.LeaseRenew, *, identity: str | None = None
    ) -> wire.LeaseReply:
        """Renew with progress; `identity` (the caller's), when known, must be the holder."""
        digest = checked_digest(digest_text)
        before = self.leases.current(digest)
        try:
            lease = self.leases.renew(
                digest, msg.lease_id, msg.bytes_done, msg.size, holder=identity
            )
        except errors.InvalidRequest:
            self.metrics.lease_refused.labels("bad_progress").inc()
            raise
        await self._store.save_lease(self._stored_lease(lease))
        if self.queue.renewed(before, lease):  # a slot freed, or a hand-off near
            self._free_slot(lease)
        if lease.slow and before is not None and not before.slow:
            # Below the minimum rate: a waiter may take the fetch over now.
            self._waiters.notify(digest)
        return replies.granted(self.leases, lease)

    async def release(
        self, digest_text: str, msg: wire.LeaseRelease, *, identity: str | None = None
    ) -> None:
        digest = checked_digest(digest_text)
        lease = self.leases.release(digest, msg.lease_id, holder=identity)
        if lease is None:
            return
        # Deletes name the lease id, so this commit cannot remove a newer lease.
        await self._store.delete_lease(digest, lease.lease_id)
        self._waiters.notify(digest)
        self._free_slot(lease)

    def _stored_lease(self, lease: Lease) -> StoredLease:
        expires = self._wall() + (lease.expires_at - self._clock())
        return StoredLease(
            lease.digest, lease.lease_id, lease.holder, expires, lease.bytes_done, lease.size
        )

    def restore(self, stored: Iterable[StoredLease]) -> None:
        """Put back the leases the store kept, their wall-clock expiry on our clock."""
        now, wall = self._clock(), self._wall()
        for sl in stored:
            expires_at = now + (sl.expires_at_unix - wall)
            self.leases.restore(
                Lease(sl.digest, sl.lease_id, sl.holder, expires_at, sl.bytes_done, sl.size)
            )

    async def expire(self) -> None:
        """Drop every lease whose time is up, from the store too, and wake who waits on it."""
        for lease in self.leases.expire():
            await self._store.delete_lease(lease.digest, lease.lease_id)
            self._waiters.notify(lease.digest)
            self._free_slot(lease)

    async def watch_silence(self) -> None:
        """Run `wake_silent` every `LeaseBook.check_every_s`, forever (never, if 0)."""
        if self.leases.check_every_s <= 0:
            return
        while True:
            await trio.sleep(self.leases.check_every_s)
            self.wake_silent()

    def wake_silent(self) -> None:
        """A silent holder gives up its image's slot, and its blob may pass on now."""
        for lease in self.leases.turned_silent():
            what = "silent" if self.leases.is_silent(lease) else "quiet: its slot is free"
            log.info("tracker: the holder %r of the lease on %s went %s",
                     lease.holder, lease.digest, what)  # fmt: skip
            self._waiters.notify(lease.digest)
            self._free_slot(lease)
