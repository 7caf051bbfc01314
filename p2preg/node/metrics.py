"""The node's Prometheus metrics, on a registry of their own.

One `NodeMetrics` per node instance (several nodes run in one test process, so
nothing goes on prometheus-client's global registry). Exposition uses
prometheus-client's own text format. Documented in docs/OPERATIONS.md. Names
are an interface (dashboards, bench/): they must not change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class StoreStats(Protocol):
    """What the store gauges read (p2preg.node.store.BlobStore)."""

    used_bytes: int
    max_bytes: int
    evictions: int

    @property
    def pinned_bytes(self) -> int: ...

    def __len__(self) -> int: ...


def _stale_tag_answers(r: CollectorRegistry) -> Counter:
    return Counter(
        "p2preg_stale_tag_answers",
        "Tags answered with the last digest upstream gave for them, while it failed",
        ["registry"], registry=r,
    )


def _manifest_bodies(r: CollectorRegistry) -> Counter:
    return Counter(
        "p2preg_manifest_bodies",
        "Manifest bodies this node lacked, by where they came from: cluster (the "
        "tracker's shelf), upstream_holder (upstream, as the lease holder), upstream",
        ["source"], registry=r,
    )


def _cluster_fallback_answers(r: CollectorRegistry) -> Counter:
    return Counter(
        "p2preg_cluster_fallback_answers",
        "Answers served on another node's word while upstream was unreachable, by kind",
        ["kind"], registry=r,
    )


def _rate_gauges(r: CollectorRegistry) -> tuple[Gauge, Gauge]:
    """The bandwidth caps (limits.py), by direction: peer_upload, peer_download,
    upstream_download; the rates are read at scrape time."""
    return (
        Gauge(
            "p2preg_rate_limit_bytes_per_second", "The cap in force, by direction (0: none)",
            ["direction"], registry=r,
        ),
        Gauge(
            "p2preg_rate_bytes_per_second", "The rate reached lately, by direction",
            ["direction"], registry=r,
        ),
    )


class NodeMetrics:
    # This host's containerd finding (watch_containerd), as of the last refresh.
    _containerd: Callable[[], dict[str, object]] | None = None
    containerd: dict[str, object] | None = None

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "p2preg_http_requests", "Facade requests by route and status", ["route", "status"],
            registry=r,
        )
        self.bytes_served = Counter(
            "p2preg_blob_bytes_served", "Blob bytes sent to clients", registry=r
        )
        self.upstream_bytes = Counter(
            "p2preg_upstream_blob_bytes", "Blob bytes received from seed registries", registry=r
        )
        self.blob_fetches = Counter(
            "p2preg_blob_fetches", "Blobs fetched into the store, by source", ["source"],
            registry=r,
        )
        self.blob_fetch_joins = Counter(
            "p2preg_blob_fetch_joins", "Requests that joined a fetch already running", registry=r
        )
        self.blob_fetch_seconds = Histogram(
            "p2preg_blob_fetch_seconds",
            "Time to fetch and verify one blob",
            ["source"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=r,
        )
        self.digest_mismatches = Counter(
            "p2preg_digest_mismatches", "Fetched blobs whose bytes did not match", registry=r
        )
        self.manifest_cache = Counter(
            "p2preg_manifest_cache", "Manifest lookups by result", ["result"], registry=r
        )
        self.stale_tag_answers = _stale_tag_answers(r)
        self.cluster_fallback_answers = _cluster_fallback_answers(r)
        self.manifest_head_fallbacks = Counter(
            "p2preg_manifest_head_fallbacks",
            "Tags resolved with an upstream GET because its HEAD lacked the digest, size or type",
            ["registry"], registry=r,
        )
        self.manifest_bodies = _manifest_bodies(r)
        self.streams_active = Gauge(
            "p2preg_blob_streams_active", "Blob responses being streamed", registry=r
        )
        self.streams_waiting = Gauge(
            "p2preg_blob_streams_waiting",
            "Blob responses whose head is sent, waiting for a stream slot",
            registry=r,
        )
        self._store_gauges(r)
        self._swarm_metrics(r)
        self.rate_limit, self.rate = _rate_gauges(r)

    def _swarm_metrics(self, r: CollectorRegistry) -> None:
        self.peer_bytes = Counter(
            "p2preg_peer_blob_bytes", "Blob payload bytes received from peers", registry=r
        )
        self.peer_redundant_bytes = Counter(
            "p2preg_peer_redundant_bytes",
            "Of those, blocks received more than once (the swarm's end game)",
            registry=r,
        )
        self._chunk_metrics(r)
        self.fallbacks = Counter(
            "p2preg_fallbacks", "Blobs fetched from upstream because the swarm could not",
            ["reason"], registry=r,
        )
        self.hash_failures = Counter(
            "p2preg_piece_hash_failures", "Pieces from peers that failed their hash", registry=r
        )
        self.peer_bans = Counter(
            "p2preg_peer_bans", "Peers banned for sending bad data", registry=r
        )
        self.peer_stalls = Counter(
            "p2preg_peer_stalls", "Peers reported to the tracker for stalling us", registry=r
        )
        self.peer_tls_refusals = Counter(
            "p2preg_peer_tls_refusals",
            "Peer connections refused in the TLS handshake (no, expired or foreign certificate)",
            registry=r,
        )
        self.tracker_failovers = Counter(
            "p2preg_tracker_failovers", "Control-API requests moved on to the next tracker",
            ["reason"], registry=r,
        )
        self.blobs_seeded = Gauge("p2preg_blobs_seeded", "Blobs this node seeds", registry=r)
        self.relay_announces = Counter(
            "p2preg_relay_announces",
            "libtorrent announces through the node's relay, by result: answered by a tracker,"
            " held (a seeder refresh answered by the relay, sent in a batch later),"
            " refused by the guard (unknown_torrent, other_port, other_host, malformed),"
            " no_tracker, busy",
            ["result"], registry=r,
        )
        self.relay_batches = Counter(
            "p2preg_relay_batches",
            "Batches of announces the relay sent over the control connection",
            registry=r,
        )
        self.peer_slow_drops = Counter(
            "p2preg_peer_slow_drops",
            "Slow peers disconnected to free the requests they held (slowpeers.py)",
            registry=r,
        )

    def _chunk_metrics(self, r: CollectorRegistry) -> None:
        self.chunks_published = Counter(
            "p2preg_chunks_published",
            "Chunk torrents this node filed as the holder of their blob's lease",
            registry=r,
        )
        self.chunks_joined = Counter(
            "p2preg_chunks_joined", "Chunk torrents this node downloaded from peers", registry=r
        )
        self.chunk_bytes = Counter(
            "p2preg_chunk_bytes", "Bytes of the chunks downloaded from peers", registry=r
        )
        self.chunks_assembled = Counter(
            "p2preg_chunks_assembled",
            "Blobs assembled from chunk torrents, by result (verified or mismatch)",
            ["result"],
            registry=r,
        )

    def _store_gauges(self, r: CollectorRegistry) -> None:
        self.store_bytes = Gauge("p2preg_store_bytes", "Bytes held in the store", registry=r)
        self.store_blobs = Gauge("p2preg_store_blobs", "Blobs held in the store", registry=r)
        self.store_budget = Gauge(
            "p2preg_store_budget_bytes", "The store's size budget", registry=r
        )
        self.store_pinned = Gauge("p2preg_store_pinned_bytes", "Pinned bytes held", registry=r)
        self.store_evictions = Gauge(
            "p2preg_store_evictions", "Blobs evicted to stay within budget", registry=r
        )

    def watch_containerd(self, check: Callable[[], dict[str, object]]) -> None:
        """Export `check()["ok"]` as p2preg_containerd_config_ok, read at each refresh.

        Registered only here: a node that does not check exports no 0 that reads as "bypassed".
        """
        self._containerd = check
        self.containerd_config_ok = Gauge(
            "p2preg_containerd_config_ok",
            "1 when containerd's CRI plugin (kubelet pulls) reads this node's hosts.toml",
            registry=self.registry,
        )

    def refresh(self, store: StoreStats) -> None:
        """Gauges read from the store when they are shown, not kept up to date."""
        self.store_bytes.set(store.used_bytes)
        self.store_blobs.set(len(store))
        self.store_budget.set(store.max_bytes)
        self.store_evictions.set(store.evictions)
        self.store_pinned.set(store.pinned_bytes)
        if self._containerd is not None:
            self.containerd = self._containerd()
            self.containerd_config_ok.set(1 if self.containerd["ok"] else 0)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
