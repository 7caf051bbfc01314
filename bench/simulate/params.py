"""What one simulated pull is: the cluster, its links, the image, the node and tracker settings.

Owns `Params` (frozen; written into the JSON as it is, so a field here is a
JSON key), the two link profiles the cluster runs use, and the fan-out
benchmark's shaping for validation. Rates are bytes per second inside the
simulator and Mbit/s on the command line. Defaults for the tracker come from
`TrackerConfig()`, the node's from its code, so the simulator follows them when
they change. It must not simulate anything.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.simulate.server import ANNOUNCE_PATHS
from tracker.config import TrackerConfig

CONFIRM_PATHS = ("call", "riding")

MB = 10**6
MiB = 1 << 20
MBIT = 10**6 / 8  # bytes/s in one Mbit/s

_TRACKER = TrackerConfig()

# The fan-out benchmark's first copy moved 47.8 Mbit/s of goodput over its
# 50 Mbit/s link (TCP/IP and HTTP overhead): every link delivers this share.
GOODPUT = 47.8 / 50

# Link profiles: (upstream U, node link B) in Mbit/s.
PROFILES: dict[str, tuple[float, float]] = {
    "datacenter": (1000.0, 10_000.0),
    "edge": (50.0, 1000.0),
}

POLICIES = ("real", "random")


@dataclass(frozen=True)
class Params:
    nodes: int
    image_bytes: int = 1000 * MB
    layers: int = 10
    upstream_mbit: float = 1000.0
    node_mbit: float = 10_000.0
    goodput: float = GOODPUT
    # Transfer unit between peers: a node uploads a chunk once it holds all of it.
    chunk_bytes: int = 4 * MiB
    # Hand-out policy: "real" is tracker/handout.py; "random" picks uniformly
    # among all the swarm's peers, seeders not first, for seeders too.
    policy: str = "real"
    # Piece picking among what an uploader has: "rarest" (swarm-wide
    # availability) or "random".
    picker: str = "rarest"
    seed: int = 1
    # Nodes that die mid-pull, and how many of them die while holding a lease.
    fail_fraction: float = 0.01
    holder_failures: int = 1
    # libtorrent: p2preg sets connections_limit 400; concurrent chunk transfers a
    # node uploads and downloads (libtorrent's default unchoke_slots_limit is 8).
    connections_limit: int = 400
    upload_slots: int = 8
    download_slots: int = 8
    numwant: int = _TRACKER.default_numwant
    announce_interval_s: float = float(_TRACKER.announce_interval_s)
    seeder_announce_interval_s: float = float(_TRACKER.seeder_announce_interval_s)
    peer_ttl_s: float = _TRACKER.peer_ttl_s
    lease_ttl_s: float = _TRACKER.lease_ttl_s
    lease_wait_max_s: float = _TRACKER.lease_wait_max_s
    lease_min_rate_bytes_s: int = _TRACKER.lease_min_rate_bytes_s
    lease_rate_window_s: float = _TRACKER.lease_rate_window_s
    lease_silence_s: float = _TRACKER.lease_silence_s
    lease_grant_ack_s: float = _TRACKER.lease_grant_ack_s
    fetches_per_image: int = _TRACKER.upstream_fetches_per_image
    handoff_s: float = _TRACKER.upstream_handoff_s
    # The tracker as a server (server.py): replicas (0: every request answered
    # at once), and announces "direct" (a TLS handshake each), "relayed"
    # (batched over the node's kept-alive control connection) or "entered"
    # (relayed, and a node's start, completion and seeding carried by its lease
    # request, seed confirmation and publish instead).
    tracker_replicas: int = 3
    announces: str = "direct"
    # Control fronts per replica (server.py; a design not built): 0, the serving
    # replica answers every control call itself.
    control_fronts: int = 0
    # Layers one node's client fetches at once, in the image's order, the next
    # when one is in: containerd's max_concurrent_downloads, 3 in its CRI plugin
    # (kubelet's pulls); 0 is every layer at once (`ctr images pull`'s default).
    client_downloads: int = 3
    # Seed confirmations: a control call each ("call"), or riding the node's next
    # lease request when one goes within tracker/confirm_rides.HOLD_S ("riding").
    confirms: str = "call"
    # The node's own lease_wait_max_s (p2preg/node/config.py).
    node_wait_max_s: float = 600.0
    # A download with no neighbour holding a chunk it lacks for this long reports the
    # peers it could not reach and asks for the lease again, or with none to report
    # announces again for others (p2preg/node/stallwatch.py, after the node's
    # peer_stall_report_s; stalls.py). 0: neither, the model before 2026-12-07.
    stall_report_s: float = 10.0
    # Node <-> tracker round trip; the time from a granted lease to the first
    # upstream byte (token, blob GET, redirect); hashing for verify and torrent.
    rtt_s: float = 0.002
    upstream_start_s: float = 0.1
    hash_bytes_s: float = 1e9
    # All nodes start within this many seconds (uniformly).
    start_spread_s: float = 0.0
    max_sim_s: float = 3600.0

    def __post_init__(self) -> None:
        if self.nodes < 2 or self.layers < 1 or self.image_bytes < self.layers:
            raise ValueError("need at least 2 nodes, 1 layer and a byte per layer")
        if self.policy not in POLICIES:
            raise ValueError(f"policy: one of {', '.join(POLICIES)}")
        if self.picker not in ("rarest", "random"):
            raise ValueError("picker: rarest or random")
        if self.chunk_bytes < 4 * MiB:
            raise ValueError("chunks of at least 4 MiB")
        if min(self.upstream_mbit, self.node_mbit, self.goodput) <= 0:
            raise ValueError("rates must be positive")
        if not 0 <= self.fail_fraction < 1 or self.holder_failures < 0:
            raise ValueError("fail_fraction in [0, 1), holder_failures >= 0")
        if self.tracker_replicas < 0 or self.announces not in ANNOUNCE_PATHS:
            raise ValueError(f"tracker_replicas ≥ 0; announces: {', '.join(ANNOUNCE_PATHS)}")
        if self.control_fronts < 0 or (
            self.control_fronts and (not self.tracker_replicas or self.announces == "direct")
        ):
            raise ValueError("control_fronts ≥ 0, and only with replicas and kept-alive announces")
        if self.client_downloads < 0:
            raise ValueError("client_downloads ≥ 0 (0: every layer at once)")
        if self.fetches_per_image < 0:
            raise ValueError("fetches_per_image ≥ 0 (0: no limit)")
        if self.confirms not in CONFIRM_PATHS:
            raise ValueError(f"confirms: one of {', '.join(CONFIRM_PATHS)}")
        if min(self.upload_slots, self.download_slots, self.connections_limit) < 1:
            raise ValueError("slots and connections: at least 1")

    @property
    def upstream_bytes_s(self) -> float:
        return self.upstream_mbit * MBIT * self.goodput

    @property
    def node_bytes_s(self) -> float:
        return self.node_mbit * MBIT * self.goodput

    @property
    def bound_s(self) -> float:
        """First copy + S/B, at the links' nominal rates: S/U + S/B."""
        s = self.image_bytes
        return s / (self.upstream_mbit * MBIT) + s / (self.node_mbit * MBIT)

    def layer_sizes(self) -> list[int]:
        base, extra = divmod(self.image_bytes, self.layers)
        return [base + (1 if i < extra else 0) for i in range(self.layers)]

    def failing(self) -> int:
        return round(self.nodes * self.fail_fraction)
