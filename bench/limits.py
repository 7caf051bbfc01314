"""How close to each bandwidth cap a node's rate gets: peer upload, peer download, upstream.

Starts, through the harness, a docker registry, a tracker and two nodes on
loopback (where libtorrent would exempt peers from its limits were the node
not to cover them). For each cap in `--caps` and each direction it sets the
cap on the running node through `PUT /_p2preg/limits` (what `p2preg limits
set` sends), moves a fresh layer of about cap * `--seconds` bytes and reports
the blob rate against the cap: node a pulls it from the registry
(`upstream_download`, a's cap), or node b pulls from a (`peer_upload`, a's
cap; `peer_download`, b's). The other caps stay off. Prints a table, writes
bench/results/limits.json. Not a test. Usage:

    .venv/bin/python -m bench.limits [--caps 256KiB,1MiB,4MiB] [--seconds 8]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from harness.images import build_image
from harness.node import NodeProcess, open_node
from harness.procs import wait_until
from harness.registry import open_registry
from harness.skopeo import push
from harness.tracker import open_tracker
from p2preg.node.rates import format_rate, parse_rate

RESULTS = Path(__file__).resolve().parent / "results" / "limits.json"
SEED_NS = "seed.test"
DIRECTIONS = ("upstream_download", "peer_upload", "peer_download")


@dataclass(frozen=True)
class Row:
    direction: str
    cap: int
    bytes: int
    seconds: float
    source: str  # where the blob came from: a peer row that went upstream is void

    @property
    def rate(self) -> float:
        return self.bytes / self.seconds


def set_caps(node: NodeProcess, **caps: int) -> None:
    every = dict.fromkeys(DIRECTIONS, 0) | caps
    r = httpx.put(f"{node.url}/_p2preg/limits", params=every, headers=node.admin_headers(),
                  timeout=10)
    r.raise_for_status()


def pull(node: NodeProcess, repository: str, digest: str) -> tuple[int, float]:
    started = time.monotonic()
    r = httpx.get(f"{node.url}/v2/{repository}/blobs/{digest}?ns={SEED_NS}", timeout=600)
    r.raise_for_status()
    return len(r.content), time.monotonic() - started


def run(caps: list[int], seconds: float, workdir: Path) -> list[Row]:
    # One layer per (cap, direction): nothing is served from a store twice.
    sizes = [max(2 << 20, int(cap * seconds)) for cap in caps for _ in DIRECTIONS]
    layout = build_image(workdir / "image", seed="bench-limits", layer_sizes=sizes)
    rows: list[Row] = []
    with ExitStack() as stack:
        registry = stack.enter_context(open_registry(workdir / "registry"))
        image = push(layout, registry.host, "bench/limits")
        layers = list(image.manifests[0].layers)  # in the order of `sizes`
        tracker = stack.enter_context(open_tracker(workdir / "tracker"))

        def node(name: str) -> NodeProcess:
            args = ("--tracker", tracker.url, "--peer-host", "127.0.0.1", "--peer-port", "0",
                    "--node-name", name)
            return stack.enter_context(
                open_node(workdir / name, [f"{SEED_NS}={registry.url}"], args=args, name=name)
            )

        a, b = node("a"), node("b")
        remaining = iter(layers)
        for cap in caps:
            for direction in DIRECTIONS:
                layer = next(remaining)
                if direction == "upstream_download":
                    set_caps(a, upstream_download=cap)
                    got, took = pull(a, image.repository, layer.digest)
                    rows.append(Row(direction, cap, got, took, "upstream"))
                    continue
                set_caps(a)
                seeded = a.metric("p2preg_blobs_seeded")
                pull(a, image.repository, layer.digest)

                def seeding(before: float = seeded) -> bool:
                    return a.metric("p2preg_blobs_seeded") > before

                wait_until(seeding, timeout_s=30, what="a to seed the layer")
                set_caps(a, peer_upload=cap if direction == "peer_upload" else 0)
                set_caps(b, peer_download=cap if direction == "peer_download" else 0)
                from_peers = b.metric("p2preg_blob_fetches_total", source="peers")
                got, took = pull(b, image.repository, layer.digest)
                peers = b.metric("p2preg_blob_fetches_total", source="peers") > from_peers
                rows.append(Row(direction, cap, got, took, "peers" if peers else "upstream"))
                set_caps(b)
    return rows


def report(rows: list[Row], console: Console) -> None:
    table = Table(title="bandwidth caps: blob rate against the cap (loopback)")
    for name in ("direction", "cap", "bytes", "seconds", "rate", "rate / cap", "from"):
        table.add_column(name, justify="left" if name == "direction" else "right")
    for r in rows:
        table.add_row(r.direction, format_rate(r.cap).split(" (")[0], f"{r.bytes:,}",
                      f"{r.seconds:.1f}", format_rate(round(r.rate)).split(" (")[0],
                      f"{r.rate / r.cap:.2f}", r.source)
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.limits", description=__doc__)
    parser.add_argument("--caps", default="256KiB,1MiB,4MiB", help="caps, comma-separated")
    parser.add_argument("--seconds", type=float, default=8.0, help="transfer length at the cap")
    args = parser.parse_args()
    caps = [parse_rate(c) for c in args.caps.split(",") if c.strip()]
    if not caps or 0 in caps:
        parser.error("--caps takes nonzero rates such as 256KiB,1MiB")
    with tempfile.TemporaryDirectory(prefix="bench-limits-") as tmp:
        rows = run(caps, args.seconds, Path(tmp))
    report(rows, Console(width=120))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": platform.node(), "args": vars(args),
        "rows": [asdict(r) | {"rate_over_cap": round(r.rate / r.cap, 3)} for r in rows],
    }, indent=2))


if __name__ == "__main__":
    main()
