"""The fan-out benchmark's settings: its constants, the command line, and the frozen `Settings`.

Owns every flag `python -m bench.fanout` takes (the ones docs/BENCHMARKS.md
documents), their checks, and the fixed numbers of the cluster (ports, host
numbers in 198.18.0.0/24, the sampling period). `Settings` is written into the
JSON as it is, so a field here is a JSON key: rename none. It must not start
anything or measure anything.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

from bench.machine import add_tls_flag
from harness.containerd import Snapshotter

RESULTS = Path(__file__).resolve().parent.parent / "results"
MB = 10**6
MiB = 1 << 20
REPO = "bench/app"
PREFIX_ROOT = "p2pfo"
MODES = ("direct", "p2p")
# p2p with mutual TLS (tracker over HTTPS with node certificates, SSL torrents):
# `--tls on|both` turns the p2p mode into this one, or into both.
P2P_TLS = "p2p_tls"
P2P_MODES = ("p2p", P2P_TLS)
FANOUT_TLS = ("off", "on", "both")
CLIENTS = ("ctr", "cri")  # who pulls on each host (bench/fanout/clients.py)
CLIENT = "client"  # the client-floor run: not a mode under test, a measure of the machine

# Fixed ports are safe inside a namespace (each has its own port space).
REGISTRY_PORT, TRACKER_PORT, FACADE_PORT, PEER_PORT, NGINX_PORT = 5000, 6969, 5000, 6881, 8080
# With TLS: the nodes' SSL peer port, the tracker's plain /metrics and /healthz.
PEER_SSL_PORT, TRACKER_METRICS_PORT = 6882, 6970
# Host numbers in 198.18.0.0/24.
SEED_IX, FAST_IX, TRACKER_IX, NODE_IX0 = 2, 3, 4, 10
MAX_NODES = 64
SAMPLE_S = 0.5
START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Settings:
    nodes: tuple[int, ...]
    size_bytes: int
    layers: int
    upstream_mbit: float
    node_mbit: float
    loopback: bool
    modes: tuple[str, ...]
    client_floor: bool
    snapshotter: Snapshotter
    unpack: bool
    capacity_repeats: int
    repeats: int
    pull_timeout_s: float
    node_args: tuple[str, ...]
    seed: str
    tls: str = "off"
    tracker_args: tuple[str, ...] = ()
    # Who pulls on each host: kubelet's CRI PullImage, or `ctr images pull`
    # (JSON written before this key existed was pulled by ctr).
    client: str = "cri"


def _parser(description: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        # The name it had as one module; its usage line stays the same.
        prog="fanout.py",
        description=description,
    )
    p.add_argument("--nodes", default="2,4,8", help="values of N, comma-separated (2,4,8)")
    p.add_argument("--size-mb", type=float, default=100.0, help="image size S in MB (100)")
    p.add_argument("--layers", type=int, default=4, help="layers L, of equal size (4)")
    p.add_argument("--upstream-mbit", type=float, default=50.0, help="upstream link U (50)")
    p.add_argument("--node-mbit", type=float, default=200.0, help="each node's link B (200)")
    p.add_argument(
        "--loopback",
        action="store_true",
        help="everything on 127.0.0.1: no namespaces, no shaping, no root needed",
    )
    p.add_argument(
        "--modes",
        default="direct,p2p",
        help="modes to run (direct,p2p); --tls makes p2p plain, TLS or both",
    )
    p.add_argument(
        "--no-client-floor",
        action="store_true",
        help="skip the client(N) runs (then the bound has no client term)",
    )
    p.add_argument(
        "--snapshotter",
        default="overlayfs",
        choices=get_args(Snapshotter),
        help="containerd's snapshotter (overlayfs, its default and kubelet's; native copies "
        "every parent layer)",
    )
    p.add_argument(
        "--fetch-only",
        action="store_true",
        help="`ctr content fetch` instead of `ctr images pull` (no unpack)",
    )
    p.add_argument(
        "--client",
        default="cri",
        choices=CLIENTS,
        help="ctr (`ctr images pull`: fetch all, then unpack) or cri (kubelet's PullImage "
        "on containerd's CRI plugin: each layer unpacked as it arrives)",
    )
    p.add_argument(
        "--capacity-repeats",
        type=int,
        default=2,
        help="ring measurements per N; the best counts (2)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs of client(N) and p2p per N; the median counts (1; direct runs once)",
    )
    p.add_argument("--pull-timeout-s", type=float, default=900.0)
    p.add_argument(
        "--node-arg",
        action="append",
        default=[],
        help="extra flag for every p2preg node, e.g. --node-arg=--p2p-min-bytes=4MiB",
    )
    p.add_argument(
        "--tracker-arg",
        action="append",
        default=[],
        help="extra flag for the tracker, e.g. --tracker-arg=--upstream-handoff-s=0",
    )
    p.add_argument("--seed", default="fanout", help="image content seed")
    add_tls_flag(p, FANOUT_TLS)
    p.add_argument("--out", type=Path, default=RESULTS, help="where JSON and PNG go")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    p.add_argument(
        "--reap-stale",
        action="store_true",
        help=f"first remove {PREFIX_ROOT}-<pid>-* namespaces whose benchmark died",
    )
    return p


def is_p2p(mode: str) -> bool:
    """Whether a run of `mode` goes through p2preg nodes (plain or TLS)."""
    return mode in P2P_MODES


def _with_tls(modes: tuple[str, ...], tls: str) -> tuple[str, ...]:
    """`--modes` with p2p replaced by what `--tls` asks: p2p, p2p_tls, or both."""
    p2p = {"off": ("p2p",), "on": (P2P_TLS,), "both": P2P_MODES}[tls]
    return tuple(x for m in modes for x in (p2p if m == "p2p" else (m,)))


def parse_args(
    argv: Sequence[str] | None, description: str | None
) -> tuple[Settings, argparse.Namespace]:
    p = _parser(description)
    a = p.parse_args(argv)
    nodes = tuple(sorted({int(x) for x in a.nodes.split(",") if x.strip()}))
    modes = tuple(m for m in a.modes.split(",") if m)
    if not nodes or nodes[0] < 2 or nodes[-1] > MAX_NODES:
        p.error(f"--nodes: values between 2 and {MAX_NODES}")
    if any(m not in MODES for m in modes):
        p.error(f"--modes: from {', '.join(MODES)}")
    if a.layers < 1 or a.size_mb <= 0 or a.upstream_mbit <= 0 or a.node_mbit <= 0:
        p.error("sizes, layers and rates must be positive")
    if a.client == "cri" and a.fetch_only:
        p.error("--fetch-only: kubelet's PullImage always unpacks (use --client ctr)")
    modes = _with_tls(modes, a.tls)
    settings = Settings(
        nodes=nodes,
        size_bytes=int(a.size_mb * MB),
        layers=a.layers,
        upstream_mbit=a.upstream_mbit,
        node_mbit=a.node_mbit,
        loopback=a.loopback,
        modes=modes,
        client_floor=not a.no_client_floor,
        snapshotter=a.snapshotter,
        unpack=not a.fetch_only,
        capacity_repeats=max(1, a.capacity_repeats),
        repeats=max(1, a.repeats),
        pull_timeout_s=a.pull_timeout_s,
        node_args=tuple(a.node_arg),
        seed=a.seed,
        tls=a.tls,
        tracker_args=tuple(a.tracker_arg),
        client=a.client,
    )
    return settings, a
