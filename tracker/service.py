"""The tracker's logic: announces, the metainfo registry and leases, over one state.

`Tracker` ties the pieces together: the info-hash → digest index of registered
metainfo (every info-hash of a hybrid torrent maps to the one digest, so they
share one swarm), the in-memory peers, the lease book and its waiters, and the
durable store. Announce and scrape are synchronous — the hot path never awaits —
and the control operations serialise on one lock so a check and the write that
follows it cannot interleave with another. Transports (http_listener,
udp_listener, server) parse requests and encode answers; this module must not
know about sockets, HTTP or encodings, and raises only `p2preg.core.errors`.
"""

from __future__ import annotations

import heapq
import hmac
import ipaddress
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import trio

from p2preg.core import errors, wire
from p2preg.core.digest import Digest, DigestError
from p2preg.core.metainfo import Metainfo, MetainfoError, MetainfoTooLarge
from tracker.announce import (
    AnnounceRequest,
    AnnounceResponse,
    Event,
    ScrapeRequest,
    SwarmStats,
)
from tracker.config import TrackerConfig
from tracker.handout import hand_out
from tracker.leases import Granted, Lease, LeaseBook, Waiters
from tracker.metainfo import parse_metainfo
from tracker.metrics import Gauges, TrackerMetrics
from tracker.peers import PeerTable, compact_address
from tracker.state import Snapshot, StoredBad, StoredLease, StoredMetainfo, TrackerStore

# How often the sweeper drops expired peers and leases, at most.
MAX_SWEEP_INTERVAL_S = 5.0
# A request queued behind an earlier blob of its image looks again this soon
# when no fetch is running (the earlier one's requester is taking the slot).
QUEUE_RECHECK_S = 0.5
# How long an image's first upstream fetch waits for the requests of its earlier
# layers (the config is place 0, the first layer 1: those never wait).
GATHER_S = 0.25
# Images whose lease requests are remembered (the least recently asked go first).
MAX_IMAGES_REMEMBERED = 10_000


@dataclass(slots=True)
class _Image:
    """What the tracker remembers of one image's (lease group's) upstream fetches."""

    first_seen: float
    # The node granted the image's latest fetch.
    last_holder: str | None = None


class _Attempt(NamedTuple):
    """One try at a lease: the reply, and when to try again if it says wait."""

    reply: wire.LeaseReply
    wake_at: float | None
    # Waiting for the image's upstream slot, not for this digest's own lease.
    queued: bool = False


@dataclass(frozen=True, slots=True)
class _Entry:
    meta: Metainfo
    published_by: str


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
    ) -> None:
        self.config = config
        self.metrics = metrics or TrackerMetrics()
        self._store = store
        self._clock = clock
        self._wall = wall_clock
        self._token = None if config.token is None else config.token.encode()
        self._trusted = tuple(
            ipaddress.ip_network(n, strict=False) for n in config.trusted_ip_sources
        )
        self._entries: dict[str, _Entry] = {}
        self._by_hash: dict[bytes, str] = {}
        self._bad: dict[str, set[bytes]] = {}
        self.peers = PeerTable(
            max_peers_per_swarm=config.max_peers_per_swarm, max_peers=config.max_peers
        )
        self.leases = LeaseBook(config.lease_ttl_s, clock)
        self._waiters = Waiters()
        # Per image (lease group): (order, digest, node) of requests waiting for a slot.
        self._queued: dict[str, Counter[tuple[int, str, str]]] = {}
        self._images: OrderedDict[str, _Image] = OrderedDict()
        self._lock = trio.Lock()
        self.metrics.watch(self._gauges)

    # -- start -----------------------------------------------------------------

    def restore(self, snapshot: Snapshot) -> None:
        """Load what the store kept; records that no longer validate are skipped."""
        for bad in snapshot.bad:
            self._bad.setdefault(bad.digest, set()).add(bad.info_hash_v2)
        for rec in snapshot.metainfo:
            try:
                meta = parse_metainfo(rec.data, Digest.parse(rec.digest), rec.size)
            except (DigestError, MetainfoError):
                continue
            self._install(meta, rec.published_by)
        now, wall = self._clock(), self._wall()
        for sl in snapshot.leases:
            self.leases.restore(
                Lease(
                    sl.digest,
                    sl.lease_id,
                    sl.holder,
                    now + (sl.expires_at_unix - wall),
                    sl.bytes_done,
                    sl.size,
                )
            )

    # -- auth ------------------------------------------------------------------

    def check_token(self, token: bytes | None) -> None:
        if self._token is None:
            return
        if token is None or not hmac.compare_digest(token, self._token):
            raise errors.Unauthorized("missing or wrong cluster token")

    # -- BitTorrent ------------------------------------------------------------

    def announce(self, req: AnnounceRequest, client_ip: str, transport: str) -> AnnounceResponse:
        self.metrics.announce[transport, req.event].inc()
        self.check_token(req.token)
        digest = self._by_hash.get(req.info_hash)
        if digest is None:
            raise errors.UnknownTorrent("unregistered info_hash: publish its metainfo first")
        ip = client_ip
        if req.claimed_ip and self._trusted and self._is_trusted(client_ip):
            ip = req.claimed_ip
        compact = compact_address(ip, req.port)
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
        self.check_token(req.token)
        out: list[tuple[bytes, SwarmStats | None]] = []
        for ih in req.info_hashes:
            digest = self._by_hash.get(ih)
            swarm = None if digest is None else self.peers.swarm(digest)
            if digest is None:
                out.append((ih, None))
            elif swarm is None:
                out.append((ih, SwarmStats(0, 0, 0)))
            else:
                stats = SwarmStats(len(swarm.seeders), len(swarm.leechers), swarm.downloaded)
                out.append((ih, stats))
        return out

    def _is_trusted(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self._trusted)

    # -- metainfo registry -------------------------------------------------------

    def lookup(self, digest_text: str) -> wire.MetainfoRecord:
        entry = self._entries.get(_digest(digest_text))
        if entry is None:
            raise errors.NotFound(f"no metainfo for {digest_text}")
        return _record(entry.meta)

    async def publish(
        self, digest_text: str, msg: wire.PublishMetainfo
    ) -> tuple[wire.MetainfoRecord, bool]:
        """File metainfo for a digest; returns (record, newly stored)."""
        digest = _digest(digest_text)
        meta = self._validate(digest, msg.size, msg.metainfo)
        async with self._lock:
            if meta.info_hash_v2 in self._bad.get(digest, ()):
                self.metrics.metainfo_rejected.labels(errors.MetainfoConflict.code).inc()
                raise errors.MetainfoConflict(f"this metainfo for {digest} was reported bad")
            entry = self._entries.get(digest)
            if entry is not None:
                if entry.meta.info_hash_v2 == meta.info_hash_v2:
                    return _record(entry.meta), False
                self.metrics.metainfo_rejected.labels(errors.MetainfoConflict.code).inc()
                raise errors.MetainfoConflict(
                    f"{digest} already has metainfo with info-hash "
                    f"{entry.meta.info_hash_v2.hex()}; only a holder of the verified blob "
                    "can replace it, by reporting it bad"
                )
            if len(self._entries) >= self.config.max_metainfo:
                raise errors.LimitReached("the tracker's metainfo limit is reached")
            await self._store.put_metainfo(self._stored(meta, msg.node))
            self._install(meta, msg.node)
            self.metrics.metainfo_published.inc()
            return _record(meta), True

    async def report_bad(self, digest_text: str, msg: wire.ReportBad) -> wire.MetainfoRecord:
        """Replace the stored metainfo `msg.info_hash` with the reporter's own."""
        digest = _digest(digest_text)
        replacement = self._validate(digest, msg.size, msg.metainfo)
        async with self._lock:
            entry = self._entries.get(digest)
            if entry is None:
                raise errors.NotFound(f"no metainfo for {digest}")
            old = entry.meta
            if msg.info_hash not in (*old.swarm_keys, old.info_hash_v2):
                raise errors.MetainfoConflict(
                    f"the metainfo of {digest} is no longer {msg.info_hash.hex()}; look it up again"
                )
            if replacement.info_hash_v2 == old.info_hash_v2:
                raise errors.InvalidMetainfo("the replacement is the metainfo reported bad")
            if replacement.info_hash_v2 in self._bad.get(digest, ()):
                raise errors.MetainfoConflict(f"the replacement for {digest} was reported bad too")
            bad = StoredBad(digest, old.info_hash_v2, msg.node, msg.reason)
            await self._store.put_metainfo(self._stored(replacement, msg.node), bad)
            self._uninstall(old)
            self._bad.setdefault(digest, set()).add(old.info_hash_v2)
            # Peers of the bad torrent cannot help with the good one.
            self.peers.drop_swarm(digest)
            self._install(replacement, msg.node)
            self.metrics.metainfo_published.inc()
            self._waiters.notify(digest)
            return _record(replacement)

    def _validate(self, digest: str, size: int, data: bytes) -> Metainfo:
        try:
            return parse_metainfo(
                data, Digest.parse(digest), size, max_bytes=self.config.max_metainfo_bytes
            )
        except MetainfoError as e:
            too_large = isinstance(e, MetainfoTooLarge)
            err = (errors.MetainfoTooLarge if too_large else errors.InvalidMetainfo)(str(e))
            self.metrics.metainfo_rejected.labels(err.code).inc()
            raise err from None

    def _stored(self, meta: Metainfo, node: str) -> StoredMetainfo:
        return StoredMetainfo(str(meta.digest), meta.size, meta.data, node, self._wall())

    def _install(self, meta: Metainfo, node: str) -> None:
        digest = str(meta.digest)
        self._entries[digest] = _Entry(meta, node)
        for key in meta.swarm_keys:
            self._by_hash[key] = digest

    def _uninstall(self, meta: Metainfo) -> None:
        for key in meta.swarm_keys:
            self._by_hash.pop(key, None)
        self._entries.pop(str(meta.digest), None)

    # -- upstream leases ---------------------------------------------------------

    async def acquire_lease(self, digest_text: str, msg: wire.LeaseRequest) -> wire.LeaseReply:
        """Grant, refuse (wait) or point at the swarm; long-polls up to `msg.wait_s`."""
        digest = _digest(digest_text)
        wait_s = min(max(0.0, msg.wait_s), self.config.lease_wait_max_s)
        deadline = self._clock() + wait_s
        queued = False
        try:
            while True:
                async with self._lock:
                    attempt = await self._try_acquire(digest, msg)
                if attempt.wake_at is None or self._clock() >= deadline:
                    return attempt.reply
                if attempt.queued != queued:
                    # In the image's queue from the first wait for a slot until
                    # the answer, so a later blob cannot slip ahead on a wake-up.
                    queued = attempt.queued
                    self._queue(msg, digest, +1 if queued else -1)
                # Wake when something changes, or when the lease in the way runs out.
                await self._waiters.wait(digest, min(deadline, attempt.wake_at))
        finally:
            if queued:
                self._queue(msg, digest, -1)

    def _queue(self, msg: wire.LeaseRequest, digest: str, delta: int) -> None:
        assert msg.group is not None
        queue = self._queued.setdefault(msg.group, Counter())
        place = (msg.order, digest, msg.node)
        queue[place] += delta
        if queue[place] <= 0:
            del queue[place]
        if not queue:
            del self._queued[msg.group]

    async def _try_acquire(self, digest: str, msg: wire.LeaseRequest) -> _Attempt:
        entry = self._entries.get(digest)
        if entry is not None:
            self.peers.expire_swarm(digest, self._clock())
            if self.peers.seeders(digest):
                reply = wire.LeaseReply(wire.LeaseStatus.SEEDED, metainfo=entry.meta.data)
                return _Attempt(reply, None)
        blocking = self._queue_blocker(digest, msg)
        if blocking is not None:
            return blocking
        size = msg.size if msg.size is not None else (entry.meta.size if entry else None)
        outcome = self.leases.acquire(digest, msg.node, size, msg.group)
        lease = outcome.lease
        if isinstance(outcome, Granted):
            await self._store.save_lease(self._stored_lease(lease))
            if msg.group is not None:
                self._image(msg.group).last_holder = msg.node
            return _Attempt(self._lease_reply(wire.LeaseStatus.GRANTED, lease), None)
        return _Attempt(self._wait_reply(lease), lease.expires_at)

    def _queue_blocker(self, digest: str, msg: wire.LeaseRequest) -> _Attempt | None:
        """A WAIT while `msg.group`'s upstream fetches are all taken, or an earlier
        blob of the image is waiting for one; None when this digest may go on.

        One stream fills the upstream link, so fetching an image's layers one
        by one finishes the last of them no later than fetching all at once,
        and every earlier layer is complete, and spreading, far sooner.
        """
        limit = self.config.upstream_fetches_per_image
        if msg.group is None or limit == 0 or self.leases.current(digest) is not None:
            return None  # no image named, no limit, or the digest's own lease decides
        now = self._clock()
        image = self._image(msg.group)
        fetching = self.leases.fetching(msg.group)
        queue = self._queued.get(msg.group) or Counter()
        earlier = any((order, d) < (msg.order, digest) for order, d, _node in queue)
        # A client asks for all the layers at once, in no set order: before the
        # image's first fetch, give its earlier layers' requests a moment to arrive.
        gather_until = image.first_seen + GATHER_S
        gathering = image.last_holder is None and msg.order > 1 and now < gather_until
        # The node that fetched the image's last blob is seeding it now: its
        # uplink is full, which slows the ACKs of a download. Another node
        # waiting for the same blob takes it instead.
        busy = image.last_holder == msg.node and any(
            (order, d) == (msg.order, digest) and node != msg.node for order, d, node in queue
        )
        if len(fetching) < limit and not (earlier or gathering or busy):
            return None
        if not fetching:
            # A slot is free and another request is about to take it.
            wake_at = gather_until if gathering else now + QUEUE_RECHECK_S
            return _Attempt(self._queued_reply(None), wake_at, True)
        first = min(fetching, key=lambda lease: lease.expires_at)
        return _Attempt(self._queued_reply(first), first.expires_at, True)

    def _image(self, group: str) -> _Image:
        image = self._images.get(group)
        if image is None:
            image = self._images[group] = _Image(self._clock())
            while len(self._images) > MAX_IMAGES_REMEMBERED:
                self._images.popitem(last=False)
        self._images.move_to_end(group)
        return image

    def _free_slot(self, lease: Lease) -> None:
        """`lease` stopped using the upstream link: wake its image's queue."""
        queue = self._queued.get(lease.group) if lease.group is not None else None
        for digest in {d for _order, d, _node in queue or ()}:
            self._waiters.notify(digest)

    async def renew_lease(self, digest_text: str, msg: wire.LeaseRenew) -> wire.LeaseReply:
        digest = _digest(digest_text)
        async with self._lock:
            before = self.leases.current(digest)
            lease = self.leases.renew(digest, msg.lease_id, msg.bytes_done, msg.size)
            await self._store.save_lease(self._stored_lease(lease))
        if lease.fetched and before is not None and not before.fetched:
            self._free_slot(lease)
        return self._lease_reply(wire.LeaseStatus.GRANTED, lease)

    async def release_lease(self, digest_text: str, msg: wire.LeaseRelease) -> None:
        digest = _digest(digest_text)
        async with self._lock:
            lease = self.leases.release(digest, msg.lease_id)
            if lease is not None:
                await self._store.delete_lease(digest, lease.lease_id)
        if lease is not None:
            self._waiters.notify(digest)
            self._free_slot(lease)

    def _wait_reply(self, lease: Lease) -> wire.LeaseReply:
        remaining = max(0.0, lease.expires_at - self._clock())
        retry = min(self.config.lease_ttl_s, max(1.0, remaining))
        return self._lease_reply(wire.LeaseStatus.WAIT, lease, retry_after_s=retry)

    def _queued_reply(self, ahead: Lease | None) -> wire.LeaseReply:
        """WAIT for a slot; the holder and progress shown are those of the fetch ahead."""
        if ahead is not None:
            return self._wait_reply(ahead)
        return wire.LeaseReply(
            wire.LeaseStatus.WAIT, ttl_s=self.leases.ttl_s, retry_after_s=QUEUE_RECHECK_S
        )

    def _lease_reply(
        self, status: wire.LeaseStatus, lease: Lease, *, retry_after_s: float = 0.0
    ) -> wire.LeaseReply:
        granted = status is wire.LeaseStatus.GRANTED
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
        async with self._lock:
            for lease in self.leases.expire():
                await self._store.delete_lease(lease.digest, lease.lease_id)
                self._waiters.notify(lease.digest)
                self._free_slot(lease)

    def status(self, limit: int) -> TrackerStatus:
        """Totals, and the `limit` swarms with the most live peers."""

        def size(digest: str) -> int:
            swarm = self.peers.swarm(digest)
            return 0 if swarm is None else len(swarm.by_key)

        busiest = heapq.nlargest(limit, self.peers.keys(), key=size)
        rows = []
        for digest in busiest:
            swarm, entry = self.peers.swarm(digest), self._entries.get(digest)
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
            totals.swarms, totals.peers, totals.seeders, len(self._entries), len(self.leases), rows
        )

    def _gauges(self) -> Gauges:
        totals = self.peers.totals()
        return Gauges(
            swarms=totals.swarms,
            peers=totals.peers,
            seeders=totals.seeders,
            metainfo=len(self._entries),
            leases=len(self.leases),
            lease_grants=self.leases.granted,
            lease_expiries=self.leases.expired,
        )


def _digest(text: str) -> str:
    try:
        return str(Digest.parse(text))
    except DigestError as e:
        raise errors.InvalidRequest(str(e)) from None


def _record(meta: Metainfo) -> wire.MetainfoRecord:
    return wire.MetainfoRecord(str(meta.digest), meta.size, meta.data, list(meta.swarm_keys))
