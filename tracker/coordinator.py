"""The tracker's service: announces, the metainfo registry and leases, composed over one store.

`Tracker` wires the sans-IO parts together — `ClusterAuth`, the `PeerTable`
swarms, the `MetainfoRegistry` and its disputes' `Quarantines` (applied by
`Publishing`), the `LeaseBook` and the `UpstreamQueue` — with the durable
`TrackerStore` and the `Waiters` of long-polled lease requests. A digest whose
torrent is disputed is never answered SEEDED: its next lease goes to a node
that is neither side, as VERIFY.
Announce and scrape are synchronous: the hot path never awaits. A control
operation decides on memory synchronously (trio runs nothing else in between),
then awaits its store commit without holding anything that others wait for:
only a second metainfo write for the same digest waits for the first one's
outcome. Transports (bittorrent.py, http_routes.py) parse requests and encode
answers; this module must not know about sockets, HTTP or encodings, holds no
policy of its own (the parts above do) and raises only `p2preg.core.errors`.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import trio

from p2preg.core import errors, wire
from p2preg.core.digest import Digest, DigestError
from tracker.announce import AnnounceRequest, AnnounceResponse, Event, ScrapeRequest, SwarmStats
from tracker.auth import ClusterAuth
from tracker.config import TrackerConfig
from tracker.disputes import Quarantines
from tracker.handout import hand_out
from tracker.leases import Granted, Lease, LeaseBook, Waiters
from tracker.metrics import Gauges, TrackerMetrics
from tracker.peers import PeerTable, compact_address
from tracker.publishing import Publishing
from tracker.registry import MetainfoRegistry
from tracker.state import Snapshot, StoredLease, TrackerStore
from tracker.upstream_queue import QUEUE_RECHECK_S, Place, Queued, UpstreamQueue

# How often the sweeper drops expired peers and leases, at most.
MAX_SWEEP_INTERVAL_S = 5.0


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


@dataclass(frozen=True, slots=True)
class SwarmStatus:
    digest: str
    size: int
    seeders: int
    leechers: int
    completed: int
    published_by: str


@dataclass(frozen=True, slots=True)
class TrackerStatus:
    """What `p2preg status --tracker` shows: totals and the busiest swarms."""

    swarms: int
    peers: int
    seeders: int
    metainfo: int
    leases: int
    busiest: list[SwarmStatus]


class Tracker:
    def __init__(
        self,
        config: TrackerConfig,
        store: TrackerStore,
        *,
        metrics: TrackerMetrics | None = None,
        clock: Callable[[], float] = trio.current_time,
        wall_clock: Callable[[], float] = time.time,
        current_root: Callable[[], bytes | None] = lambda: None,
    ) -> None:
        self.config = config
        self.metrics = metrics or TrackerMetrics()
        self._store = store
        self._clock = clock
        self._wall = wall_clock
        self.auth = ClusterAuth(config.token, config.trusted_ip_sources)
        self.registry = MetainfoRegistry(config.max_metainfo)
        self.peers = PeerTable(
            max_peers_per_swarm=config.max_peers_per_swarm, max_peers=config.max_peers
        )
        self.leases = LeaseBook(config.lease_ttl_s, clock)
        self.quarantines = Quarantines(config.dispute_quarantine_s, clock)
        self.queue = UpstreamQueue(config.upstream_fetches_per_image, clock)
        self._waiters = Waiters()
        self.publishing = Publishing(
            config,
            store,
            self.metrics,
            self.registry,
            self.quarantines,
            clock=clock,
            wall_clock=wall_clock,
            current_root=current_root,
            lease_of=self.leases.current,
            drop_lease=self._drop_lease,
            drop_swarm=self.peers.drop_swarm,
            notify=self._waiters.notify,
        )
        self.metrics.watch(self._gauges)

    # -- start -----------------------------------------------------------------

    def restore(self, snapshot: Snapshot) -> None:
        """Load what the store kept (see Publishing.restore for metainfo)."""
        self.publishing.restore(snapshot)
        now, wall = self._clock(), self._wall()
        for sl in snapshot.leases:
            expires_at = now + (sl.expires_at_unix - wall)
            self.leases.restore(
                Lease(sl.digest, sl.lease_id, sl.holder, expires_at, sl.bytes_done, sl.size)
            )

    def check_token(self, token: bytes | None) -> None:
        self.auth.check(token)

    # -- BitTorrent ------------------------------------------------------------

    def announce(self, req: AnnounceRequest, client_ip: str, transport: str) -> AnnounceResponse:
        self.metrics.announce[transport, req.event].inc()
        self.auth.check(req.token)
        digest = self.registry.digest_of(req.info_hash)
        if digest is None:
            raise errors.UnknownTorrent("unregistered info_hash: publish its metainfo first")
        compact = compact_address(self.auth.peer_ip(client_ip, req.claimed_ip), req.port)
        cfg = self.config
        if req.event is Event.STOPPED:
            self.peers.remove(digest, req.peer_id, compact)
            swarm = self.peers.swarm(digest)
            seeders, leechers = (
                (0, 0) if swarm is None else (len(swarm.seeders), len(swarm.leechers))
            )
            return AnnounceResponse(
                cfg.announce_interval_s, cfg.min_announce_interval_s, seeders, leechers, []
            )
        seeder = req.left == 0
        swarm, peer = self.peers.update(
            digest, req.peer_id, compact, seeder=seeder, expires_at=self._clock() + cfg.peer_ttl_s
        )
        if req.event is Event.COMPLETED:
            swarm.downloaded += 1
        if seeder and len(swarm.seeders) == 1 and digest in self._waiters:
            # The swarm's first seeder: nodes waiting for a lease can join it.
            self._waiters.notify(digest)
        numwant = req.numwant if req.numwant is not None else cfg.default_numwant
        picked = hand_out(
            swarm.seeder_addrs,
            swarm.leecher_addrs,
            min(numwant, cfg.max_numwant),
            asker=peer.compact,
            asker_is_seeder=seeder,
        )
        return AnnounceResponse(
            cfg.announce_interval_s,
            cfg.min_announce_interval_s,
            len(swarm.seeders),
            len(swarm.leechers),
            picked,
        )

    def scrape(self, req: ScrapeRequest, transport: str) -> list[tuple[bytes, SwarmStats | None]]:
        """Stats per asked info-hash, in order; None for a torrent nobody registered."""
        self.metrics.scrape[transport].inc()
        self.auth.check(req.token)
        out: list[tuple[bytes, SwarmStats | None]] = []
        for ih in req.info_hashes:
            digest = self.registry.digest_of(ih)
            swarm = None if digest is None else self.peers.swarm(digest)
            if digest is None:
                out.append((ih, None))
            elif swarm is None:
                out.append((ih, SwarmStats(0, 0, 0)))
            else:
                stats = SwarmStats(len(swarm.seeders), len(swarm.leechers), swarm.downloaded)
                out.append((ih, stats))
        return out

    # -- metainfo registry -------------------------------------------------------

    def lookup(self, digest_text: str) -> wire.MetainfoRecord:
        return self.registry.lookup(_digest(digest_text))

    async def publish(
        self, digest_text: str, msg: wire.PublishMetainfo
    ) -> tuple[wire.MetainfoRecord, bool]:
        """File metainfo for a digest; returns (record, newly stored)."""
        return await self.publishing.publish(_digest(digest_text), msg)

    async def report_bad(self, digest_text: str, msg: wire.ReportBad) -> wire.MetainfoRecord:
        return await self.publishing.report_bad(_digest(digest_text), msg)

    # -- upstream leases ---------------------------------------------------------

    async def acquire_lease(self, digest_text: str, msg: wire.LeaseRequest) -> wire.LeaseReply:
        """Grant, refuse (wait) or point at the swarm; long-polls up to `msg.wait_s`."""
        digest = _digest(digest_text)
        wait_s = min(max(0.0, msg.wait_s), self.config.lease_wait_max_s)
        deadline = self._clock() + wait_s
        place = Place(msg.order, digest, msg.node)
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
                    (self.queue.enter if queued else self.queue.leave)(msg.group, place)
                # Wake when something changes, or when the lease in the way runs out.
                await self._waiters.wait(digest, min(deadline, attempt.wake_at))
        finally:
            if queued and msg.group is not None:
                self.queue.leave(msg.group, place)

    def _try_acquire(self, digest: str, msg: wire.LeaseRequest, place: Place) -> _Attempt:
        """Decide one try on memory alone; a grant is committed by the caller."""
        entry, dispute = self.registry.get(digest), self.registry.dispute(digest)
        if entry is not None and dispute is None:
            self.peers.expire_swarm(digest, self._clock())
            if self.peers.seeders(digest):
                reply = wire.LeaseReply(wire.LeaseStatus.SEEDED, metainfo=entry.meta.data)
                return _Attempt(reply, None)
        self.quarantines.check(msg.node, "take an upstream lease")
        if dispute is not None and dispute.party(msg.node) and self._lease_holder(digest) is None:
            # Neither side's fetch settles it: wait for a node that can verify.
            ttl = self.leases.ttl_s
            reply = wire.LeaseReply(wire.LeaseStatus.WAIT, ttl_s=ttl, retry_after_s=ttl)
            return _Attempt(reply, self._clock() + ttl)
        if msg.group is not None and self.leases.current(digest) is None:
            waiting = self.queue.check(msg.group, place, self.leases.fetching(msg.group))
            if waiting is not None:
                return _Attempt(self._queued_reply(waiting), waiting.wake_at, True)
        size = msg.size if msg.size is not None else (entry.meta.size if entry else None)
        fresh = self.leases.current(digest) is None
        outcome = self.leases.acquire(digest, msg.node, size, msg.group)
        lease = outcome.lease
        if isinstance(outcome, Granted):
            if msg.group is not None:
                self.queue.granted(msg.group, msg.node)
            status = wire.LeaseStatus.GRANTED if dispute is None else wire.LeaseStatus.VERIFY
            reply = self._lease_reply(status, lease)
            return _Attempt(reply, None, granted=lease, fresh=fresh)
        return _Attempt(self._wait_reply(lease), lease.expires_at)

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

    async def _drop_lease(self, lease: Lease) -> None:
        self.leases.drop(lease.digest)
        await self._store.delete_lease(lease.digest, lease.lease_id)
        self._free_slot(lease)

    def _free_slot(self, lease: Lease) -> None:
        """`lease` stopped using the upstream link: wake its image's queue."""
        for digest in self.queue.waiting(lease.group):
            self._waiters.notify(digest)

    async def renew_lease(
        self, digest_text: str, msg: wire.LeaseRenew, *, holder: str | None = None
    ) -> wire.LeaseReply:
        """Renew with progress; `holder` (a certificate's node) must be the lease's."""
        digest = _digest(digest_text)
        before = self.leases.current(digest)
        lease = self.leases.renew(digest, msg.lease_id, msg.bytes_done, msg.size, holder=holder)
        await self._store.save_lease(self._stored_lease(lease))
        if lease.fetched and before is not None and not before.fetched:
            self._free_slot(lease)
        return self._lease_reply(wire.LeaseStatus.GRANTED, lease)

    async def release_lease(
        self, digest_text: str, msg: wire.LeaseRelease, *, holder: str | None = None
    ) -> None:
        digest = _digest(digest_text)
        lease = self.leases.release(digest, msg.lease_id, holder=holder)
        if lease is None:
            return
        # Deletes name the lease id, so this commit cannot remove a newer lease.
        await self._store.delete_lease(digest, lease.lease_id)
        self._waiters.notify(digest)
        self._free_slot(lease)

    def _wait_reply(self, lease: Lease) -> wire.LeaseReply:
        remaining = max(0.0, lease.expires_at - self._clock())
        retry = min(self.config.lease_ttl_s, max(1.0, remaining))
        return self._lease_reply(wire.LeaseStatus.WAIT, lease, retry_after_s=retry)

    def _queued_reply(self, waiting: Queued) -> wire.LeaseReply:
        """WAIT for a slot; the holder and progress shown are those of the fetch ahead."""
        if waiting.ahead is not None:
            return self._wait_reply(waiting.ahead)
        return wire.LeaseReply(
            wire.LeaseStatus.WAIT, ttl_s=self.leases.ttl_s, retry_after_s=QUEUE_RECHECK_S
        )

    def _lease_reply(
        self, status: wire.LeaseStatus, lease: Lease, *, retry_after_s: float = 0.0
    ) -> wire.LeaseReply:
        granted = status in (wire.LeaseStatus.GRANTED, wire.LeaseStatus.VERIFY)
        return wire.LeaseReply(
            status,
            lease_id=lease.lease_id if granted else None,
            ttl_s=self.leases.ttl_s,
            retry_after_s=retry_after_s,
            holder=lease.holder,
            bytes_done=lease.bytes_done,
            size=lease.size,
        )

    def _stored_lease(self, lease: Lease) -> StoredLease:
        expires = self._wall() + (lease.expires_at - self._clock())
        return StoredLease(
            lease.digest, lease.lease_id, lease.holder, expires, lease.bytes_done, lease.size
        )

    # -- housekeeping ------------------------------------------------------------

    async def sweep_forever(self) -> None:
        """Drop expired peers and leases, forever; run it in the tracker's nursery."""
        interval = min(
            MAX_SWEEP_INTERVAL_S, self.config.peer_ttl_s / 4, self.config.lease_ttl_s / 2
        )
        while True:
            await trio.sleep(interval)
            await self.sweep()

    async def sweep(self) -> None:
        now = self._clock()
        for n, key in enumerate(self.peers.keys()):
            self.peers.expire_swarm(key, now)
            if n % 1000 == 999:
                await trio.lowlevel.checkpoint()  # let announces through on big trackers
        for lease in self.leases.expire():
            await self._store.delete_lease(lease.digest, lease.lease_id)
            self._waiters.notify(lease.digest)
            self._free_slot(lease)

    def status(self, limit: int) -> TrackerStatus:
        """Totals, and the `limit` swarms with the most live peers."""

        def size(digest: str) -> int:
            swarm = self.peers.swarm(digest)
            return 0 if swarm is None else len(swarm.by_key)

        rows = []
        for digest in heapq.nlargest(limit, self.peers.keys(), key=size):
            swarm, entry = self.peers.swarm(digest), self.registry.get(digest)
            if swarm is None or entry is None:
                continue
            rows.append(
                SwarmStatus(
                    digest,
                    entry.meta.size,
                    len(swarm.seeders),
                    len(swarm.leechers),
                    swarm.downloaded,
                    entry.published_by,
                )
            )
        totals = self.peers.totals()
        return TrackerStatus(
            totals.swarms, totals.peers, totals.seeders, len(self.registry), len(self.leases), rows
        )

    def _gauges(self) -> Gauges:
        totals = self.peers.totals()
        return Gauges(
            swarms=totals.swarms,
            peers=totals.peers,
            seeders=totals.seeders,
            metainfo=len(self.registry),
            leases=len(self.leases),
            lease_grants=self.leases.granted,
            lease_expiries=self.leases.expired,
        )


def _digest(text: str) -> str:
    try:
        return str(Digest.parse(text))
    except DigestError as e:
        raise errors.InvalidRequest(str(e)) from None
