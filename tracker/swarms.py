"""The BitTorrent side of the tracker's service: announces, scrapes, who seeds, who stalls.

`Swarms` answers announces and scrapes over the `PeerTable` and applies
`Admission`'s rules: one peer per identity per swarm, a `left=0` announce counted
as a seeder only for an identity that published or confirmed the torrent, and
a peer delisted once enough identities reported it stalling them; each answer's
interval and the peer's lifetime follow intervals.py. A blob's chunk torrents
share one table entry per node, `chunk_peers` keyed by the blob: a read of the
chunk list enters the reader, a filed chunk its holder, and the list hands them
out in place of those torrents' announces (chunk_torrents.py). It wakes the
lease waiters of a digest whose first counted seeder appears (the coordinator
owns the waiters and the leases). Synchronous: the announce hot path never
awaits. It must not know sockets, HTTP or encodings, and holds no rule of its
own (admission.py, peers.py and handout.py do).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

from p2preg.core import errors, wire
from p2preg.core.digest import Digest, DigestError
from tracker.admission import Admission, announce_identity
from tracker.announce import AnnounceRequest, AnnounceResponse, Event, ScrapeRequest, SwarmStats
from tracker.auth import ClusterAuth
from tracker.config import TrackerConfig
from tracker.handout import hand_out
from tracker.intervals import AnnounceIntervals, Cadence
from tracker.metrics import TrackerMetrics
from tracker.peers import PeerTable, Swarm, compact_address
from tracker.registry import MetainfoRegistry
from tracker.waiters import Waiters

log = logging.getLogger("p2preg.tracker")


class Swarms:
    def __init__(
        self,
        config: TrackerConfig,
        metrics: TrackerMetrics,
        auth: ClusterAuth,
        registry: MetainfoRegistry,
        peers: PeerTable,
        waiters: Waiters,
        clock: Callable[[], float],
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._config = config
        self._metrics = metrics
        self._auth = auth
        self._registry = registry
        self._peers = peers
        self._waiters = waiters
        self._clock = clock
        # Peers of chunk swarms, per blob: not persisted (a reader enters again at its
        # next read, seconds later; a takeover costs nothing more than that).
        self.chunk_peers = PeerTable(
            max_peers_per_swarm=config.max_peers_per_swarm, max_peers=config.max_peers
        )
        self._admission = Admission(
            stall_window_s=config.stall_window_s,
            stall_cooloff_s=config.stall_cooloff_s,
            stall_reporters=config.stall_reporters,
            max_entries=config.max_peers,
            clock=clock,
        )
        self.intervals = AnnounceIntervals(
            interval_s=config.announce_interval_s,
            seeder_interval_s=config.seeder_announce_interval_s,
            peer_ttl_s=config.peer_ttl_s,
            jitter=jitter,
        )

    @property
    def admission(self) -> Admission:
        return self._admission

    def announce(
        self,
        req: AnnounceRequest,
        client_ip: str,
        transport: str,
        *,
        identity: str | None = None,
    ) -> AnnounceResponse:
        """`identity`: the client certificate's node under mutual TLS, else None."""
        self._metrics.announce[transport, req.event].inc()
        self._auth.check(req.token)
        digest = self._registry.digest_of(req.info_hash)
        if digest is None:
            raise errors.UnknownTorrent("unregistered info_hash: publish its metainfo first")
        ip = self._auth.peer_ip(client_ip, req.claimed_ip)
        compact = compact_address(ip, req.port)
        who = announce_identity(identity, req.node, ip)
        cfg = self._config
        if req.event is Event.STOPPED:
            self._peers.remove(digest, who, req.peer_id)
            return self._answer(self._peers.swarm(digest), [], self.intervals.short)
        seeder, swarm, cadence = self._admit(digest, who, req, compact)
        if swarm is not None and req.event is Event.COMPLETED:
            swarm.downloaded += 1
        numwant = req.numwant if req.numwant is not None else cfg.default_numwant
        picked = [] if swarm is None else hand_out(
            swarm.seeder_addrs,
            swarm.leecher_addrs,
            min(numwant, cfg.max_numwant),
            asker=compact,
            asker_is_seeder=seeder,
        )
        return self._answer(swarm, picked, cadence)

    def _admit(
        self, digest: str, who: str, req: AnnounceRequest, compact: bytes
    ) -> tuple[bool, Swarm | None, Cadence]:
        """Enter `who`'s one peer into the swarm (unless it is cooling off); whether it
        counts as a seeder (admission.py), the swarm and the cadence, for the answer."""
        entry = self._registry.get(digest)
        claims = req.left == 0
        if self._admission.cooling(digest, who):
            # Delisted for stalling others: it may still download, but is not handed out.
            self._peers.remove(digest, who)
            return False, self._peers.swarm(digest), self.intervals.short
        seeder = claims and entry is not None and self._admission.is_seeder(
            digest, entry.meta.info_hash_v2, who, entry.published_by
        )
        if claims and not seeder:
            self._metrics.unconfirmed_seeds.inc()
        known = self._peers.claims_seed(digest, who)
        cadence = self.intervals.choose(seeding=claims, event=req.event, known_seeder=known)
        now = self._clock()
        swarm, _, replaced = self._peers.update(
            digest, who, req.peer_id, compact, seeder=seeder, claims_seed=claims,
            expires_at=now + cadence.ttl_s, announced=(now, req.uploaded, req.downloaded),
        )
        if replaced:
            self._metrics.peers_replaced.inc()
        if seeder and len(swarm.seeders) == 1 and digest in self._waiters:
            # The swarm's first seeder: nodes waiting for a lease can join it.
            self._waiters.notify(digest)
        return seeder, swarm, cadence

    def _answer(
        self, swarm: Swarm | None, peers: list[bytes], cadence: Cadence
    ) -> AnnounceResponse:
        seeders, leechers = (0, 0) if swarm is None else (len(swarm.seeders), len(swarm.leechers))
        return AnnounceResponse(
            cadence.interval_s, self._config.min_announce_interval_s, seeders, leechers, peers
        )

    def confirm_seed(self, digest_text: str, msg: wire.ConfirmSeed) -> tuple[str, bytes] | None:
        """`msg.node` verified the blob of the current torrent: count it as a seeder.
        Returns (digest, the torrent's v2 info-hash) when that is news, to be kept."""
        digest = checked_digest(digest_text)
        entry = self._registry.get(digest)
        if entry is None:
            raise errors.NotFound(f"no metainfo for {digest}")
        if msg.info_hash not in (entry.meta.info_hash_v2, *entry.meta.swarm_keys):
            raise errors.MetainfoConflict("that torrent is not the one filed for the digest")
        if not self._admission.confirm(digest, entry.meta.info_hash_v2, msg.node):
            return None
        self._metrics.seed_confirms.inc()
        promoted = not self._admission.cooling(digest, msg.node) and self._peers.promote(
            digest, msg.node
        )
        if promoted and self._peers.seeders(digest) == 1:
            self._waiters.notify(digest)
        return digest, entry.meta.info_hash_v2

    def enter(
        self, digest: str, who: str, client_ip: str, port: int, *, seeding: bool, by: str
    ) -> Entered | None:
        """`who`'s peer at `client_ip`:`port` entered in `digest`'s swarm by a control call
        `by` that stands for its announce: a SEEDED lease answer (a downloader: its
        `started`), a seed confirmation or a published torrent (`seeding`: its
        `completed`, or a seeder's start). The entry is an announce's (one peer per
        identity, admission's seeder rule, none while it cools off); a counted
        seeder verified its bytes, so it gets a known seeder's cadence at once, the
        others a downloader's. None if nobody was entered (a full table, say): the
        caller's announce then must."""
        compact = _listening_at(client_ip, port)
        entry = self._registry.get(digest)
        if entry is None or self._admission.cooling(digest, who):
            return None
        seeder = seeding and self._admission.is_seeder(
            digest, entry.meta.info_hash_v2, who, entry.published_by
        )
        now = self._clock()
        cadence = self.intervals.choose(seeding=seeder, event=Event.NONE, known_seeder=seeder)
        try:
            swarm, _, _ = self._peers.update(digest, who, b"", compact, seeder=seeder,
                                             claims_seed=seeding,
                                             expires_at=now + cadence.ttl_s,
                                             announced=(now, 0, 0))  # fmt: skip
        except errors.LimitReached:
            return None
        self._metrics.peers_entered.labels(by).inc()
        if seeder and len(swarm.seeders) == 1 and digest in self._waiters:
            self._waiters.notify(digest)
        # As for an announce: seeders first; a seeder gets the downloaders, to dial them.
        peers = hand_out(swarm.seeder_addrs, swarm.leecher_addrs, self._config.default_numwant,
                         asker=compact, asker_is_seeder=seeder)  # fmt: skip
        return Entered(seeder, peers, cadence.interval_s, len(swarm.seeders), len(swarm.leechers))

    def seeder_interval(self) -> int:
        """A known seeder's next announce, jittered (intervals.py): what a downloader
        the tracker entered answers its own completion with."""
        return self.intervals.choose(seeding=True, event=Event.NONE, known_seeder=True).interval_s

    def join_chunks(
        self, blob: str, who: str, client_ip: str, port: int, *, holder: bool
    ) -> None:
        """Enter `who`'s peer at `client_ip`:`port` in `blob`'s chunk swarms, as the
        holder filing chunks or a reader of the list, for `peer_ttl_s`; one peer per
        identity, and none while it cools off for stalling others (as `announce`).
        A full table enters nobody: the reader still gets its list."""
        compact = _listening_at(client_ip, port)
        if self._admission.cooling(blob, who):
            self.chunk_peers.remove(blob, who)
            return
        now = self._clock()
        try:
            self.chunk_peers.update(blob, who, b"", compact, seeder=holder, claims_seed=holder,
                                    expires_at=now + self._config.peer_ttl_s,
                                    announced=(now, 0, 0))  # fmt: skip
        except errors.LimitReached:
            self._metrics.chunk_peers_refused.inc()

    def hand_out_chunks(self, blob: str, who: str | None) -> list[bytes]:
        """Peers of `blob`'s chunk swarms for `who` (never its own): holders first."""
        swarm = self.chunk_peers.swarm(blob)
        if swarm is None:
            return []
        own = None if who is None else swarm.by_key.get(who)
        return hand_out(swarm.seeder_addrs, swarm.leecher_addrs, self._config.default_numwant,
                        asker=None if own is None else own.compact)  # fmt: skip

    def report_stall(self, digest_text: str, msg: wire.ReportStall) -> None:
        """`msg.node` says the peer at `msg.peer` stalled it; enough such reports delist it
        (a peer of the blob's own swarm, else of its chunk swarms)."""
        digest = checked_digest(digest_text)
        target = self._peers.holder_of(digest, msg.peer)
        if target is None:
            target = self.chunk_peers.holder_of(digest, msg.peer)
        if target is None:
            self._metrics.stall_reports["unknown_peer"].inc()
            return
        verdict = self._admission.report_stall(digest, target, msg.node)
        outcome = "delisted" if verdict.delisted else "counted" if verdict.counted else "ignored"
        self._metrics.stall_reports[outcome].inc()
        if verdict.delisted:
            self._peers.remove(digest, target)
            self.chunk_peers.remove(digest, target)
            log.warning(
                "swarm %s: %r delisted for %.0f s: stall reports from %d identities",
                digest, target, self._config.stall_cooloff_s, self._config.stall_reporters,
            )

    def scrape(self, req: ScrapeRequest, transport: str) -> list[tuple[bytes, SwarmStats | None]]:
        """Stats per asked info-hash, in order; None for a torrent nobody registered."""
        self._metrics.scrape[transport].inc()
        self._auth.check(req.token)
        out: list[tuple[bytes, SwarmStats | None]] = []
        for ih in req.info_hashes:
            digest = self._registry.digest_of(ih)
            swarm = None if digest is None else self._peers.swarm(digest)
            if digest is None:
                out.append((ih, None))
            elif swarm is None:
                out.append((ih, SwarmStats(0, 0, 0)))
            else:
                stats = SwarmStats(len(swarm.seeders), len(swarm.leechers), swarm.downloaded)
                out.append((ih, stats))
        return out


@dataclass(frozen=True, slots=True)
class Entered:
    """What `Swarms.enter` did: whether the peer counts as a seeder, the peers and the
    interval its stood-for announce would have been told."""

    seeder: bool
    peers: list[bytes]
    interval_s: int
    seeders: int  # the swarm's counts, this peer in them
    leechers: int


def _listening_at(client_ip: str, port: int) -> bytes:
    """The compact entry of a peer a control call names by its port (the connection's
    address); InvalidRequest for a port no peer listens on."""
    if not 0 < port < 1 << 16:
        raise errors.InvalidRequest(f"port must be 1 to 65535, got {port}")
    return compact_address(client_ip, port)


def checked_digest(text: str) -> str:
    """A digest from a request path, canonical; InvalidRequest if it is not one."""
    try:
        return str(Digest.parse(text))
    except DigestError as e:
        raise errors.InvalidRequest(str(e)) from None
