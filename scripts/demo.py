"""The demo: a seed registry, p2preg nodes, and real containerd pulling through them.

Starts Debian's docker-registry with a generated multi-layer image, one node
per simulated machine, and one containerd per node whose `hosts.toml` mirror
points at that node (the registry's own address is a closed port, so every
byte containerd gets went through the node). It pulls the image on every node
at once and prints what each node did and what the seed registry sent.
Everything it starts is stopped at the end, also on Ctrl-C.
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
from rich.table import Table

from tests.fixtures.containerd import Containerd, open_containerd, write_hosts_toml
from tests.fixtures.images import build_image, push
from tests.fixtures.node import NodeProcess, open_node
from tests.fixtures.registry import open_registry

SEED_NS = "seed.demo"
MiB = 1024 * 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1, help="how many nodes pull (1)")
    parser.add_argument("--layers-mib", default="8,24,48", help="layer sizes in MiB")
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
        nodes: list[NodeProcess] = []
        daemons: list[Containerd] = []
        with console.status(f"starting {args.nodes} node(s) and containerd daemon(s)…"):
            for i in range(args.nodes):
                node = stack.enter_context(
                    open_node(workdir / f"node{i}", [f"{SEED_NS}={registry.url}"], name=f"node{i}")
                )
                nodes.append(node)
                daemons.append(stack.enter_context(open_containerd(workdir / f"ctrd{i}")))
                write_hosts_toml(workdir / f"hosts{i}", SEED_NS, node.url)
        ref = f"{SEED_NS}/{image.repository}:{image.tag}"
        console.print(f"pulling [bold]{ref}[/] with containerd through every node at once")

        def pull(i: int) -> float:
            start = time.monotonic()
            daemons[i].pull(ref, workdir / f"hosts{i}")
            return time.monotonic() - start

        with (
            console.status("pulling…"),
            concurrent.futures.ThreadPoolExecutor(args.nodes) as pool,
        ):
            times = list(pool.map(pull, range(args.nodes)))
        registry.settle()
        table = Table(title="per node")
        for col in ("node", "pull time", "from upstream", "unpacked"):
            table.add_column(col, justify="right")
        for i, node in enumerate(nodes):
            upstream = node.metric("p2preg_upstream_blob_bytes_total")
            unpacked = daemons[i].is_unpacked(image.manifests[0])
            table.add_row(
                f"node{i}", f"{times[i]:.2f} s", f"{upstream / MiB:.1f} MiB",
                "yes" if unpacked else "[red]no[/]",
            )
        console.print(table)
        sent = sum(registry.blob_bytes_sent().values())
        size = sum(b.size for b in image.blobs)
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
