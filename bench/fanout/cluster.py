"""The fan-out benchmark's cluster: namespaces, shaping, and what runs on each host.

Owns building the hosts (a `harness.netns` lab: seed behind U, an unshaped
fast registry host and tracker host, N node hosts behind B each; or all of
them on 127.0.0.1 with `--loopback`) and starting on them, through the
harness, the seed registries, and per run a tracker, the nodes, one private
containerd per host with its `hosts.toml`, and nginx for the capacity runs.
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
    PEER_PORT,
    PREFIX_ROOT,
    REGISTRY_PORT,
    SEED_IX,
    START_TIMEOUT_S,
    TRACKER_IX,
    TRACKER_PORT,
    Settings,
)
from harness.containerd import CLOSED_SERVER, Containerd, open_containerd, write_hosts_toml
from harness.netns import Host, Lab, loopback_host, open_lab
from harness.nginx import open_nginx
from harness.node import NodeProcess, open_node
from harness.procs import Process
from harness.registry import Registry, open_registry
from harness.tracker import open_tracker
from tracker.config import is_loopback


@dataclass
class Cluster:
    lab: Lab | None
    seed_host: Host
    fast_host: Host
    tracker_host: Host
    node_hosts: list[Host]

    def tx_bytes(self, host: Host) -> int | None:
        return None if self.lab is None else self.lab.link_bytes(host)[1]


def _port(host: Host, fixed: int) -> int | None:
    """A fixed port in a namespace of its own; on loopback, None: the harness picks a free one."""
    return fixed if host.isolated else None


def make_cluster(stack: ExitStack, settings: Settings) -> Cluster:
    count = max(settings.nodes)
    if settings.loopback:
        return Cluster(
            None,
            loopback_host("seed"),
            loopback_host("fast"),
            loopback_host("tracker"),
            [loopback_host(f"n{i}") for i in range(count)],
        )
    lab = stack.enter_context(open_lab(f"{PREFIX_ROOT}-{os.getpid()}"))
    u, b = settings.upstream_mbit, settings.node_mbit
    seed = lab.add_host("seed", SEED_IX, up_mbit=u, down_mbit=u)
    fast = lab.add_host("fast", FAST_IX)
    tracker = lab.add_host("tracker", TRACKER_IX)
    nodes = [lab.add_host(f"n{i}", NODE_IX0 + i, up_mbit=b, down_mbit=b) for i in range(count)]
    return Cluster(lab, seed, fast, tracker, nodes)


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


def start_tracker(stack: ExitStack, host: Host, workdir: Path) -> tuple[str, Process]:
    tracker = stack.enter_context(
        open_tracker(
            workdir,
            host=host.addr,
            port=_port(host, TRACKER_PORT),
            netns=host.netns,
            start_timeout_s=START_TIMEOUT_S,
            # In a lab the tracker binds a namespace's address, beyond loopback:
            # a plain tracker there must say it is plain on purpose.
            insecure=not is_loopback(host.addr),
        )
    )
    return tracker.url, tracker.process


def start_nodes(
    stack: ExitStack,
    hosts: list[Host],
    run_dir: Path,
    upstream: str,
    tracker_url: str,
    extra: tuple[str, ...],
) -> list[NodeProcess]:
    """A node per host, its facade on the host's own 127.0.0.1, its peers on the host's address."""
    nodes: list[NodeProcess] = []
    for i, host in enumerate(hosts):
        args = ["--tracker", tracker_url, "--peer-host", host.addr]
        args += ["--peer-port", str(PEER_PORT if host.isolated else 0)]
        args += ["--node-name", host.role, "--log-json", *extra]
        started = open_node(
            run_dir / f"node{i}",
            [upstream],
            args=args,
            name=f"node-{host.role}",
            port=_port(host, FACADE_PORT),
            netns=host.netns,
            wait=False,
            insecure=True,  # plain; bench/fanout's TLS mode comes with its own tls_dirs
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


def start_stage(
    stack: ExitStack,
    mode: str,
    hosts: list[Host],
    registry: Registry,
    link_host: Host,
    settings: Settings,
    run_dir: Path,
    tracker_host: Host,
) -> Stage:
    nodes: list[NodeProcess] = []
    tracker: Process | None = None
    if mode == "p2p":
        tracker_url, tracker = start_tracker(stack, tracker_host, run_dir / "tracker")
        upstream = f"{registry.host}={registry.url}"
        nodes = start_nodes(stack, hosts, run_dir, upstream, tracker_url, settings.node_args)
    daemons = [
        stack.enter_context(open_containerd(run_dir / f"ctrd{i}", snapshotter=settings.snapshotter))
        for i in range(len(hosts))
    ]
    hosts_dirs = [run_dir / f"hosts{i}" for i in range(len(hosts))]
    for i, hd in enumerate(hosts_dirs):
        if mode == "p2p":
            # The registry's own address is a closed port here: a pull that
            # succeeds went through the node.
            write_hosts_toml(hd, registry.host, nodes[i].url, server=CLOSED_SERVER)
        else:
            # containerd 1.6 rejects a hosts.toml with only `server`, so the
            # registry is also its one host entry.
            write_hosts_toml(hd, registry.host, registry.url, server=registry.url)
    return Stage(registry, link_host, nodes, tracker, daemons, hosts_dirs)
