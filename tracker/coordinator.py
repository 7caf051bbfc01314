"""The tracker's service: announces, the metainfo registry and leases, composed over one store.

`Tracker` wires the sans-IO parts together — `ClusterAuth`, the `PeerTable`
swarms, the `MetainfoRegistry`, the `LeaseBook` and the `UpstreamQueue` — with
the durable `TrackerStore` and the `Waiters` of long-polled lease requests.
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import trio

from p2preg.core import errors, wire
from p2preg.core.digest import Digest, DigestError
from p2preg.core.metainfo import Metainfo, MetainfoError, MetainfoTooLarge
from p2preg.core.tls import TLSFiles
from tracker.announce import AnnounceRequest, AnnounceResponse, ScrapeRequest, SwarmStats
from tracker.auth import ClusterAuth
from tracker.config import TrackerConfig
from tracker.leases import Granted, Lease, LeaseBook, Waiters
from tracker.metainfo import parse_metainfo
from tracker.metrics import Gauges, TrackerMetrics
from tracker.peers import PeerTable
from tracker.registry import MetainfoRegistry, Rerooted
from tracker.state import Snapshot, StoredBad, StoredLease, StoredMetainfo, TrackerStore
from tracker.swarms import Swarms, checked_digest
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
        # The CA that issued the tracker's own certificate, now (None without TLS).
        self._current_root = current_root
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
        self.queue = UpstreamQueue(config.upstream_fetches_per_image, clock)
        self._waiters = Waiters()
        self.swarms = Swarms(
            config, self.metrics, self.auth, self.registry, self.peers, self._waiters, clock
        )
        # Metainfo writes in flight, by digest: a second write waits for the first.
        self._writing: dict[str, trio.Event] = {}
        self.metrics.watch(self._gauges)

    # -- start -----------------------------------------------------------------

    def restore(self, snapshot: Snapshot) -> None:
        """Load what the store kept; records that no longer validate are skipped
        (with TLS: metainfo rooted at a CA that has left ca.crt since)."""
        for bad in snapshot.bad:
            self.registry.mark_bad(bad.digest, bad.info_hash_v2)
        roots = self._torrent_roots()
        for rec in snapshot.metainfo:
            try:
                meta = parse_metainfo(rec.data, Digest.parse(rec.digest), rec.size, roots=roots)
            except (DigestError, MetainfoError):
                continue
            self.registry.install(meta, rec.published_by)
        now, wall = self._clock(), self._wall()
        for sl in snapshot.leases:
            expires_at = now + (sl.expires_at_unix - wall)
            self.leases.restore(
                Lease(sl.digest, sl.lease_id, sl.holder, expires_at, sl.bytes_done, sl.size)
            )

    def check_token(self, token: bytes | None) -> None:
        self.auth.check(token)

    # -- BitTorrent ------------------------------------------------------------

    def announce(
        self,
        req: AnnounceRequest,
        client_ip: str,
        transport: str,
        *,
        identity: str | None = None,
    ) -> AnnounceResponse:
        """`identity`: the client certificate's node under mutual TLS, else None."""
        return self.swarms.announce(req, client_ip, transport, identity=identity)

    def scrape(self, req: ScrapeRequest, transport: str) -> list[tuple[bytes, SwarmStats | None]]:
        """Stats per asked info-hash, in order; None for a torrent nobody registered."""
        return self.swarms.scrape(req, transport)

    def confirm_seed(self, digest_text: str, msg: wire.ConfirmSeed) -> None:
        self.swarms.confirm_seed(digest_text, msg)

    def report_stall(self, digest_text: str, msg: wire.ReportStall) -> None:
        self.swarms.report_stall(digest_text, msg)

    # -- metainfo registry -------------------------------------------------------

    def lookup(self, digest_text: str) -> wire.MetainfoRecord:
        return self.registry.lookup(checked_digest(digest_text))

    async def publish(
        self, digest_text: str, msg: wire.PublishMetainfo
    ) -> tuple[wire.MetainfoRecord, bool]:
        """File metainfo for a digest; returns (record, newly stored)."""
        digest = checked_digest(digest_text)
        meta = self._validate(digest, msg.size, msg.metainfo)
        await self._await_writes(digest)
        try:
            filed = self.registry.check_publish(meta, current_root=self._current_root())
        except errors.MetainfoConflict:
            self.metrics.metainfo_rejected.labels(errors.MetainfoConflict.code).inc()
            raise
        if isinstance(filed, Rerooted):
            return await self._reroot(filed.old, meta, msg.node), True
        if filed is not None:
            # The same torrent from another verified copy: that node confirms it.
            self.confirm_seed(digest, wire.ConfirmSeed(msg.node, meta.info_hash_v2))
            return filed.record, False
        self.registry.reserve(digest)
        try:
            with self._writing_turn(digest):
                await self._store.put_metainfo(self._stored(meta, msg.node))
        finally:
            self.registry.unreserve(digest)
        entry = self.registry.install(meta, msg.node)
        self.metrics.metainfo_published.inc()
        return entry.record, True

    async def _reroot(self, old: Metainfo, meta: Metainfo, node: str) -> wire.MetainfoRecord:
        """A CA rotation: `meta`, rooted at our current CA, takes the place of `old`."""
        digest = str(meta.digest)
        with self._writing_turn(digest):
            await self._store.put_metainfo(self._stored(meta, node))
        entry = self.registry.reroot(old, meta, node)
        # Peers of the old-root torrent cannot verify the new root's members.
        self.peers.drop_swarm(digest)
        self.swarms.admission.forget(digest)
        self.metrics.metainfo_rerooted.inc()
        self._waiters.notify(digest)
        return entry.record

    async def report_bad(self, digest_text: str, msg: wire.ReportBad) -> wire.MetainfoRecord:
        """Replace the stored metainfo `msg.info_hash` with the reporter's own."""
        digest = checked_digest(digest_text)
        replacement = self._validate(digest, msg.size, msg.metainfo)
        await self._await_writes(digest)
        old = self.registry.check_report(digest, msg.info_hash, replacement)
        bad = StoredBad(digest, old.info_hash_v2, msg.node, msg.reason)
        with self._writing_turn(digest):
            await self._store.put_metainfo(self._stored(replacement, msg.node), bad)
        entry = self.registry.replace(old, replacement, msg.node)
        # Peers of the bad torrent cannot help with the good one.
        self.peers.drop_swarm(digest)
        self.swarms.admission.forget(digest)
        self.metrics.metainfo_published.inc()
        self._waiters.notify(digest)
        return entry.record

    async def _await_writes(self, digest: str) -> None:
        """Let a metainfo write in flight for `digest` finish before deciding on it."""
        while (writing := self._writing.get(digest)) is not None:
            await writing.wait()

    @contextmanager
    def _writing_turn(self, digest: str) -> Iterator[None]:
        """Mark a metainfo write for `digest` in flight; call it right after deciding."""
        assert digest not in self._writing, "decide only after _await_writes"
        done = self._writing[digest] = trio.Event()
        try:
            yield
        finally:
            del self._writing[digest]
            done.set()

    def _validate(self, digest: str, size: int, data: bytes) -> Metainfo:
        try:
            return parse_metainfo(
                data,
                Digest.parse(digest),
                size,
                roots=self._torrent_roots(),
                max_bytes=self.config.max_metainfo_bytes,
            )
        except MetainfoError as e:
            too_large = isinstance(e, MetainfoTooLarge)
            err = (errors.MetainfoTooLarge if too_large else errors.InvalidMetainfo)(str(e))
            self.metrics.metainfo_rejected.labels(err.code).inc()
            raise err from None

    def _torrent_roots(self) -> tuple[bytes, ...]:
        """With TLS, torrents must be SSL torrents rooted at a CA of ca.crt (read now:
        a CA rotation adds one without a restart); without TLS, plain torrents only."""
        if self.config.tls_dir is None:
            return ()
        try:
            return (TLSFiles.in_dir(self.config.tls_dir).ca.read_bytes(),)
        except OSError as e:
            raise errors.TrackerUnavailable(f"cannot read ca.crt: {e.strerror}") from None

    def _stored(self, meta: Metainfo, node: str) -> StoredMetainfo:
        return StoredMetainfo(str(meta.digest), meta.size, meta.data, node, self._wall())

    # -- upstream leases ---------------------------------------------------------

    async def acquire_lease(self, digest_text: str, msg: wire.LeaseRequest) -> wire.LeaseReply:
        """Grant, refuse (wait) or point at the swarm; long-polls up to `msg.wait_s`."""
        digest = checked_digest(digest_text)
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
        entry = self.registry.get(digest)
        if entry is not None:
            self.peers.expire_swarm(digest, self._clock())
            if self.peers.seeders(digest):
                reply = wire.LeaseReply(wire.LeaseStatus.SEEDED, metainfo=entry.meta.data)
                return _Attempt(reply, None)
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
            reply = self._lease_reply(wire.LeaseStatus.GRANTED, lease)
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

    def _free_slot(self, lease: Lease) -> None:
        """`lease` stopped using the upstream link: wake its image's queue."""
        for digest in self.queue.waiting(lease.group):
            self._waiters.notify(digest)

    async def renew_lease(
        self, digest_text: str, msg: wire.LeaseRenew, *, holder: str | None = None
    ) -> wire.LeaseReply:
        """Renew with progress; `holder` (a certificate's node) must be the lease's."""
        digest = checked_digest(digest_text)
        before = self.leases.current(digest)
        lease = self.leases.renew(digest, msg.lease_id, msg.bytes_done, msg.size, holder=holder)
        await self._store.save_lease(self._stored_lease(lease))
        if lease.fetched and before is not None and not before.fetched:
            self._free_slot(lease)
        return self._lease_reply(wire.LeaseStatus.GRANTED, lease)

    async def release_lease(
        self, digest_text: str, msg: wire.LeaseRelease, *, holder: str | None = None
    ) -> None:
        digest = checked_digest(digest_text)
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
        self.swarms.admission.sweep()
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
            peers_cooling=self.swarms.admission.cooling_count(),
        )
