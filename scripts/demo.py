"""The demo: a seed registry, a tracker, p2preg nodes, and real containerd pulling.

Starts Debian's docker-registry with a generated multi-layer image, the
tracker, one node per simulated machine, and one containerd per node whose
`hosts.toml` mirror points at that node (the registry's own address is a
closed port, so every byte containerd gets went through the node). It pulls
the image on every node at once, shows each node's progress, and prints what
each node got from peers and from upstream, and what the seed registry sent
(counted from the registry's own log). Every process starts and stops through
harness/ (by pid, also on Ctrl-C); the demo must not start one any other way.

By default the cluster runs over TLS, as a real one should: the demo makes its
own cluster CA (harness.tlscerts, in memory), a tracker certificate naming
127.0.0.1 (libtorrent checks the tracker's hostname against an IP SAN) and one
certificate per node, whose name is the node's name. The tracker then speaks
HTTPS only and wants every node's certificate; the nodes swap blobs over
libtorrent SSL torrents rooted at that CA. The summary says what ran over TLS.
`--tls off` runs the same cluster in plain text (everything is on loopback).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import shutil
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from harness.containerd import Containerd, open_containerd, write_hosts_toml
from harness.images import PushedImage, build_image
from harness.node import NodeProcess, metric_value, open_node
from harness.procs import http_get
from harness.registry import Registry, open_registry
from harness.skopeo import push
from harness.tlscerts import ClusterCA
from harness.tracker import TrackerProcess, open_tracker

SEED_NS = "seed.demo"
CLUSTER = "demo"
MiB = 1024 * 1024
# Everything is on loopback: ports are free ones, the SSL peer port too.
LOOPBACK_PEERS = ("--peer-host", "127.0.0.1", "--peer-port", "0", "--peer-ssl-port", "0")


def _metric_sum(text: str, name: str) -> float:
    """The sum of every sample of `name` in Prometheus text, whatever its labels."""
    total = 0.0
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample.partition("{")[0] == name:
            total += float(value)
    return total


def _received(node: NodeProcess) -> float:
    text = node.metrics()
    return sum(
        metric_value(text, name)
        for name in ("p2preg_upstream_blob_bytes_total", "p2preg_peer_blob_bytes_total")
    )


def _tls_dirs(workdir: Path, count: int) -> tuple[Path, list[Path]]:
    """A cluster CA's tls_dirs: the tracker's (IP SAN 127.0.0.1) and one per node."""
    ca = ClusterCA.make(CLUSTER)
    certs = workdir / "certs"
    certs.mkdir(mode=0o700)
    tracker = ca.tls_dir(certs / "tracker", "tracker", "tracker", ips=("127.0.0.1",))
    return tracker, [ca.tls_dir(certs / f"node{i}", "node", f"node{i}") for i in range(count)]


def _start_nodes(
    stack: ExitStack, workdir: Path, registry: Registry, count: int, tls: bool
) -> tuple[TrackerProcess, list[NodeProcess], list[Containerd]]:
    """A tracker, `count` nodes on it, and one containerd per node mirrored to it.

    With `tls`, each node's name comes from its certificate (`p2preg://demo/node/nodeI`).
    """
    nodes: list[NodeProcess] = []
    daemons: list[Containerd] = []
    tracker_tls, node_tls = _tls_dirs(workdir, count) if tls else (None, [None] * count)
    tracker = stack.enter_context(open_tracker(workdir / "tracker", tls_dir=tracker_tls))
    for i in range(count):
        name = () if tls else ("--node-name", f"node{i}")
        node = stack.enter_context(
            open_node(
                workdir / f"node{i}",
                [f"{SEED_NS}={registry.url}"],
                name=f"node{i}",
                args=("--tracker", tracker.url, *LOOPBACK_PEERS, *name),
                tls_dir=node_tls[i],
            )
        )
        nodes.append(node)
        daemons.append(stack.enter_context(open_containerd(workdir / f"ctrd{i}")))
        write_hosts_toml(workdir / f"hosts{i}", SEED_NS, node.url)
    return tracker, nodes, daemons


def _pull_all(
    console: Console,
    nodes: list[NodeProcess],
    daemons: list[Containerd],
    ref: str,
    size: int,
    workdir: Path,
) -> list[float]:
    """Pull `ref` on every daemon at once, showing each node's progress; the pull times."""
    times: list[float] = [0.0] * len(nodes)

    def pull(i: int) -> None:
        start = time.monotonic()
        daemons[i].pull(ref, workdir / f"hosts{i}")
        times[i] = time.monotonic() - start

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
    )
    with (
        Progress(*columns, console=console) as progress,
        concurrent.futures.ThreadPoolExecutor(len(nodes)) as pool,
    ):
        tasks = [progress.add_task(f"node{i}", total=size) for i in range(len(nodes))]
        futures = [pool.submit(pull, i) for i in range(len(nodes))]
        while not all(f.done() for f in futures):
            for task, node in zip(tasks, nodes, strict=True):
                progress.update(task, completed=min(size, _received(node)))
            time.sleep(0.2)
        for task in tasks:
            progress.update(task, completed=size)
        for f in futures:
            f.result()
    return times


def _report(
    console: Console,
    nodes: list[NodeProcess],
    daemons: list[Containerd],
    image: PushedImage,
    times: list[float],
) -> None:
    table = Table(title="per node")
    for col in ("node", "pull time", "from peers", "from upstream", "unpacked"):
        table.add_column(col, justify="right")
    for i, node in enumerate(nodes):
        text = node.metrics()
        upstream = metric_value(text, "p2preg_upstream_blob_bytes_total")
        peers = metric_value(text, "p2preg_peer_blob_bytes_total")
        unpacked = daemons[i].is_unpacked(image.manifests[0])
        table.add_row(
            f"node{i}",
            f"{times[i]:.2f} s",
            f"{peers / MiB:.1f} MiB",
            f"{upstream / MiB:.1f} MiB",
            "yes" if unpacked else "[red]no[/]",
        )
    console.print(table)


def _transport(console: Console, tracker: TrackerProcess, nodes: list[NodeProcess]) -> None:
    """What crossed the cluster's links and how: the tracker's scheme, announces, peer bytes."""
    # With mutual TLS the tracker's own port wants a certificate: its metrics are on a plain one.
    text = http_get(f"{tracker.metrics_url or tracker.url}/metrics").text
    announces = _metric_sum(text, "p2preg_tracker_announces_total")
    # Joins and completions the control calls carried (docs/TRACKER.md).
    entered = _metric_sum(text, "p2preg_tracker_peers_entered_total")
    node_texts = [node.metrics() for node in nodes]
    peers = sum(_metric_sum(t, "p2preg_peer_blob_bytes_total") for t in node_texts)
    if tracker.metrics_url is None:
        console.print(
            f"cluster in plain text (--tls off): tracker {tracker.url}, {announces:.0f} "
            f"announces and {entered:.0f} peers entered by control calls; "
            f"{peers / MiB:.1f} MiB between nodes over plain BitTorrent"
        )
        return
    gate = _metric_sum(text, "p2preg_tracker_tls_refusals_total")
    peer_refused = sum(_metric_sum(t, "p2preg_peer_tls_refusals_total") for t in node_texts)
    console.print(
        f"cluster over TLS (CA {CLUSTER!r}, made for this run): tracker [bold]{tracker.url}[/], "
        f"{announces:.0f} announces and {entered:.0f} peers entered by control calls over "
        f"mutual TLS, each with a node's certificate "
        f"({gate:.0f} connections refused); [bold]{peers / MiB:.1f} MiB[/] between nodes over "
        f"SSL torrents, the only peer wire the nodes open ({peer_refused:.0f} handshakes refused)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--nodes", type=int, default=4, help="how many nodes pull (4)")
    parser.add_argument("--layers-mib", default="16,48,96", help="layer sizes in MiB")
    parser.add_argument(
        "--tls",
        choices=("on", "off"),
        default="on",
        help="mutual TLS to the tracker and between peers, with a CA made for the run (on)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    console = Console()
    sizes = tuple(int(float(s) * MiB) for s in args.layers_mib.split(","))
    workdir = Path(tempfile.mkdtemp(prefix="p2preg-demo-"))
    with ExitStack() as stack:
        with console.status("building the image and starting the seed registry…"):
            layout = build_image(workdir / "image", seed="demo", layer_sizes=sizes)
            registry = stack.enter_context(open_registry(workdir / "registry"))
            image = push(layout, registry.host, "demo/app")
        console.print(
            f"seed registry {registry.url}: pushed [bold]{image.repository}:{image.tag}[/] "
            f"({len(image.blobs)} blobs, {sum(b.size for b in image.blobs) / MiB:.1f} MiB)"
        )
        tls = args.tls == "on"
        with console.status(f"starting a tracker, {args.nodes} nodes and containerd daemons…"):
            tracker, nodes, daemons = _start_nodes(stack, workdir, registry, args.nodes, tls)
        ref = f"{SEED_NS}/{image.repository}:{image.tag}"
        console.print(f"pulling [bold]{ref}[/] with containerd through every node at once")
        size = sum(b.size for b in image.blobs)
        times = _pull_all(console, nodes, daemons, ref, size, workdir)
        registry.settle()
        _report(console, nodes, daemons, image, times)
        _transport(console, tracker, nodes)
        sent = sum(registry.blob_bytes_sent().values())
        console.print(
            f"seed registry sent {sent / MiB:.1f} MiB of blobs for a {size / MiB:.1f} MiB image "
            f"pulled {args.nodes} time(s): [bold]{sent / size:.2f}x[/] the image size"
        )
    if args.keep:
        console.print(f"work directory kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
