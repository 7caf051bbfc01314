"""The node's configuration: upstream registries, their credentials, and NodeConfig.

Loaded by `p2preg.core.config.load` (CLI > P2PREG_* env > TOML > defaults;
unknown keys are errors). This module checks values for consistency; it must
not start anything.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from p2preg.core.config import ConfigError, GiB, HostPort, MiB
from p2preg.core.hostfiles import read_secret_file
from p2preg.core.tls import load_tls_dir
from p2preg.node.containerd_check import parse_version
from p2preg.node.imagerefs import PreheatError, parse_image
from p2preg.node.rates import ByteRate


@dataclass(frozen=True, slots=True)
class Upstream:
    """A seed registry: `ns` is the name containerd sends as `?ns=`."""

    ns: str
    url: str

    @classmethod
    def from_config(cls, value: object) -> Upstream:
        if not isinstance(value, str):
            raise ConfigError(f"expected [NS=]URL, got {value!r}")
        ns, sep, url = value.partition("=")
        if not sep:
            ns, url = "", value
        url = url.rstrip("/")
        m = re.match(r"^(https?)://([^/?#@]+)$", url)
        if m is None:
            raise ConfigError(f"upstream URL must be http(s)://host[:port], got {url!r}")
        return cls(ns or m.group(2), url)


@dataclass(frozen=True, slots=True)
class Credential:
    """Basic credentials for one upstream registry (used to obtain bearer tokens)."""

    ns: str
    username: str
    password: str = field(repr=False)

    @classmethod
    def from_config(cls, value: object) -> Credential:
        if isinstance(value, str):
            ns, sep, userpass = value.partition("=")
            user, sep2, password = userpass.partition(":")
            if sep and sep2 and ns and user and password:
                return cls(ns, user, password)
        # Never echo the value: it holds a password.
        raise ConfigError("credentials must be NS=USER:PASSWORD, none of them empty")


@dataclass(frozen=True, slots=True)
class TrustedRealm:
    """A token realm host, other than the registry's own, that may get its credentials."""

    ns: str
    host: str

    @classmethod
    def from_config(cls, value: object) -> TrustedRealm:
        if isinstance(value, str):
            ns, sep, host = value.partition("=")
            host = host.strip().lower()
            if sep and ns and re.match(r"^[a-z0-9.-]+$|^\[[0-9a-f:.]+\]$", host):
                return cls(ns, host.strip("[]"))
        raise ConfigError(
            f"trusted_realms takes NS=HOST (e.g. docker.io=auth.docker.io), got {value!r}"
        )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve anywhere


TRACKER_URL = re.compile(r"^(https?)://[^/?#@]+/?$")


def check_tracker_urls(urls: tuple[str, ...]) -> str | None:
    """One cluster's trackers: base URLs, each once, all of one scheme (https
    with a tls_dir, http with a token or none). Returns that scheme (None for
    no tracker); raises ConfigError with a one-line message naming what is wrong.
    """
    schemes = set()
    for url in urls:
        m = TRACKER_URL.match(url)
        if m is None:
            raise ConfigError(f"--tracker takes a base URL http://host:port, got {url!r}")
        schemes.add(m.group(1))
    if len({u.rstrip("/") for u in urls}) != len(urls):
        raise ConfigError(f"a tracker is given twice in {', '.join(urls)}")
    if len(schemes) > 1:
        raise ConfigError(
            f"trackers {', '.join(urls)} mix http and https: every tracker of a cluster "
            "speaks https (with tls_dir) or every one http (with a token or insecure)"
        )
    return schemes.pop() if schemes else None


@dataclass(frozen=True, slots=True)
class NodeConfig:
    listen: HostPort = HostPort("127.0.0.1", 5000)  # noqa: RUF009 (frozen, shared safely)
    upstream: tuple[Upstream, ...] = ()
    data_dir: Path = Path("/var/lib/p2preg")
    tracker: str | None = None
    # Several trackers of one cluster (replicas), tried in this order: the
    # list form of `tracker` (--tracker given more than once). Give one or the other.
    trackers: tuple[str, ...] = ()
    tracker_token: str | None = field(default=None, repr=False)
    # The cluster token in a file (a mounted Secret): never on a command line.
    tracker_token_file: Path | None = None
    # Peers of other machines must reach this; the facade stays on loopback.
    peer_host: str = "0.0.0.0"
    peer_port: int = 6881
    # With tls_dir, peers connect over TLS on this port (libtorrent's `s`
    # interface) and peer_port is not opened: SSL torrents take no plain peer.
    peer_ssl_port: int = 6882
    node_name: str | None = None
    # Below this a torrent costs more than it saves: straight from upstream.
    p2p_min_bytes: int = 1 * MiB
    # Blobs of at least chunk_min_count chunks move as chunk torrents while their
    # first copy comes from upstream (docs/SWARM.md, "Chunk swarms"). 4 MiB: a
    # chunk reaches the waiters about 0.7 s after its bytes at 50 Mbit/s, so the
    # spread trails the first copy by that much, and a 25 MB layer has 6 chunks;
    # smaller chunks cost more torrents, announces and tracker records for the
    # same bytes. Rounded to a multiple of the blob's piece size.
    chunking: bool = True
    chunk_bytes: int = 4 * MiB
    chunk_min_count: int = 2
    # A swarm download with no new byte for this long falls back to upstream.
    swarm_stall_s: float = 30.0
    # A peer that unchoked us and was asked but sent no block for this long is
    # reported to the tracker, which delists it once two nodes did.
    peer_stall_report_s: float = 10.0
    # The announce relay sends the seeder refreshes it answered itself at least this often.
    relay_refresh_s: float = 30.0
    swarm_max_hash_failures: int = 16
    # Nobody waits forever for a lease holder: this long without progress from
    # the fetch waited for (or the tracker's queue), fetch from upstream.
    lease_wait_max_s: float = 600.0
    credentials: tuple[Credential, ...] = ()
    # Registry → username/password (TOML or JSON, mode 0600), read at start:
    # passwords stay out of the config file, the environment and argv.
    credentials_file: Path | None = None
    # Token realm hosts, besides each registry's own, that may get its credentials.
    trusted_realms: tuple[TrustedRealm, ...] = ()
    # The admin credential for preheat and the full status; without it the
    # node writes a fresh <data_dir>/admin.token (0600) at every start.
    admin_token_file: Path | None = None
    # Tags move; a short TTL keeps `latest` fresh without an upstream round trip per pull.
    tag_ttl_s: float = 30.0
    # While upstream is down (unreachable, 5xx, 429), a tag answers the last digest
    # upstream gave for it, if upstream gave it within this long; 0: never.
    serve_stale_s: float = 7 * 24 * 3600.0
    # While upstream is unreachable, what this node lacks comes from the cluster's
    # word: a tag's last answer any node heard, a manifest by digest from the
    # tracker, blobs from peers (docs/SECURITY.md). False: a 503 instead.
    cluster_fallback: bool = True
    store_max_bytes: int = 50 * GiB
    # Each open blob stream holds at most one chunk in memory.
    stream_chunk_bytes: int = 1 * MiB
    max_blob_streams: int = 64
    upstream_timeout_s: float = 30.0
    upstream_retries: int = 4
    log_json: bool = False
    # /healthz and /metrics only, for Prometheus: the facade stays on loopback.
    metrics_listen: HostPort | None = None
    # On SIGTERM, responses in flight get this long to finish (keep it below
    # the orchestrator's kill timeout: Kubernetes' terminationGracePeriodSeconds).
    shutdown_grace_s: float = 10.0
    # The cluster identity: tls.crt, tls.key, ca.crt (the cert-manager layout),
    # for the tracker link and the peer wire. Checked here so a bad file stops
    # the node at start, naming the file, rather than at its first handshake.
    tls_dir: Path | None = None
    # Plain text beyond loopback, on purpose: a token cluster on a trusted network.
    insecure: bool = False
    # containerd's config.toml as this node sees it (in a pod: the host's, mounted);
    # with it the node reports whether kubelet pulls reach it at all
    # (p2preg_containerd_config_ok, status `containerd`), re-read at every scrape.
    containerd_config: Path | None = None
    # The daemon's version where `containerd --version` cannot run (a pod).
    containerd_version: str | None = None
    # The hosts.toml directory as containerd names it (containerd-config --hosts-dir).
    containerd_hosts_dir: Path = Path("/etc/containerd/certs.d")
    # Images (this machine's platform) kept in the store whatever eviction
    # wants: an edge site's images for an outage. They count in store_max_bytes.
    pinned_images: tuple[str, ...] = ()
    # Bandwidth caps in bytes per second, 0 for none (limits.py; `p2preg limits
    # set` changes them in a running node): what peers get from this node, what
    # it takes from peers, loopback and LAN peers included, and from upstream.
    peer_upload_limit_bytes_s: ByteRate = ByteRate(0)  # noqa: RUF009 (an int)
    peer_download_limit_bytes_s: ByteRate = ByteRate(0)  # noqa: RUF009
    upstream_download_limit_bytes_s: ByteRate = ByteRate(0)  # noqa: RUF009

    def __post_init__(self) -> None:
        if not self.upstream:
            raise ConfigError("at least one --upstream [NS=]URL is required")
        seen = [u.ns for u in self.upstream]
        if len(set(seen)) != len(seen):
            raise ConfigError("two upstreams share one registry name")
        if self.stream_chunk_bytes < 4096 or self.max_blob_streams < 1:
            raise ConfigError("stream_chunk_bytes must be ≥ 4096 and max_blob_streams ≥ 1")
        if self.tracker is not None and self.trackers:
            raise ConfigError("give tracker or trackers, not both")
        check_tracker_urls(self.tracker_urls)
        if self.tracker_token is not None and not self.tracker_token.strip():
            raise ConfigError("tracker_token must not be empty")
        if self.tracker_token is not None and self.tracker_token_file is not None:
            raise ConfigError("give tracker_token or tracker_token_file, not both")
        for realm in self.trusted_realms:
            if self.upstream_for(realm.ns) is None:
                raise ConfigError(f"trusted_realms: {realm.ns!r} is not a configured upstream")
        if self.tag_ttl_s < 0 or self.serve_stale_s < 0:
            raise ConfigError("tag_ttl_s and serve_stale_s must be ≥ 0")
        if self.shutdown_grace_s < 0:
            raise ConfigError("shutdown_grace_s must be ≥ 0")
        if not MiB <= self.chunk_bytes <= 64 * MiB or self.chunk_min_count < 2:
            raise ConfigError("chunk_bytes must be 1MiB to 64MiB and chunk_min_count ≥ 2")
        if self.peer_stall_report_s <= 0:
            raise ConfigError("peer_stall_report_s must be > 0")
        if not 0 < self.relay_refresh_s <= 300:
            raise ConfigError("relay_refresh_s must be > 0 and ≤ 300")
        if self.containerd_version is not None and parse_version(self.containerd_version) is None:
            raise ConfigError(
                f"containerd_version takes a version such as 2.1.3, got {self.containerd_version!r}"
            )
        self._check_pinned_images()
        if self.tls_dir is not None and self.insecure:
            raise ConfigError("give tls_dir or insecure, not both: a cluster is one or the other")
        if self.tls_dir is not None and self.tracker_token is not None:
            raise ConfigError(
                "give tls_dir or tracker_token, not both: with certificates there is no token"
            )

    def _check_pinned_images(self) -> None:
        for text in self.pinned_images:
            try:
                image = parse_image(text)
            except PreheatError as e:
                raise ConfigError(f"pinned_images: {e}") from None
            if image.registry not in {u.ns for u in self.upstream}:
                raise ConfigError(
                    f"pinned_images: {text!r} is on registry {image.registry!r}, which this "
                    "node does not mirror (its upstreams: "
                    f"{', '.join(u.ns for u in self.upstream)})"
                )

    def check_serving(self) -> None:
        """Fail closed before serving: the TLS files (read now) and what would go plain.

        Not part of construction: `p2preg containerd-config` reads the same file
        for its upstreams, in an init container that holds no certificate.
        """
        if self.tls_dir is not None:
            identity = load_tls_dir(self.tls_dir, role="node").identity
            if self.node_name is not None and self.node_name != identity.name:
                raise ConfigError(
                    f"node_name {self.node_name!r} is not {identity.name!r}, the name in the "
                    "certificate: with tls_dir the certificate names the node"
                )
        refusal = self._plain_beyond_loopback()
        if refusal is not None:
            raise ConfigError(
                f"{refusal}: give tls_dir for a cluster identity, or insecure to run so on purpose"
            )

    def _plain_beyond_loopback(self) -> str | None:
        """What would cross the network in plain text, when neither TLS nor `insecure` is set."""
        if self.insecure:
            return None
        for tracker in self.tracker_urls:
            url = urlsplit(tracker)
            if url.scheme == "http" and not _is_loopback(url.hostname or ""):
                return f"tracker {url.scheme}://{url.netloc} is plain HTTP beyond loopback"
        if self.tls_dir is not None:
            return None
        if self.tracker_urls and not _is_loopback(self.peer_host):
            return f"peer_host {self.peer_host} serves the peer wire beyond loopback in plain text"
        return None

    @property
    def tracker_urls(self) -> tuple[str, ...]:
        """Every tracker, in the order they are tried; empty without one."""
        if self.trackers:
            return self.trackers
        return () if self.tracker is None else (self.tracker,)

    def upstream_for(self, ns: str | None) -> Upstream | None:
        if not ns:
            return self.upstream[0]
        return next((u for u in self.upstream if u.ns == ns), None)

    def credential_for(self, ns: str) -> Credential | None:
        return next((c for c in self.credentials if c.ns == ns), None)

    def trusted_realms_for(self, ns: str) -> list[str]:
        return [r.host for r in self.trusted_realms if r.ns == ns]

    def resolved_tracker_token(self) -> str | None:
        """The cluster token, read from `tracker_token_file` if given (empty: ConfigError)."""
        if self.tracker_token_file is None:
            return self.tracker_token
        return read_secret_file(self.tracker_token_file, "tracker_token_file", check_mode=False)
