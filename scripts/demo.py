"""The demo: a seed registry, a tracker, p2preg nodes, and real containerd pulling.

Starts Debian's docker-registry with a generated multi-layer image, the
tracker, one node per simulated machine, and one containerd per node whose
`hosts.toml` mirror points at that node (the registry's own address is a
closed port, so every byte containerd gets went through the node). It pulls
the image on every node at once, shows each node's progress, and prints what
each node got from peers and from upstream, and what the seed registry sent
(counted from the registry's own log). Every process starts and stops through
harness/ (by pid, also on Ctrl-C); the demo must not start one any other way.
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
from harness.registry import Registry, open_registry
from harness.skopeo import push
from harness.tracker import open_tracker

SEED_NS = "seed.demo"
MiB = 1024 * 1024


def _received(node: NodeProcess) -> float:
    text = node.metrics()
    return sum(
        metric_value(text, name)
        for name in ("p2preg_upstream_blob_bytes_total", "p2preg_peer_blob_bytes_total")
    )


def _start_nodes(
    stack: ExitStack, workdir: Path, registry: Registry, count: int
) -> tuple[list[NodeProcess], list[Containerd]]:
    """A tracker, `count` nodes on it, and one containerd per node mirrored to it."""
    nodes: list[NodeProcess] = []
    daemons: list[Containerd] = []
    tracker = stack.enter_context(open_tracker(workdir / "tracker"))
    for i in range(count):
        p2p = ("--tracker", tracker.url, "--peer-host", "127.0.0.1", "--peer-port", "0")
        node = stack.enter_context(
            open_node(
                workdir / f"node{i}",
                [f"{SEED_NS}={registry.url}"],
                name=f"node{i}",
                args=(*p2p, "--node-name", f"node{i}"),
            )
        )
        nodes.append(node)
        daemons.append(stack.enter_context(open_containerd(workdir / f"ctrd{i}")))
        write_hosts_toml(workdir / f"hosts{i}", SEED_NS, node.url)
    return nodes, daemons


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


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--nodes", type=int, default=4, help="how many nodes pull (4)")
    parser.add_argument("--layers-mib", default="16,48,96", help="layer sizes in MiB")
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
        with console.status(f"starting a tracker, {args.nodes} nodes and containerd daemons…"):
            nodes, daemons = _start_nodes(stack, workdir, registry, args.nodes)
        ref = f"{SEED_NS}/{image.repository}:{image.tag}"
        console.print(f"pulling [bold]{ref}[/] with containerd through every node at once")
        size = sum(b.size for b in image.blobs)
        times = _pull_all(console, nodes, daemons, ref, size, workdir)
        registry.settle()
        _report(console, nodes, daemons, image, times)
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
