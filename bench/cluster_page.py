"""What one load of the cluster page costs the tracker, by cluster size.

The page is built inside the tracker's trio loop (tracker/admin_http.py): while
`cluster_view` reads every live peer and `render_page` writes the HTML,
nothing else runs — no announce is answered. This measures that pause for a
tracker holding `--blobs` filed blobs, each with every one of `--nodes` nodes
as a peer, as the coordinator holds them after real announces (through
`Tracker.announce`, the code the HTTP port calls). It prints a table and
writes JSON to bench/results/. Not a test: no assertions on speed. Usage:

    .venv/bin/python -m bench.cluster_page [--nodes 100,1000,10000] [--blobs 50] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from p2preg.core.config import HostPort
from p2preg.core.digest import Digest
from tracker.announce import AnnounceRequest, Event
from tracker.cluster_page import render_page
from tracker.cluster_view import cluster_view
from tracker.config import TrackerConfig
from tracker.coordinator import Tracker
from tracker.metainfo import make_metainfo
from tracker.state import MemoryStore

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Row:
    nodes: int
    blobs: int
    peers: int
    view_ms: float
    render_ms: float
    page_bytes: int


def _filled(tmp: Path, nodes: int, blobs: int) -> Tracker:
    config = TrackerConfig(
        listen=HostPort("127.0.0.1", 0),
        data_dir=tmp,
        max_peers=10_000_000,
        max_peers_per_swarm=100_000,
    )
    tracker = Tracker(config, MemoryStore(), clock=time.monotonic)
    for b in range(blobs):
        data = os.urandom(16 * 1024)
        digest = Digest.of(data)
        path = tmp / f"blob-{b}"
        path.write_bytes(data)
        meta = make_metainfo(path, digest, len(data))
        tracker.registry.install(meta, f"node-{b % nodes}")
        (ih,) = meta.swarm_keys
        for n in range(nodes):
            req = AnnounceRequest(
                ih, n.to_bytes(20, "big"), 7000 + n % 50_000, n * 1000, 0,
                0 if n % 2 else 1, Event.NONE, 0, None, node=f"node-{n}",
            )
            tracker.announce(req, f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}", "http")
    return tracker


def _measure(nodes: int, blobs: int, repeats: int) -> Row:
    with tempfile.TemporaryDirectory(prefix="p2preg-bench-page-") as tmp:
        tracker = _filled(Path(tmp), nodes, blobs)
        views, renders, size = [], [], 0
        for _ in range(repeats):
            t0 = time.perf_counter()
            view = cluster_view(tracker, time.monotonic())
            t1 = time.perf_counter()
            size = len(render_page(view))
            t2 = time.perf_counter()
            views.append(t1 - t0)
            renders.append(t2 - t1)
        peers = tracker.peers.totals().peers
    return Row(nodes, blobs, peers, 1000 * min(views), 1000 * min(renders), size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--nodes", default="100,1000,10000", help="comma-separated node counts")
    parser.add_argument("--blobs", type=int, default=50, help="filed blobs, each on every node")
    parser.add_argument("--repeats", type=int, default=3, help="page loads per size (best kept)")
    args = parser.parse_args()
    rows = [_measure(int(n), args.blobs, args.repeats) for n in args.nodes.split(",")]
    table = Table(title="One cluster page load (the tracker's loop is paused meanwhile)")
    for name in ("nodes", "blobs", "live peers", "cluster_view ms", "render ms", "page KiB"):
        table.add_column(name, justify="right")
    for r in rows:
        table.add_row(
            str(r.nodes), str(r.blobs), str(r.peers), f"{r.view_ms:.1f}", f"{r.render_ms:.1f}",
            f"{r.page_bytes / 1024:.0f}",
        )
    Console().print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"cluster-page-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"args": vars(args), "results": [asdict(r) for r in rows]}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
