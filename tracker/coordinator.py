"""The tracker's service: announces, the metainfo registry and leases, composed over one store.

`Tracker` is the composition root: it wires the sans-IO parts together —
`ClusterAuth`, the `PeerTable` swarms, the `MetainfoRegistry` and its disputes'
`Quarantines` (applied by `Publishing`), the `LeaseBook` and the
`UpstreamQueue` — with the durable `TrackerStore` and the `Waiters` of
long-polled requests, and hands each service its parts: `Swarms` (announces),
`Publishing` and `ChunkTorrents` (metainfo), `LeaseDesk` (leases). Announce and
scrape are synchronous: the hot path never awaits. A control operation decides
on memory synchronously (trio runs nothing else in between), then awaits its
store commit without holding anything that others wait for: only a second
metainfo write for the same digest waits for the first one's outcome.
Transports (bittorrent.py, http_routes.py) parse requests and encode answers;
this module must not know about sockets, HTTP or encodings, holds no policy of
its own (the parts above do) and raises only `p2preg.core.errors`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import trio

from p2preg.core import errors, wire
from tracker.admission import announce_identity
from tracker.announce import AnnounceRequest, AnnounceResponse, ScrapeRequest, SwarmStats
from tracker.auth import ClusterAuth
from tracker.chunk_torrents import ChunkTorrents
from tracker.config import TrackerConfig
from tracker.disputes import Quarantines
from tracker.expiry import IdleMetainfo
from tracker.images import ImageIndex
from tracker.lagmeter import LagMeter
from tracker.lease_desk import LeaseDesk
from tracker.leases import LeaseBook, RateRule
from tracker.manifest_shelf import ManifestShelf, check_put
from tracker.metrics import Gauges, TrackerMetrics
from tracker.peers import PeerTable
from tracker.publishing import Publishing
from tracker.quotas import Kind, Quotas
from tracker.registry import MetainfoRegistry
from tracker.state import Snapshot, StoredConfirmation, TrackerStore
from tracker.swarms import Swarms, checked_digest
from tracker.tags import TagBook, TagKey, checked, query_key
from tracker.upstream_queue import UpstreamQueue
from tracker.waiters import Waiters

log = logging.getLogger("p2preg.tracker")
# How often the sweeper drops expired peers and leases, at most.
MAX_SWEEP_INTERVAL_S = 5.0
# Seed confirmations one lease request may carry (more are left for their own calls).
MAX_RIDING_CONFIRMS = 64


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
        self.lag = lag_meter(config, clock)  # the tracker's lateness, forgiven by the leases
        self.leases = lease_book(config, clock, self.lag)
        self.quarantines = Quarantines(config.dispute_quarantine_s, clock)
        self.queue = UpstreamQueue(
            config.upstream_fetches_per_image, clock, handoff_s=config.upstream_handoff_s
        )
        self.images = ImageIndex()  # what the cluster page shows of images; decides nothing
        self.tags = TagBook(config.max_tag_answers)
        # Kept past the book's bounds (lowered since): forgotten with the next report.
        self._tags_dropped: list[TagKey] = []
        self.manifests = ManifestShelf(config.max_manifests, config.max_manifest_store_bytes)
        self._waiters = Waiters()
        self.quotas = Quotas.from_config(config, clock, self.metrics)
        self.idle = IdleMetainfo(config.metainfo_idle_expiry_s, config.pinned_digests)
        self.swarms = Swarms(
            config, self.metrics, self.auth, self.registry, self.peers, self._waiters, clock
        )
        self.desk = self._lease_desk(store, clock, wall_clock)
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
            drop_lease=self.desk.drop,
            passed_from=self.leases.passed_from,
            drop_swarm=self._drop_swarm,
            notify=self._waiters.notify,
            confirm=self.confirm_seed,
        )
        self.chunks = ChunkTorrents(
            self.registry,
            self.quarantines,
            self.metrics,
            clock=clock,
            wall_clock=wall_clock,
            put=store.put_chunks,
            max_metainfo=config.max_metainfo,
            validate=self.publishing.validate,
            lease_of=self.leases.current,
            drop_lease=self.desk.drop,
            drop_swarm=self._drop_swarm,
            notify=self._waiters.notify,
            wait=self._waiters.wait,
            lag=self.lag,
            swarms=self.swarms,
        )
        self.metrics.watch(self._gauges)

    def _lease_desk(
        self, store: TrackerStore, clock: Callable[[], float], wall_clock: Callable[[], float]
    ) -> LeaseDesk:
        """The lease desk over the parts made before it; `chunks`, made after it (it
        drops leases through the desk), is reached when a request comes."""
        return LeaseDesk(
            self.config,
            store,
            self.metrics,
            leases=self.leases,
            queue=self.queue,
            waiters=self._waiters,
            images=self.images,
            registry=self.registry,
            chunk_dispute=lambda digest: self.chunks.dispute(digest),
            manifests=self.manifests,
            peers=self.peers,
            admission=self.swarms.admission,
            quarantines=self.quarantines,
            clock=clock,
            wall_clock=wall_clock,
        )

    # -- start -----------------------------------------------------------------

    def restore(self, snapshot: Snapshot) -> None:
        """Load what the store kept (see Publishing.restore for metainfo)."""
        self.publishing.restore(snapshot)
        self._tags_dropped = self.tags.restore(snapshot.tags)
        self.manifests.restore(snapshot.manifests)
        self.chunks.restore(snapshot.chunks)
        self.desk.restore(snapshot.leases)
        for c in snapshot.confirmations:  # those of a torrent replaced since are void
            entry = self.registry.get(c.digest)
            if entry is not None and entry.meta.info_hash_v2 == c.info_hash:
                try:
                    self.swarms.admission.confirm(c.digest, c.info_hash, c.identity)
                except errors.LimitReached:
                    log.warning("tracker: admission records full; %d confirmations not loaded",
                                len(snapshot.confirmations))
                    break

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

    async def confirm_seed(
        self, digest_text: str, msg: wire.ConfirmSeed, client_ip: str | None = None
    ) -> bool:
        """Count `msg.node` as a seeder of the digest's torrent, across restarts too; with
        its port (and its address, `client_ip`), its peer is in the swarm as one now.
        Whether that is news (not confirmed before)."""
        news = self.swarms.confirm_seed(digest_text, msg)
        if msg.port and client_ip is not None:
            self.swarms.enter(checked_digest(digest_text), msg.node, client_ip, msg.port,
                              seeding=True, by="confirm")  # fmt: skip
        if news is not None:
            await self._store.put_confirmation(StoredConfirmation(*news, msg.node))
        return news is not None

    async def confirm_riding(
        self, msg: wire.LeaseRequest | wire.ConfirmSeed, who: str, client_ip: str | None = None
    ) -> list[str]:
        """The seed confirmations riding `msg` (a lease request, or another confirmation),
        each taken as its own call would be (charged to `who`'s publish quota); the
        digests taken. One refused (an unknown or replaced torrent, the quota spent) is
        left out: the node sends it alone and learns why."""
        taken: list[str] = []
        riding = zip(msg.confirm_digests or [], msg.confirm_hashes or [], strict=False)
        for digest_text, info_hash in list(riding)[:MAX_RIDING_CONFIRMS]:
            confirm = wire.ConfirmSeed(msg.node, info_hash, msg.port)
            try:
                self.quotas.take(Kind.PUBLISH, who, len(wire.encode(confirm)))
                news = await self.confirm_seed(digest_text, confirm, client_ip)
            except errors.TrackerError:
                continue
            taken.append(digest_text)
            if news:  # as `seed_confirms` counts
                self.metrics.riding_confirms.inc()
        return taken

    def report_stall(self, digest_text: str, msg: wire.ReportStall) -> None:
        self.swarms.report_stall(digest_text, msg)

    def _drop_swarm(self, digest: str) -> None:
        """The digest's torrent changed: its peers and their confirmations go."""
        self.peers.drop_swarm(digest)
        self.swarms.admission.forget(digest)

    # -- metainfo registry -------------------------------------------------------

    def lookup(self, digest_text: str) -> wire.MetainfoRecord:
        return self.registry.lookup(checked_digest(digest_text))

    async def publish(
        self, digest_text: str, msg: wire.PublishMetainfo, client_ip: str | None = None
    ) -> tuple[wire.MetainfoRecord, bool]:
        """File metainfo for a digest; returns (record, newly stored). With the sender's
        port (and address, `client_ip`), its peer is in the swarm as a seeder if it
        counts as one, which the record says (`seeding`)."""
        digest = checked_digest(digest_text)
        record, created = await self.publishing.publish(digest, msg)
        await self.chunks.blob_verified(digest, msg.node)
        if msg.port and client_ip is not None and record.metainfo == msg.metainfo:
            entered = self.swarms.enter(digest, msg.node, client_ip, msg.port,
                                        seeding=True, by="publish")  # fmt: skip
            if entered is not None and entered.seeder:
                record = dataclasses.replace(record, seeding=True, peers=entered.peers,
                                             announce_interval_s=entered.interval_s,
                                             seeders=entered.seeders,
                                             leechers=entered.leechers)  # fmt: skip
        return record, created

    async def report_bad(self, digest_text: str, msg: wire.ReportBad) -> wire.MetainfoRecord:
        return await self.publishing.report_bad(checked_digest(digest_text), msg)

    # -- tag answers ---------------------------------------------------------------

    async def tag_seen(self, msg: wire.TagSeen, *, identity: str) -> None:
        """Keep what `identity`'s seed registry said of a tag: the cluster's last answer."""
        record = checked(msg, identity, self._wall())
        dropped = [*self._tags_dropped, *self.tags.put(record)]
        self._tags_dropped = []
        self.metrics.tag_reports.inc()
        await self._store.put_tag(record, dropped)

    def tag_query(self, msg: wire.TagQuery) -> wire.TagAnswer:
        answer = self.tags.answer(query_key(msg), self._wall())
        self.metrics.tag_answers["unknown" if answer.digest is None else "answered"].inc()
        return answer

    # -- manifest shelf ----------------------------------------------------------

    async def put_manifest(self, digest_text: str, msg: wire.PutManifest) -> bool:
        """Shelve a manifest body the tracker verified itself; returns whether it is new."""
        digest = checked_digest(digest_text)
        place = check_put(digest, msg)
        put = self.manifests.put(digest, msg.media_type, msg.body, place, self._wall())
        if not put.changed:
            return False
        dropped = self.manifests.drops()
        try:
            await self._store.put_manifest(put.record, dropped)
        except BaseException:
            if put.created:  # not durable, not shelved (the next commit says so)
                self.manifests.forget(digest)
            raise
        self.manifests.committed(dropped)
        self._waiters.notify(digest)  # nodes waiting on its lease take it from the shelf
        return put.created

    def get_manifest(self, digest_text: str) -> wire.ManifestBody:
        found = self.manifests.get(checked_digest(digest_text))
        self.metrics.manifest_lookup["miss" if found is None else "hit"].inc()
        if found is None:
            raise errors.NotFound(f"no manifest {digest_text[:160]} on the shelf")
        return wire.ManifestBody(found.media_type, found.body, list(found.places))

    # -- upstream leases ---------------------------------------------------------

    async def acquire_lease(
        self,
        digest_text: str,
        msg: wire.LeaseRequest,
        *,
        identity: str | None = None,
        client_ip: str | None = None,
    ) -> wire.LeaseReply:
        """Grant, refuse (wait) or point at the swarm (`LeaseDesk.acquire`). A SEEDED
        answer to a request with the asker's port (and address, `client_ip`) enters it
        in the swarm as a downloader and names its peers."""
        reply = await self.desk.acquire(digest_text, msg, identity=identity)
        if reply.status is not wire.LeaseStatus.SEEDED or reply.metainfo is None:
            return reply
        if not msg.port or client_ip is None:
            return reply
        who = announce_identity(identity, msg.node, client_ip)
        entered = self.swarms.enter(checked_digest(digest_text), who, client_ip, msg.port,
                                    seeding=False, by="lease")  # fmt: skip
        if entered is None or not entered.peers:
            return reply
        return dataclasses.replace(reply, peers=entered.peers,
                                   announce_interval_s=entered.interval_s,
                                   seeder_interval_s=self.swarms.seeder_interval())  # fmt: skip

    async def renew_lease(
        self, digest_text: str, msg: wire.LeaseRenew, *, identity: str | None = None
    ) -> wire.LeaseReply:
        """Renew with progress; `identity` (the caller's), when known, must be the holder."""
        return await self.desk.renew(digest_text, msg, identity=identity)

    async def release_lease(
        self, digest_text: str, msg: wire.LeaseRelease, *, identity: str | None = None
    ) -> None:
        await self.desk.release(digest_text, msg, identity=identity)

    # -- housekeeping ------------------------------------------------------------

    async def sweep_forever(self) -> None:
        """Drop expired peers and leases, and wake the waiters of silent lease holders,
        forever; run it in the tracker's nursery."""
        interval = min(
            MAX_SWEEP_INTERVAL_S, self.config.peer_ttl_s / 4, self.config.lease_ttl_s / 2
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.desk.watch_silence)
            nursery.start_soon(self.lag.run)
            while True:
                await trio.sleep(interval)
                try:
                    await self.sweep()
                except errors.TrackerUnavailable as e:  # the store: the next sweep tries again
                    log.warning("tracker: sweep stopped short: %s", e)

    async def sweep(self) -> None:
        now = self._clock()
        for table in (self.peers, self.swarms.chunk_peers):
            for n, key in enumerate(table.keys()):
                table.expire_swarm(key, now)
                if n % 1000 == 999:
                    await trio.lowlevel.checkpoint()  # let announces through on big trackers
        self.swarms.admission.sweep()
        await self.desk.expire()
        await self.chunks.expire()
        for digest in self.idle.expired(self.registry.digests, self._in_use, now):
            if await self.publishing.forget(digest):
                self.swarms.admission.forget(digest)  # its confirmations and reports
                self.metrics.metainfo_expired.inc()

    def wake_silent(self) -> None:
        """A silent holder gives up its image's slot, and its blob may pass on now."""
        self.desk.wake_silent()

    def _in_use(self, d: str) -> bool:  # for expiry: announced, fetched, filed or disputed
        if self.publishing.writing(d) or self.registry.dispute(d) is not None:
            return True
        return bool(self.peers.swarm(d) or self.leases.current(d))

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
            manifests=len(self.manifests),
            manifest_bytes=self.manifests.bytes,
            lag_s=self.lag(),
            lag_total_s=self.lag.total_s,
        )


def lease_book(config: TrackerConfig, clock: Callable[[], float], lag: LagMeter) -> LeaseBook:
    """The lease book held to the configured TTL, minimum rate, cap and windows."""
    return LeaseBook(
        config.lease_ttl_s,
        clock,
        rate=RateRule(config.lease_min_rate_bytes_s, config.lease_rate_window_s),
        max_per_holder=config.max_leases_per_node,
        silence_s=config.lease_silence_s,
        grant_ack_s=config.lease_grant_ack_s,
        lag=lag,
    )


def lag_meter(config: TrackerConfig, clock: Callable[[], float]) -> LagMeter:
    """A lag is held for the longer lease window (a renewal that waited behind it is
    read within it), and bounded by the TTL, which ends a lease whatever the lag."""
    hold_s = max(config.lease_silence_s, config.lease_grant_ack_s, 1.0)
    return LagMeter(clock, hold_s=hold_s, max_s=config.lease_ttl_s)
