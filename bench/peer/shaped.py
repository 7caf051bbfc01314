"""`python -m bench.peer.shaped`: bench.peer's swarm case on shaped links, for redundant bytes.

Owns one layout: a `harness.netns` lab as the fan-out builds it (one bridge,
`tc tbf` at `--node-mbit` with bench/fanout's 50 ms queue on each peer's link
in both directions), an unshaped tracker host, a seeder host and one host per
leecher; the seeder files the blob as a node that fetched it upstream and
seeds it; each round is bench.peer's `swarm` round (every leecher at once from
the seeder and each other, `bench.peer.rounds.swarm_round`) with each peer on
its own host. It reports what each leecher received twice as a share of the
blob, by libtorrent's reason (`ses.waste_piece_*`), and writes the JSON to
`--out`. `--peer-log PATH` has the first leecher write libtorrent's peer log
there (every message to and from each peer), which is how docs/SWARM.md's
"Redundant bytes on shaped links" was found. Namespaces are named
`p2psw-<pid>-<role>` and removed by name however the run ends. It must not
time anything itself (the round does) nor change a node setting.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.data import write_random
from bench.peer.cluster import SEEDER, TOKEN, Member, announce_urls, file_only, leecher
from bench.peer.rounds import REPO_ROOT, Memory, peers, swarm_round
from bench.peer.worker import READY_TIMEOUT_S
from harness.netns import open_lab, unavailable_reason
from harness.nsenter import call_in_netns
from harness.tracker import open_tracker
from p2preg.core.digest import Digest
from p2preg.core.metainfo import info_name
from tracker.metainfo import make_metainfo

MiB = 1 << 20
MB = 1e6
PREFIX_ROOT = "p2psw"
TRACKER_PORT = 8000
RESULTS = REPO_ROOT / "bench" / "results" / "peer_shaped.json"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.peer.shaped", description=__doc__)
    p.add_argument("--leechers", type=int, default=7, help="leechers, one host each (7)")
    p.add_argument("--size-mib", type=int, default=100, help="blob size (100 MiB)")
    p.add_argument("--node-mbit", type=float, default=200.0, help="each peer's link (200)")
    p.add_argument("--runs", type=int, default=2, help="rounds (2)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="libtorrent setting over the node's, on every peer (experiment)",
    )
    p.add_argument("--no-slow-peers", action="store_true", help="leechers drop no slow peer")
    p.add_argument("--nagle", action="store_true", help="peers leave Nagle on (before 2026-12-07)")
    p.add_argument("--super-seed", action="store_true",
                   help="the seeder super-seeds (BEP 16; experiment)")  # fmt: skip
    p.add_argument("--peer-log", help="the first leecher writes libtorrent's peer log here")
    p.add_argument("--transfer-timeout-s", type=float, default=180.0)
    p.add_argument("--out", type=Path, default=RESULTS)
    return p


def _summary(samples: list[Any], size: int) -> dict[str, Any]:
    """Each round's redundant bytes per leecher, as a share of the blob, and by reason."""
    rounds = []
    for s in samples:
        shares = [mb * MB / size for mb in s.detail["redundant_mb"]]
        reasons: dict[str, int] = {}
        for waste in s.detail["waste"]:
            for k, v in waste.items():
                reasons[k] = reasons.get(k, 0) + v
        rounds.append(
            {
                "seconds": round(s.seconds, 2),
                "redundant_share": {
                    "median": round(statistics.median(shares), 4),
                    "max": round(max(shares), 4),
                },
                "redundant_mb": s.detail["redundant_mb"],
                "waste_bytes_by_reason": reasons,
                "slow_drops": sum(len(d) for d in s.detail["slow_drops"]),
            }
        )
    return {"rounds": rounds}


def run(args: argparse.Namespace) -> dict[str, Any]:
    size = args.size_mib * MiB
    with tempfile.TemporaryDirectory(prefix=f"{PREFIX_ROOT}-") as tmp_name:
        tmp = Path(tmp_name)
        blob = tmp / "blob"
        digest = Digest("sha256", write_random(blob, size))
        seed_dir = tmp / "seed"
        seed_dir.mkdir()
        os.link(blob, seed_dir / info_name(digest))
        meta = make_metainfo(blob, digest, size)
        torrent = tmp / "blob.torrent"
        torrent.write_bytes(meta.data)
        with open_lab(f"{PREFIX_ROOT}-{os.getpid()}") as lab:
            th = lab.add_host("tracker", 2)
            b = args.node_mbit
            seed_host = lab.add_host("seed", 3, up_mbit=b, down_mbit=b)
            hosts = [
                lab.add_host(f"l{i}", 10 + i, up_mbit=b, down_mbit=b) for i in range(args.leechers)
            ]
            with open_tracker(
                tmp / "tracker",
                port=TRACKER_PORT,
                token=TOKEN,
                host=th.addr,
                netns=th.netns,
                insecure=True,
                args=["--log-level", "WARNING"],
                cwd=REPO_ROOT,
            ) as tracker:
                seeder = Member(tracker.url, SEEDER)
                call_in_netns(th.netns, lambda: file_only(seeder, meta))
                leechers = [Member(tracker.url, leecher(i)) for i in range(args.leechers)]
                urls = announce_urls(leechers)
                (seed_url,) = announce_urls([seeder])
                memory = Memory("cold", tmp / "scratch")
                with peers(args, "seed", torrent, [seed_dir], [seed_url], (), [seed_host]) as (s,):
                    s.expect("ready", READY_TIMEOUT_S)
                    samples = [
                        swarm_round(args, tmp, torrent, urls, s, size, f"r{r}", memory, hosts=hosts)
                        for r in range(args.runs)
                    ]
            shaping = lab.shaping()
    return {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in sorted(vars(args).items())},
        "blob_bytes": size,
        "shaping": shaping,
        **_summary(samples, size),
        "samples": [s.__dict__ for s in samples],
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if (why := unavailable_reason()) is not None:
        print(f"bench.peer.shaped: {why}", file=sys.stderr)
        return 2
    if args.leechers < 1 or args.size_mib < 1 or args.node_mbit <= 0 or args.runs < 1:
        print("bench.peer.shaped: leechers, size, rate and runs must be positive", file=sys.stderr)
        return 2
    # What bench.peer's worker flags read from the orchestrator's arguments.
    args.disk_io, args.verify = None, False
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for i, r in enumerate(result["rounds"]):
        share = r["redundant_share"]
        print(
            f"round {i}: {r['seconds']:.1f} s, redundant median {100 * share['median']:.1f} %"
            f" max {100 * share['max']:.1f} % of the blob, by reason {r['waste_bytes_by_reason']}"
        )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
