"""TrackerConfig: every knob of the tracker, typed, frozen, with units in the name.

Loaded by `p2preg.core.config.load` (CLI > P2PREG_* env > TOML > defaults; unknown
keys are errors). This module checks values for consistency and reads the token
file; it must not open sockets or the store.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from p2preg.core.config import ConfigError, HostPort, KiB, MiB
from p2preg.core.digest import Digest, DigestError
from p2preg.core.tls import load_tls_dir
from tracker.quotas import request_cost
from tracker.store_url import StoreURL


@dataclass(frozen=True, slots=True)
class TrackerConfig:
    # Loopback by default, like the node; 6969 is the customary tracker port.
    # UDP (BEP 15) listens on the same port number.
    listen: HostPort = HostPort("127.0.0.1", 6969)  # noqa: RUF009 (frozen, shared safely)
    data_dir: Path = Path("/var/lib/p2preg-tracker")
    # Where metainfo, disputes, quarantines, leases and confirmations are kept:
    # None, SQLite in data_dir; else Redis or Valkey (store_url.py). Its password
    # comes from the environment (P2PREG_STORE_PASSWORD) or a file, never the URL.
    store: StoreURL | None = None
    store_password: str | None = field(default=None, repr=False)
    store_password_file: Path | None = None
    # The CA that signs a rediss:// server's certificate (else the system's).
    store_ca_file: Path | None = None
    # With a Redis store, one replica serves at a time (replica.py): its term
    # lasts this long unless renewed (every third of it), so a standby takes
    # over within about this long after it dies.
    replica_term_s: float = 6.0
    # With a Redis store: host:port the other replicas reach this one on, to
    # forward their nodes' announces while it serves (tracker/fronts.py); in
    # Kubernetes the pod's IP. None: `listen` when it names one address, else
    # nobody forwards here and standbys answer announces with a 503.
    replica_advertise: HostPort | None = None
    # Cluster token: nodes send it as `?token=` on announces and as a bearer
    # token on the control API. None: no auth (only on a trusted network).
    token: str | None = field(default=None, repr=False)
    token_file: Path | None = None
    # BEP 15 on the same port number. None: on without TLS, off with it (a UDP
    # announce cannot show a client certificate, so it would bypass mTLS).
    udp: bool | None = None
    # BitTorrent intervals are whole seconds on the wire.
    announce_interval_s: int = 60
    min_announce_interval_s: int = 15
    # A peer that has not announced for this long is dropped from its swarm.
    peer_ttl_s: float = 150.0
    # What a seeder the tracker already holds as one is told instead (±10 % per
    # answer), and kept 1.25x as long (tracker/intervals.py): 10,000 nodes
    # seeding 500 blobs each make 83,000 announces/s at 60 s, 2,800/s at 1800 s.
    # Equal to announce_interval_s: one interval for everyone.
    seeder_announce_interval_s: int = 1800
    # Leases are short and renewed, so a dead holder costs the cluster one TTL.
    lease_ttl_s: float = 30.0
    # Longest a lease request is held open waiting for a seeder or a free lease.
    lease_wait_max_s: float = 25.0
    # A holder must report this much progress per second, on average over each
    # `lease_rate_window_s`, or the next node asking takes the fetch over (at
    # most once per blob per window). 0: no minimum (a holder keeps its lease as
    # long as it renews).
    lease_min_rate_bytes_s: int = 256 * KiB
    lease_rate_window_s: float = 30.0
    # A holder renews every third of this; one that sent no sign of life for
    # this long (dead, hung, cut off, or granted into a long poll whose node
    # died) is taken over by the next node asking, at most once per blob per
    # rate window, long before its TTL. 0 (or ≥ lease_ttl_s): only the TTL ends
    # a silent lease.
    lease_silence_s: float = 2.5
    # A grant is provisional until the holder's first renewal (a node renews at
    # once on a grant); one not acknowledged this soon passes to the next node
    # asking as a silent holder's does (a grant into a dead node's long poll).
    # 0: only lease_silence_s counts.
    lease_grant_ack_s: float = 0.5
    # Open leases one node (identity) may hold at once; past it, it fetches
    # from upstream without one.
    max_leases_per_node: int = 64
    # How many blobs of one image (the manifest a node names with its lease
    # request) may be fetched from upstream at once; the rest queue in manifest
    # order. One stream fills a thin link; raise it where one upstream stream is
    # slower than the link (a CDN's per-connection cap). 0: no limit.
    upstream_fetches_per_image: int = 1
    # Hand-off between an image's fetches: a holder whose renewals put its last
    # byte within this many seconds gives its slot to the image's next fetch
    # (one at a time), so the next request crosses as the last bytes drain
    # instead of after them. 0: the slot frees at the last byte.
    upstream_handoff_s: float = 0.3
    # An identity whose torrent lost a dispute may not define torrents (take a
    # lease, publish, report) for this long; then it may again. Each later loss
    # costs the cluster one more upstream copy of that blob at most.
    dispute_quarantine_s: float = 3600.0
    default_numwant: int = 50
    max_numwant: int = 200
    max_peers_per_swarm: int = 10_000
    max_peers: int = 1_000_000
    # A peer reported stalling downloads (unchoked, asked, no block) by this many
    # identities within stall_window_s is not handed out for stall_cooloff_s.
    stall_reporters: int = 2
    stall_window_s: float = 120.0
    stall_cooloff_s: float = 600.0
    # Swarms are only formed for registered metainfo, so this bounds swarms too.
    max_metainfo: int = 1_000_000
    max_metainfo_bytes: int = 1 * MiB
    # Tag answers the tracker keeps for nodes whose seed registry is unreachable
    # (tracker/tags.py); the least recently reported go first.
    max_tag_answers: int = 100_000
    # The manifest shelf (manifest_shelf.py): bodies nodes fetched from upstream,
    # kept so each crosses upstream once per cluster; least recently used go first.
    max_manifests: int = 100_000
    max_manifest_store_bytes: int = 256 * MiB
    max_scrape_hashes: int = 64
    # Per-identity rates of control requests, as token buckets: so many a
    # second, so many saved up. A request costs one token per started 64 KiB of
    # its body (a big blob's chunk torrents will cost one each). Generous for
    # honest nodes: a node pulling a few big images at once asks a lease per
    # blob (hundreds at once), renews what it holds, and publishes each blob it
    # fetched. Past them: 429 `rate_limited`, and the node goes upstream.
    quota_publish_per_s: float = 5.0
    quota_publish_burst: int = 1000
    quota_report_per_s: float = 1.0
    quota_report_burst: int = 100
    quota_lease_per_s: float = 50.0
    quota_lease_burst: int = 2000
    # Metainfo of a digest no peer has announced for this long is forgotten, in
    # the store too: torrents filed for blobs nobody seeds do not pile up. At
    # least twice the seeders' announce interval; never for `pinned_digests`.
    metainfo_idle_expiry_s: float = 3600.0
    # Digests whose metainfo stays however long its seeders are silent (an edge
    # site's base images, whose seeders may be cut off for hours: they are
    # taken back at their first announce instead of costing an upstream copy).
    pinned_digests: tuple[str, ...] = ()
    # Connections that have not completed a request (plain HTTP) or a TLS
    # handshake, per client address and in all; past either, a new connection is
    # closed unanswered. BitTorrent GETs answered from their first read never count.
    max_preauth_connections: int = 4096
    max_preauth_connections_per_ip: int = 256
    # Lease requests held open (long polls), per identity and in all; past
    # either, a request is answered at once instead of held.
    max_long_polls: int = 20_000
    max_long_polls_per_identity: int = 1000
    # Only connections from these networks (CIDR) may name a peer IP other than
    # their own with `ip=` (a reverse proxy, say); everyone else's is ignored.
    trusted_ip_sources: tuple[str, ...] = ()
    # One JSON object per log line (the node's key of the same name).
    log_json: bool = False
    # The cluster identity (tls.crt, tls.key, ca.crt, the cert-manager layout):
    # checked here so a bad file stops the tracker at start, naming the file.
    tls_dir: Path | None = None
    # Plain text beyond loopback, on purpose: a token cluster, no certificates.
    insecure: bool = False
    # A plain HTTP listener with /metrics and /healthz only, so Prometheus and
    # probes need no client certificate when the tracker's port speaks mTLS.
    metrics_listen: HostPort | None = None
    # A plain listener with the read-only cluster page (`/`) and `/healthz`. It has
    # no authentication, so only a loopback address is taken (reach it through
    # `kubectl port-forward` or an SSH tunnel). None: off.
    admin_listen: HostPort | None = None

    def __post_init__(self) -> None:
        if self.token is not None and self.token_file is not None:
            raise ConfigError("give token or token_file, not both")
        if self.store_password is not None and self.store_password_file is not None:
            raise ConfigError("give store_password or store_password_file, not both")
        if self.store_ca_file is not None and (self.store is None or not self.store.tls):
            raise ConfigError("store_ca_file is for a rediss:// store")
        if self.replica_term_s < 1.5:
            raise ConfigError("replica_term_s must be ≥ 1.5")
        if self.replica_advertise is not None and self.store is None:
            raise ConfigError("replica_advertise is for replicas: give a redis store too")
        if self.store is not None and self.udp:
            raise ConfigError(
                "udp announces are a replica's own (their connection ids): leave udp off "
                "with a redis store"
            )
        if self.token is not None and not self.token.strip():
            raise ConfigError("token must not be empty")
        if not 1 <= self.min_announce_interval_s <= self.announce_interval_s:
            raise ConfigError("need 1 ≤ min_announce_interval_s ≤ announce_interval_s")
        if self.peer_ttl_s <= self.announce_interval_s:
            raise ConfigError("peer_ttl_s must exceed announce_interval_s")
        if self.seeder_announce_interval_s < self.announce_interval_s:
            raise ConfigError("seeder_announce_interval_s must be ≥ announce_interval_s")
        self._check_leases()
        if self.dispute_quarantine_s <= 0:
            raise ConfigError("dispute_quarantine_s must be > 0")
        if not 1 <= self.default_numwant <= self.max_numwant:
            raise ConfigError("need 1 ≤ default_numwant ≤ max_numwant")
        for name in (
            "max_peers_per_swarm",
            "max_peers",
            "max_metainfo",
            "max_scrape_hashes",
            "max_leases_per_node",
            "max_tag_answers",
            "max_manifests",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be ≥ 1")
        if self.stall_reporters < 2:
            raise ConfigError("stall_reporters must be ≥ 2: no identity may delist a peer alone")
        if self.stall_window_s <= 0 or self.stall_cooloff_s <= 0:
            raise ConfigError("stall_window_s and stall_cooloff_s must be > 0")
        if self.max_metainfo_bytes < 4096:
            raise ConfigError("max_metainfo_bytes must be ≥ 4096")
        if self.max_manifest_store_bytes < 64 * KiB:
            raise ConfigError("max_manifest_store_bytes must be ≥ 64KiB")
        self._check_quotas()
        if self.admin_listen is not None and not is_loopback(self.admin_listen.host):
            raise ConfigError(
                f"admin_listen {self.admin_listen} is not a loopback address: the cluster page "
                "has no authentication (use 127.0.0.1:PORT and kubectl port-forward)"
            )
        for net in self.trusted_ip_sources:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ConfigError(f"trusted_ip_sources: {net!r} is not a network") from None
        if self.tls_dir is not None:
            if self.insecure:
                raise ConfigError(
                    "give tls_dir or insecure, not both: a cluster is one or the other"
                )
            if self.token is not None or self.token_file is not None:
                raise ConfigError("a cluster uses certificates or a token, not both")
            if self.udp:
                raise ConfigError(
                    "udp announces cannot show a client certificate: leave udp off with tls_dir"
                )
            load_tls_dir(self.tls_dir, role="tracker")

    def _check_leases(self) -> None:
        if self.lease_ttl_s <= 0 or self.lease_wait_max_s < 0:
            raise ConfigError("lease_ttl_s must be > 0 and lease_wait_max_s ≥ 0")
        if self.lease_min_rate_bytes_s < 0 or self.lease_rate_window_s <= 0:
            raise ConfigError("lease_min_rate_bytes_s must be ≥ 0 and lease_rate_window_s > 0")
        if self.lease_silence_s < 0:
            raise ConfigError("lease_silence_s must be ≥ 0 (0: off)")
        if self.lease_grant_ack_s < 0:
            raise ConfigError("lease_grant_ack_s must be ≥ 0 (0: off)")
        if self.upstream_fetches_per_image < 0:
            raise ConfigError("upstream_fetches_per_image must be ≥ 0 (0: no limit)")
        if not 0 <= self.upstream_handoff_s <= self.lease_ttl_s:
            raise ConfigError("upstream_handoff_s must be ≥ 0 and ≤ lease_ttl_s (0: off)")

    def _check_quotas(self) -> None:
        largest = request_cost(self.max_metainfo_bytes)
        for kind in ("publish", "report", "lease"):
            if not getattr(self, f"quota_{kind}_per_s") > 0:
                raise ConfigError(f"quota_{kind}_per_s must be > 0")
            # A metainfo at the size limit must fit a burst, or it could never be filed.
            need = 1 if kind == "lease" else largest
            if getattr(self, f"quota_{kind}_burst") < need:
                raise ConfigError(
                    f"quota_{kind}_burst must be ≥ {need}, the cost of its largest request"
                )
        if self.metainfo_idle_expiry_s < 2 * self.seeder_announce_interval_s:
            raise ConfigError(
                "metainfo_idle_expiry_s must be at least twice seeder_announce_interval_s "
                "(a live seeder must get a chance to announce)"
            )
        for text in self.pinned_digests:
            try:
                Digest.parse(text)
            except DigestError as e:
                raise ConfigError(f"pinned_digests: {e}") from None
        for what in ("preauth_connections", "long_polls"):
            per = "per_ip" if what == "preauth_connections" else "per_identity"
            each, total = getattr(self, f"max_{what}_{per}"), getattr(self, f"max_{what}")
            if not 1 <= each <= total:
                raise ConfigError(f"need 1 ≤ max_{what}_{per} ≤ max_{what}")

    @property
    def serves_udp(self) -> bool:
        if self.udp is not None:
            return self.udp
        return self.tls_dir is None and self.store is None

    def check_exposure(self) -> None:
        """Fail closed: the tracker protocol beyond loopback needs TLS or `insecure`."""
        if self.tls_dir is None and not self.insecure and not is_loopback(self.listen.host):
            raise ConfigError(
                f"listen {self.listen} is beyond loopback and there is no tls_dir: give "
                "--tls-dir (or --insecure for plain HTTP on a trusted network)"
            )

    def resolved_token(self) -> str | None:
        """The token, read from `token_file` if that is how it was given."""
        if self.token_file is None:
            return self.token
        try:
            token = self.token_file.read_text().strip()
        except OSError as e:
            raise ConfigError(f"cannot read token_file {self.token_file}: {e.strerror}") from None
        if not token:
            raise ConfigError(f"token_file {self.token_file} is empty")
        return token

    def resolved_store_password(self) -> str | None:
        """The store's password, read from `store_password_file` if that is how it was given."""
        if self.store_password_file is None:
            return self.store_password
        try:
            password = self.store_password_file.read_text().strip()
        except OSError as e:
            raise ConfigError(
                f"cannot read store_password_file {self.store_password_file}: {e.strerror}"
            ) from None
        if not password:
            raise ConfigError(f"store_password_file {self.store_password_file} is empty")
        return password

    def with_token(self) -> TrackerConfig:
        """A copy whose `token` is resolved, so nothing else reads files."""
        if self.token_file is None:
            return self
        return dataclasses.replace(self, token=self.resolved_token(), token_file=None)


def is_loopback(host: str) -> bool:
    """`host` is a loopback address (or `localhost`); a name we cannot judge is not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
