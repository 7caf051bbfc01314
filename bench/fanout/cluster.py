"""The fan-out benchmark's cluster: namespaces, shaping, and what runs on each host.

Owns building the hosts (a `harness.netns` lab: seed behind U, an unshaped
fast registry host and tracker host, N node hosts behind B each; or all of
them on 127.0.0.1 with `--loopback`) and starting on them, through the
harness, the seed registries, and per run a tracker, the nodes, one private
containerd per host with its `hosts.toml`, and nginx for the capacity runs.
With `--tls on|both` it also makes the cluster's certificates once (a CA in
memory, harness.tlscerts): the tracker's names its address as an IP SAN,
since libtorrent checks the tracker's hostname, and each node's is named after
its host; a p2p_tls run starts the tracker and nodes with them, a p2p run
without them (then `--insecure`, since a namespace's address is beyond loopback).
Everything it starts is entered on the caller's ExitStack, so it is stopped by
pid when the stack closes. It measures nothing and must not start a process
any way but through the harness.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from bench.fanout.settings import (
    FACADE_PORT,
    FAST_IX,
    NGINX_PORT,
    NODE_IX0,
    P2P_TLS,
    PEER_PORT,
    PEER_SSL_PORT,
    PREFIX_ROOT,
    REGISTRY_PORT,
    SEED_IX,
    START_TIMEOUT_S,
    TRACKER_IX,
    TRACKER_METRICS_PORT,
    TRACKER_PORT,
    Settings,
    is_p2p,
)
from harness.containerd import CLOSED_SERVER, Containerd, open_containerd, write_hosts_toml
from harness.netns import Host, Lab, loopback_host, open_lab
from harness.nginx import open_nginx
from harness.node import NodeProcess, open_node
from harness.procs import Process
from harness.registry import Registry, open_registry
from harness.tlscerts import ClusterCA
from harness.tracker import TrackerProcess, open_tracker
from tracker.config import is_loopback

CLUSTER_NAME = "fanout"


@dataclass(frozen=True)
class Certs:
    """The cluster's tls_dirs: the tracker's, and each node host's by its role (n0, n1, …)."""

    tracker: Path
    nodes: dict[str, Path]


@dataclass
class Cluster:
    lab: Lab | None
    seed_host: Host
    fast_host: Host
    tracker_host: Host
    node_hosts: list[Host]
    certs: Certs | None = None

    def tx_bytes(self, host: Host) -> int | None:
        return None if self.lab is None else self.lab.link_bytes(host)[1]


def _port(host: Host, fixed: int) -> int | None:
    """A fixed port in a namespace of its own; on loopback, None: the harness picks a free one."""
    return fixed if host.isolated else None


def make_certs(out: Path, tracker: Host, nodes: list[Host]) -> Certs:
    """A CA made here, a tracker certificate naming `tracker`'s address, one per node host."""
    ca = ClusterCA.make(CLUSTER_NAME)
    out.mkdir(mode=0o700)
    return Certs(
        ca.tls_dir(out / "tracker", "tracker", "tracker", ips=(tracker.addr,)),
        {h.role: ca.tls_dir(out / h.role, "node", h.role) for h in nodes},
    )


def make_cluster(stack: ExitStack, settings: Settings, workdir: Path) -> Cluster:
    count = max(settings.nodes)
    if settings.loopback:
        cluster = Cluster(
            None,
            loopback_host("seed"),
            loopback_host("fast"),
            loopback_host("tracker"),
            [loopback_host(f"n{i}") for i in range(count)],
        )
    else:
        lab = stack.enter_context(open_lab(f"{PREFIX_ROOT}-{os.getpid()}"))
        u, b = settings.upstream_mbit, settings.node_mbit
        seed = lab.add_host("seed", SEED_IX, up_mbit=u, down_mbit=u)
        fast = lab.add_host("fast", FAST_IX)
        tracker = lab.add_host("tracker", TRACKER_IX)
        nodes = [lab.add_host(f"n{i}", NODE_IX0 + i, up_mbit=b, down_mbit=b) for i in range(count)]
        cluster = Cluster(lab, seed, fast, tracker, nodes)
    if P2P_TLS in settings.modes:
        cluster.certs = make_certs(workdir / "certs", cluster.tracker_host, cluster.node_hosts)
    return cluster


def start_registry(
    stack: ExitStack, host: Host, workdir: Path, storage: Path, name: str
) -> Registry:
    """docker-registry serving `storage` (pushed once, beforehand) on `host`."""
    return stack.enter_context(
        open_registry(
            workdir,
            name=name,
            storage_dir=storage,
            host=host.addr,
            port=_port(host, REGISTRY_PORT),
            netns=host.netns,
            start_timeout_s=START_TIMEOUT_S,
        )
    )


def start_tracker(
    stack: ExitStack, host: Host, workdir: Path, tls_dir: Path | None, args: tuple[str, ...] = ()
) -> TrackerProcess:
    """The tracker on `host`: mutual TLS with `tls_dir`, else plain HTTP; `args` added."""
    tracker = stack.enter_context(
        open_tracker(
            workdir,
            args=args,
            host=host.addr,
            port=_port(host, TRACKER_PORT),
            netns=host.netns,
            start_timeout_s=START_TIMEOUT_S,
            tls_dir=tls_dir,
            metrics_port=_port(host, TRACKER_METRICS_PORT) if tls_dir else None,
            # In a lab the tracker binds a namespace's address, beyond loopback:
            # a plain tracker there must say it is plain on purpose.
            insecure=tls_dir is None and not is_loopback(host.addr),
        )
    )
    return tracker


def start_nodes(
    stack: ExitStack,
    hosts: list[Host],
    run_dir: Path,
    upstream: str,
    tracker_url: str,
    extra: tuple[str, ...],
    certs: Certs | None = None,
) -> list[NodeProcess]:
    """A node per host, its facade on the host's own 127.0.0.1, its peers on the host's address.

    With `certs` each node has its host's certificate (which names it) and
    opens only the SSL peer port; without, it runs plain on purpose.
    """
    nodes: list[NodeProcess] = []
    for i, host in enumerate(hosts):
        args = ["--tracker", tracker_url, "--peer-host", host.addr]
        args += ["--peer-port", str(PEER_PORT if host.isolated else 0)]
        if certs is None:
            args += ["--node-name", host.role]
        else:
            args += ["--peer-ssl-port", str(PEER_SSL_PORT if host.isolated else 0)]
        args += ["--log-json", *extra]
        started = open_node(
            run_dir / f"node{i}",
            [upstream],
            args=args,
            name=f"node-{host.role}",
            port=_port(host, FACADE_PORT),
            netns=host.netns,
            wait=False,
            tls_dir=certs.nodes[host.role] if certs is not None else None,
            insecure=certs is None,
        )
        nodes.append(stack.enter_context(started))
    for node in nodes:  # started together, then waited for: the imports overlap
        node.wait_ready(START_TIMEOUT_S)
    return nodes


def start_nginx(stack: ExitStack, host: Host, workdir: Path, blob: Path) -> str:
    """nginx (one process, sendfile) serving `blob` on `host`; returns its URL."""
    server = open_nginx(
        workdir / f"nginx-{host.role}",
        blob,
        addr=host.addr,
        port=_port(host, NGINX_PORT),
        netns=host.netns,
        master=False,
    )
    return stack.enter_context(server).url


@dataclass
class Stage:
    """What one run started: its registry, tracker and nodes (p2p only), daemons, hosts dirs."""

    registry: Registry
    link_host: Host
    nodes: list[NodeProcess]
    tracker: Process | None
    daemons: list[Containerd]
    hosts_dirs: list[Path]
    # Where the tracker's /metrics is (p2p only), and the namespace to ask from.
    tracker_metrics_url: str | None = None
    tracker_netns: str | None = None


def start_stage(
    stack: ExitStack,
    mode: str,
    hosts: list[Host],
    registry: Registry,
    link_host: Host,
    settings: Settings,
    run_dir: Path,
    tracker_host: Host,
    certs: Certs | None = None,
) -> Stage:
    """What a run of `mode` needs; `certs` are used by a p2p_tls run only."""
    nodes: list[NodeProcess] = []
    tracker: Process | None = None
    metrics_url = None
    if is_p2p(mode):
        tls = certs if mode == P2P_TLS else None
        if mode == P2P_TLS and tls is None:
            raise ValueError("a p2p_tls run needs the cluster's certificates")
        tracker_tls = tls.tracker if tls is not None else None
        started = start_tracker(
            stack, tracker_host, run_dir / "tracker", tracker_tls, settings.tracker_args
        )
        tracker_url, tracker = started.url, started.process
        metrics_url = f"{started.metrics_url or started.url}/metrics"
        upstream = f"{registry.host}={registry.url}"
        extra = settings.node_args
        nodes = start_nodes(stack, hosts, run_dir, upstream, tracker_url, extra, tls)
    hosts_dirs = [run_dir / f"hosts{i}" for i in range(len(hosts))]
    # kubelet's client reads hosts.toml from the CRI plugin's config_path, and the
    # daemon itself fetches (ctr fetches in its own process, in the host's namespace).
    cri = settings.client == "cri"
    daemons = [
        stack.enter_context(
            open_containerd(
                run_dir / f"ctrd{i}",
                snapshotter=settings.snapshotter,
                cri=cri,
                cri_hosts_dir=hosts_dirs[i] if cri else None,
                netns=hosts[i].netns if cri else None,
            )
        )
        for i in range(len(hosts))
    ]
    for i, hd in enumerate(hosts_dirs):
        if is_p2p(mode):
            # The registry's own address is a closed port here: a pull that
            # succeeds went through the node.
            write_hosts_toml(hd, registry.host, nodes[i].url, server=CLOSED_SERVER)
        else:
            # containerd 1.6 rejects a hosts.toml with only `server`, so the
            # registry is also its one host entry.
            write_hosts_toml(hd, registry.host, registry.url, server=registry.url)
    return Stage(
        registry, link_host, nodes, tracker, daemons, hosts_dirs, metrics_url, tracker_host.netns
    )
