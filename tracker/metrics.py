"""Prometheus metrics of one tracker instance, on its own registry.

Counters are incremented where things happen (children are bound once, so the
announce path pays one dict lookup and one `inc`); gauges — swarms, peers,
seeders, metainfo, leases — are read from the live objects at scrape time by a
collector, so the hot path never maintains them. A registry per instance, not
prometheus-client's global one, lets several trackers live in one test
process. This module must not hold tracker state of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tracker.announce import Event
from tracker.disputes import OUTCOMES
from tracker.quotas import CONNECTION_REFUSALS, QUOTA_KINDS
from tracker.tls_gate import REFUSAL_REASONS

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TRANSPORTS = ("http", "udp")
LEASE_REFUSALS = ("lease_cap", "bad_progress")
STALL_OUTCOMES = ("counted", "ignored", "unknown_peer", "delisted")
# How a standby's forwarded announce ended (tracker/fronts.py) ...
FRONT_RESULTS = ("answered", "no_term", "busy", "timeout", "unreachable", "refused")
# ... and what the serving replica did with forwarded ones.
FORWARDED_RESULTS = ("applied", "refused")
# What became of batches of announces a node's relay sent (fronts.answer_relayed).
RELAYED_RESULTS = ("applied", "forwarded", "refused")


@dataclass(frozen=True, slots=True)
class Gauges:
    swarms: int
    peers: int
    seeders: int
    metainfo: int
    leases: int
    lease_grants: int
    lease_expiries: int
    peers_cooling: int = 0
    manifests: int = 0
    manifest_bytes: int = 0
    lag_s: float = 0.0
    lag_total_s: float = 0.0


class _LiveCollector(Collector):
    def __init__(self, read: Callable[[], Gauges]) -> None:
        self.read = read

    def collect(self) -> Iterator[Metric]:
        g = self.read()
        for name, doc, value in (
            ("swarms", "Swarms with at least one live peer", g.swarms),
            ("peers", "Live peers over all swarms", g.peers),
            ("seeders", "Live seeders over all swarms", g.seeders),
            ("metainfo", "Blob digests with registered metainfo", g.metainfo),
            ("leases", "Upstream leases currently held", g.leases),
            ("peers_cooling", "Peers delisted for stalling others, cooling off", g.peers_cooling),
            ("manifests", "Manifest bodies on the shelf", g.manifests),
            ("manifest_bytes", "Bytes of manifest bodies on the shelf", g.manifest_bytes),
            ("lag_seconds", "The tracker's own lag, added to the lease windows", g.lag_s),
        ):
            yield GaugeMetricFamily(f"p2preg_tracker_{name}", doc, value=value)
        yield CounterMetricFamily(
            "p2preg_tracker_lease_grants", "Upstream leases granted", value=g.lease_grants
        )
        yield CounterMetricFamily(
            "p2preg_tracker_lease_expiries", "Upstream leases that expired", value=g.lease_expiries
        )
        yield CounterMetricFamily(
            "p2preg_tracker_loop_late_seconds", "Time the tracker's loop ran late, summed",
            value=g.lag_total_s,
        )


class TrackerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._live: _LiveCollector | None = None
        announces = Counter(
            "p2preg_tracker_announces",
            "Announces answered (failures included)",
            ["transport", "event"],
            registry=self.registry,
        )
        self.announce = {
            (t, e): announces.labels(t, e.name.lower()) for t in TRANSPORTS for e in Event
        }
        scrapes = Counter(
            "p2preg_tracker_scrapes", "Scrapes answered", ["transport"], registry=self.registry
        )
        self.scrape = {t: scrapes.labels(t) for t in TRANSPORTS}
        failures = Counter(
            "p2preg_tracker_failures",
            "BitTorrent requests refused, by error code",
            ["transport", "code"],
            registry=self.registry,
        )
        self.failure = failures.labels
        self.metainfo_published = Counter(
            "p2preg_tracker_metainfo_published",
            "Metainfo accepted (new, or replacing one that lost a dispute)",
            registry=self.registry,
        )
        self._chunk_metrics()
        self.metainfo_rerooted = Counter(
            "p2preg_tracker_metainfo_rerooted",
            "Metainfo replaced by one rooted at the tracker's current CA (a CA rotation)",
            registry=self.registry,
        )
        self.metainfo_rejected = Counter(
            "p2preg_tracker_metainfo_rejected",
            "Metainfo refused, by error code",
            ["code"],
            registry=self.registry,
        )
        self.lease_replacements = Counter(
            "p2preg_tracker_lease_replacements",
            "Upstream fetches handed to another node: the holder fell below the minimum rate",
            registry=self.registry,
        )
        self.lease_refused = Counter(
            "p2preg_tracker_lease_refused",
            "Lease requests and renewals refused: lease_cap (a node at its open-lease cap), "
            "bad_progress (progress backwards or past the size)",
            ["reason"],
            registry=self.registry,
        )
        for reason in LEASE_REFUSALS:
            self.lease_refused.labels(reason)
        disputes = Counter(
            "p2preg_tracker_disputes",
            "Disputes over a digest's torrent: opened, and settled by verification",
            ["outcome"],
            registry=self.registry,
        )
        self.disputes = {o: disputes.labels(o) for o in OUTCOMES}
        refusals = Counter(
            "p2preg_tracker_tls_refusals",
            "Connections refused by the mutual-TLS gate, by reason",
            ["reason"],
            registry=self.registry,
        )
        # Every reason exists from the start, at 0: a fixed, small label set.
        self.tls_refusal = {r: refusals.labels(r) for r in REFUSAL_REASONS}
        handshakes = Counter(
            "p2preg_tracker_tls_handshakes",
            "Mutual-TLS handshakes admitted, by whether they resumed a TLS session",
            ["resumed"],
            registry=self.registry,
        )
        self.tls_handshake = {r: handshakes.labels(str(r).lower()) for r in (False, True)}
        for part in (self._admission, self._limits, self._replicas, self._fronts, self._queue):
            part()

    def _chunk_metrics(self) -> None:
        self.chunks_published = Counter(
            "p2preg_tracker_chunks_published",
            "Chunk torrents filed by the holders of their blobs' leases",
            registry=self.registry,
        )
        self.chunk_reports = Counter(
            "p2preg_tracker_chunk_reports",
            "Reports that a blob's chunks did not assemble into it (its records dropped)",
            registry=self.registry,
        )
        self.peers_entered = Counter(
            "p2preg_tracker_peers_entered",
            "Peers entered in a swarm by a control call that stands for their announce: "
            "a SEEDED lease answer, a seed confirmation, a published torrent",
            ["by"],
            registry=self.registry,
        )
        self.chunk_peers_refused = Counter(
            "p2preg_tracker_chunk_peers_refused",
            "Readers and holders of chunk lists not entered as peers of the blob's chunk "
            "swarms: the peer table was full",
            registry=self.registry,
        )
        self.chunk_polls = Counter(
            "p2preg_tracker_chunk_polls",
            "Chunk list requests, by how they were answered: at once, news while held, "
            "or the wait ran out",
            ["answer"],
            registry=self.registry,
        )

    def _admission(self) -> None:
        """Who counts as a seeder, and stall reports (tracker/admission.py)."""
        self.peers_replaced = Counter(
            "p2preg_tracker_peers_replaced",
            "Announces that replaced their identity's peer (another peer id or port)",
            registry=self.registry,
        )
        self.unconfirmed_seeds = Counter(
            "p2preg_tracker_unconfirmed_seeds",
            "left=0 announces not counted as a seeder (identity neither published nor confirmed)",
            registry=self.registry,
        )
        self.seed_confirms = Counter(
            "p2preg_tracker_seed_confirms",
            "Identities that confirmed a torrent (downloaded and verified it)",
            registry=self.registry,
        )
        self.riding_confirms = Counter(
            "p2preg_tracker_riding_confirms",
            "Seed confirmations taken with a lease request or another confirmation instead of"
            " a call of their own",
            registry=self.registry,
        )
        stalls = Counter(
            "p2preg_tracker_stall_reports",
            "Stall reports, by outcome: counted, ignored, unknown_peer, delisted",
            ["outcome"],
            registry=self.registry,
        )
        self.stall_reports = {o: stalls.labels(o) for o in STALL_OUTCOMES}

    def _limits(self) -> None:
        """Quotas, caps and expiry (tracker/quotas.py; the coordinator's sweep)."""
        quota = Counter(
            "p2preg_tracker_quota_refusals",
            "Control requests refused (429) because their identity was over its quota, by kind",
            ["kind"],
            registry=self.registry,
        )
        self.quota_refusal = {k: quota.labels(k) for k in QUOTA_KINDS}
        refused = Counter(
            "p2preg_tracker_connections_refused",
            "Connections closed unanswered because of a pre-authentication cap, by cap",
            ["reason"],
            registry=self.registry,
        )
        self.connection_refusal = {r: refused.labels(r) for r in CONNECTION_REFUSALS}
        self.preauth_connections = Gauge(
            "p2preg_tracker_preauth_connections",
            "Connections that have not completed a request or TLS handshake yet",
            registry=self.registry,
        )
        self.long_polls = Gauge(
            "p2preg_tracker_long_polls", "Lease requests held open", registry=self.registry
        )
        self.long_polls_shortened = Counter(
            "p2preg_tracker_long_polls_shortened",
            "Lease requests answered at once because a long-poll cap was reached",
            registry=self.registry,
        )
        self.metainfo_expired = Counter(
            "p2preg_tracker_metainfo_expired",
            "Metainfo forgotten because no peer announced its digest for metainfo_idle_expiry_s",
            registry=self.registry,
        )
        lookups = Counter(
            "p2preg_tracker_manifest_lookups",
            "Manifest bodies asked for by digest: hit (on the shelf) or miss",
            ["result"],
            registry=self.registry,
        )
        self.manifest_lookup = {r: lookups.labels(r) for r in ("hit", "miss")}
        tags = Counter(
            "p2preg_tracker_tag_answers",
            "Tag queries of nodes whose seed registry is unreachable: answered, or unknown",
            ["result"],
            registry=self.registry,
        )
        self.tag_answers = {r: tags.labels(r) for r in ("answered", "unknown")}
        self.tag_reports = Counter(
            "p2preg_tracker_tag_reports",
            "Tag answers nodes reported from their seed registries (kept for outages)",
            registry=self.registry,
        )

    def _replicas(self) -> None:
        """The store and, with Redis, this replica's term (redis_store.py, replica.py)."""
        self.store_errors = Counter(
            "p2preg_tracker_store_errors",
            "Store operations that failed (Redis unreachable, or this replica fenced off), by op",
            ["op"],
            registry=self.registry,
        )
        self.store_unreplicated = Counter(
            "p2preg_tracker_store_unreplicated",
            "Store writes no Redis replica acknowledged in time (applied on the primary only)",
            registry=self.registry,
        )
        self.leading = Gauge(
            "p2preg_tracker_leading",
            "1 while this replica serves the cluster, 0 while it stands by",
            registry=self.registry,
        )
        self.terms = Counter(
            "p2preg_tracker_terms",
            "Terms this replica took over (standby to serving, state loaded from the store)",
            registry=self.registry,
        )
        self.step_downs = Counter(
            "p2preg_tracker_step_downs",
            "Terms this replica ended, by why: lost (another leads, or the store failed over)"
            " or unreachable (the store did not answer)",
            ["why"],
            registry=self.registry,
        )

    def _fronts(self) -> None:
        """Announces a standby forwards to the serving replica (tracker/fronts.py)."""
        self.front_forwards = Counter(
            "p2preg_tracker_front_forwards",
            "BitTorrent requests this standby forwarded to the serving replica, by result",
            ["result"],
            registry=self.registry,
        )
        for result in FRONT_RESULTS:
            self.front_forwards.labels(result)
        forwarded = Counter(
            "p2preg_tracker_forwarded",
            "Forwarded BitTorrent requests this replica applied, and forwarded batches it refused",
            ["result"],
            registry=self.registry,
        )
        for result in FORWARDED_RESULTS:
            forwarded.labels(result)
        self.forwarded_applied = forwarded.labels("applied")
        self.forwarded_refused = forwarded.labels("refused")
        self.forwarded_batches = Counter(
            "p2preg_tracker_forwarded_batches",
            "Batches of forwarded BitTorrent requests this replica applied",
            registry=self.registry,
        )
        self.relayed = Counter(
            "p2preg_tracker_relayed",
            "Announces nodes' relays sent over their control connection, by result: applied"
            " here, forwarded to the serving replica, or refused with their batch",
            ["result"],
            registry=self.registry,
        )
        for result in RELAYED_RESULTS:
            self.relayed.labels(result)
        self.relayed_batches = Counter(
            "p2preg_tracker_relayed_batches",
            "Batches of announces nodes' relays sent (POST /v1/announces)",
            registry=self.registry,
        )

    def _queue(self) -> None:
        """The per-image upstream queue (tracker/upstream_queue.py)."""
        self.upstream_handoffs = Counter(
            "p2preg_tracker_upstream_handoffs",
            "Upstream leases granted while the image's slots were taken, at the hand-off: "
            "the holder's renewals (or, before its first byte, the image's last fetch rate) "
            "put its last byte within upstream_handoff_s",
            registry=self.registry,
        )

    def quota_refused(self, kind: str) -> None:
        self.quota_refusal[kind].inc()

    def connection_refused(self, reason: str) -> None:
        self.connection_refusal[reason].inc()

    def tls_refused(self, reason: str) -> None:
        self.tls_refusal[reason].inc()

    def tls_admitted(self, resumed: bool) -> None:
        self.tls_handshake[resumed].inc()

    def watch(self, read: Callable[[], Gauges]) -> None:
        """Read the gauges from `read` from now on (a replica's new term replaces the last)."""
        if self._live is None:
            self._live = _LiveCollector(read)
            self.registry.register(self._live)
        self._live.read = read

    def render(self) -> bytes:
        return generate_latest(self.registry)
