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

from p2preg.core.config import ConfigError, HostPort, MiB
from p2preg.core.tls import load_tls_dir


@dataclass(frozen=True, slots=True)
class TrackerConfig:
    # Loopback by default, like the node; 6969 is the customary tracker port.
    # UDP (BEP 15) listens on the same port number.
    listen: HostPort = HostPort("127.0.0.1", 6969)  # noqa: RUF009 (frozen, shared safely)
    data_dir: Path = Path("/var/lib/p2preg-tracker")
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
    # Leases are short and renewed, so a dead holder costs the cluster one TTL.
    lease_ttl_s: float = 30.0
    # Longest a lease request is held open waiting for a seeder or a free lease.
    lease_wait_max_s: float = 25.0
    # How many blobs of one image (the manifest a node names with its lease
    # request) may be fetched from upstream at once; the rest queue in manifest
    # order. One stream fills a thin link; raise it where one upstream stream is
    # slower than the link (a CDN's per-connection cap). 0: no limit.
    upstream_fetches_per_image: int = 1
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
    max_scrape_hashes: int = 64
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

    def __post_init__(self) -> None:
        if self.token is not None and self.token_file is not None:
            raise ConfigError("give token or token_file, not both")
        if self.token is not None and not self.token.strip():
            raise ConfigError("token must not be empty")
        if not 1 <= self.min_announce_interval_s <= self.announce_interval_s:
            raise ConfigError("need 1 ≤ min_announce_interval_s ≤ announce_interval_s")
        if self.peer_ttl_s <= self.announce_interval_s:
            raise ConfigError("peer_ttl_s must exceed announce_interval_s")
        if self.lease_ttl_s <= 0 or self.lease_wait_max_s < 0:
            raise ConfigError("lease_ttl_s must be > 0 and lease_wait_max_s ≥ 0")
        if self.upstream_fetches_per_image < 0:
            raise ConfigError("upstream_fetches_per_image must be ≥ 0 (0: no limit)")
        if not 1 <= self.default_numwant <= self.max_numwant:
            raise ConfigError("need 1 ≤ default_numwant ≤ max_numwant")
        for name in ("max_peers_per_swarm", "max_peers", "max_metainfo", "max_scrape_hashes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be ≥ 1")
        if self.stall_reporters < 2:
            raise ConfigError("stall_reporters must be ≥ 2: no identity may delist a peer alone")
        if self.stall_window_s <= 0 or self.stall_cooloff_s <= 0:
            raise ConfigError("stall_window_s and stall_cooloff_s must be > 0")
        if self.max_metainfo_bytes < 4096:
            raise ConfigError("max_metainfo_bytes must be ≥ 4096")
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

    @property
    def serves_udp(self) -> bool:
        return self.udp if self.udp is not None else self.tls_dir is None

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
