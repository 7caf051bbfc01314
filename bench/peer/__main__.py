"""`python -m bench.peer`: the peer throughput benchmark's setup, run and report.

Owns the command line (the benchmark's flags and the worker's hidden ones),
the blob, its metainfo (with a forced piece size for `--piece-kib`), which
node each peer is (the trackers and filing are bench.peer.cluster's), nginx
through harness.nginx, the order of the rounds, the swarm/nginx ratios, the table and
bench/results/peer.json (every flag, `--tls` included, is in its `args`). A
`--role seed|leech` run is the worker (bench.peer.worker), nothing else.
What a round does lives in bench.peer.rounds; it must not time anything itself.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libtorrent as lt
from rich.console import Console
from rich.table import Table

import bench.peer
from bench.data import write_random
from bench.machine import add_tls_flag, version_of
from bench.peer.cluster import (
    SEEDER,
    Member,
    TLSCluster,
    announce_urls,
    file_only,
    joining_seeder,
    leecher,
    piece_rule,
    seeding,
    tracker,
)
from bench.peer.rounds import REPO_ROOT, Case, Memory, Peer, Sample, nginx_round, swarm_round
from bench.peer.worker import parse_overrides, peer_settings, run_peer
from harness.nginx import NGINX_BIN, open_nginx
from p2preg.core.digest import Digest
from p2preg.core.metainfo import Metainfo, info_name
from tracker.metainfo import make_metainfo

MiB = 1 << 20
KiB = 1 << 10
MB = 1e6
RESULTS = REPO_ROOT / "bench" / "results" / "peer.json"
# What is measured; nginx*file are curl writing the blob to a file, as a node must.
# Each case: its name and whether it has one client (else N).
CASES = {
    "pair": ("swarm 1→1", True),
    # Both peers TLS nodes of one fresh cluster CA (SSL torrent, `s` port), with
    # a tracker of that CA: a pair as two TLS nodes make it.
    "pairtls": ("swarm 1→1 TLS", True),
    "nginx1": ("nginx 1 client", True),
    "nginx1file": ("nginx 1 client → file", True),
    "swarm": ("swarm 1→{n}", False),
    "nginxN": ("nginx {n} clients", False),
    "nginxNfile": ("nginx {n} clients → file", False),
    # One leecher, two fast seeders (`seed` and `seed-2`), and beside them a
    # seeder limited to --slow-kib-s (`slow`); `fast2` is the same swarm
    # without it. Asking for `slowpeer` runs `fast2` too: their time ratio.
    "fast2": ("swarm 2 fast → 1", True),
    "slowpeer": ("swarm 2 fast + 1 slow → 1", True),
}

console = Console()


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "libtorrent": lt.__version__,
        "nginx": version_of([str(NGINX_BIN), "-v"]),
        "curl": version_of(["curl", "--version"]),
    }


def _jsonable(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v if isinstance(v, bool | str) else int(v) for k, v in sorted(settings.items())}


def _prepare(args: argparse.Namespace, tmp: Path, size: int) -> tuple[Path, Path, Metainfo]:
    """The blob, the seeder's hard link to it, and its metainfo (written to blob.torrent)."""
    blob = tmp / "blob"
    digest = Digest("sha256", write_random(blob, size))
    seed_dir = tmp / "seed"
    seed_dir.mkdir()
    os.link(blob, seed_dir / info_name(digest))
    with piece_rule(args.piece_kib * KiB if args.piece_kib else None):
        meta = make_metainfo(blob, digest, size, hybrid=args.hybrid)
    (tmp / "blob.torrent").write_bytes(meta.data)
    console.print(
        f"blob {size / MiB:.0f} MiB, piece {meta.piece_size // KiB} KiB, "
        f"{'hybrid' if args.hybrid else 'v2'}, overrides {args.set or 'none'}, "
        f"disk_io {args.disk_io or 'default'}"
    )
    return blob, seed_dir, meta


@dataclass(frozen=True)
class _TLSPair:
    """The TLS pair's SSL torrent, its seeder, the leecher's announce URL and worker flags."""

    torrent: Path
    seeder: Peer
    leecher_announce: str
    leecher_args: tuple[str, ...]


@contextlib.contextmanager
def tls_pair(
    args: argparse.Namespace, tmp: Path, blob: Path, meta: Metainfo, seed_dir: Path
) -> Iterator[_TLSPair | None]:
    """A fresh cluster CA, its tracker, an SSL torrent of the blob, and a TLS seeder of it."""
    if "pairtls" not in args.cases:
        yield None
        return
    pki = TLSCluster.make(tmp)
    piece_bytes = args.piece_kib * KiB if args.piece_kib else None
    with piece_rule(piece_bytes):
        ssl_meta = make_metainfo(
            blob, meta.digest, meta.size, hybrid=args.hybrid, root=pki.root_pem
        )
    torrent = tmp / "blob-tls.torrent"
    torrent.write_bytes(ssl_meta.data)
    with tracker(tmp / "tracker-tls", piece_bytes, tls_dir=pki.tracker) as url:
        seed = Member(url, SEEDER, pki.seed)
        with seeding(args, seed, ssl_meta, torrent, seed_dir, ("--tls-dir", str(pki.seed))) as s:
            # Under mTLS the certificate names the node: the leecher's URL is the seeder's.
            (announce,) = announce_urls([Member(url, "leech", pki.leech)])
            yield _TLSPair(torrent, s, announce, ("--tls-dir", str(pki.leech)))


@dataclass
class _Run:
    """What every round of one benchmark run shares."""

    args: argparse.Namespace
    tmp: Path
    # One per leecher of the swarm round (the pair's is the first): one node each.
    announces: list[str]
    seeder: Peer
    size: int
    memory: Memory
    nginx_url: str
    nginx_pid: int
    tls: _TLSPair | None = None
    # The slow-peer rounds' tracker, the metainfo and the blob, for their seeders.
    slow_url: str = ""
    meta: Metainfo | None = None
    blob: Path | None = None

    def slow_round(self, slow: bool, r: int) -> Sample:
        """`fast2`, or `slowpeer` (with the slow seeder), on the slow-peer tracker.

        The leecher starts alone (with `slowpeer`, beside the slow seeder only,
        at `--slow-from-kib-s`); `--slow-head-s` later the slow seeder drops to
        `--slow-kib-s` and two fast seeders join; the round is timed from the
        first one's `ready` to the leecher's flush: what the slow peer holds then.
        """
        assert self.meta is not None and self.blob is not None and self.slow_url
        meta, blob, url = self.meta, self.blob, self.slow_url
        tag = f"{'slow' if slow else 'fast'}{r}"
        torrent, work = self.tmp / "blob.torrent", self.tmp / tag
        with contextlib.ExitStack() as stack:

            def join(name: str, *extra: str) -> Peer:
                seeder = joining_seeder(
                    self.args, Member(url, name), meta, torrent, blob, work / name, extra
                )
                return stack.enter_context(seeder)

            slowpoke = None
            if slow:
                # On 127.0.0.1 like the fast seeders, as peers behind one NAT: the
                # leecher closes the slow one's connection, not the address's.
                slowpoke = join("slow", "--upload-limit", str(self.args.slow_from_kib_s * KiB))
                slowpoke.expect("ready", 60.0)

            def fast_seeders_join() -> float:
                time.sleep(self.args.slow_head_s)
                if slowpoke is not None:
                    slowpoke.send(f"rate {self.args.slow_kib_s * KiB}")
                    slowed = slowpoke.expect("rate", 10.0)["payload_up"]
                    sample_detail["slow_upload_before_bytes"] = slowed
                fast = [join("fast-1"), join("fast-2")]
                # (both check the blob at once: the first ready one serves from then)
                return min(float(s.expect("ready", 60.0)["at"]) for s in fast)

            sample_detail: dict[str, Any] = {}
            (announce,) = announce_urls([Member(url, leecher(0))])
            sample = swarm_round(
                self.args, self.tmp, torrent, [announce], self.seeder, self.size, tag,
                self.memory, midway=fast_seeders_join,
            )  # fmt: skip
            sample.detail.update(sample_detail)
            if slowpoke is not None:
                slowpoke.send("stats")
                sample.detail["slow_upload_bytes"] = slowpoke.expect("stats", 10.0)["payload_up"]
        shutil.rmtree(work, ignore_errors=True)
        sample.seconds = max(sample.detail["after_midway_s"])
        sample.mb_per_s = self.size / sample.seconds / MB
        return sample

    def round(self, key: str, case: Case, r: int) -> Sample:
        if key in ("fast2", "slowpeer"):
            return self.slow_round(key == "slowpeer", r)
        if key == "pairtls":
            assert self.tls is not None
            t = self.tls
            return swarm_round(
                self.args, self.tmp, t.torrent, [t.leecher_announce], t.seeder, self.size,
                f"tls{r}", self.memory, t.leecher_args,
            )
        if key in ("pair", "swarm"):
            torrent = self.tmp / "blob.torrent"
            announces = self.announces[: case.clients]
            return swarm_round(
                self.args, self.tmp, torrent, announces, self.seeder, self.size, f"{r}",
                self.memory,
            )
        store = self.tmp / "fetched" if key.endswith("file") else None
        if store:
            store.mkdir(exist_ok=True)
        gets = self.args.nginx_gets
        return nginx_round(
            self.nginx_url, self.size, case.clients, gets, self.memory, store, self.nginx_pid
        )


def _rounds(run: _Run, cases: dict[str, Case]) -> None:
    args = run.args
    for r in range(args.runs):
        order = [key for key in CASES if key in args.cases]
        if r % 2:
            order.reverse()
        for key in order:
            s = run.round(key, cases[key], r)
            cases[key].samples.append(s)
            cpu = (
                f"  seeder CPU {s.detail['seeder_cpu_pct']:.0f} %, leechers "
                f"{'/'.join(f'{c:.0f}' for c in s.detail['leecher_cpu_pct'])} %"
                if "seeder_cpu_pct" in s.detail
                else ""
            )
            console.print(
                f"  round {r + 1}/{args.runs} {cases[key].name:16}"
                f" {s.mb_per_s:8.0f} MB/s  (others used {s.others_cpus:.1f} CPUs){cpu}"
            )


def _measure(
    args: argparse.Namespace, tmp: Path, size: int, cases: dict[str, Case]
) -> tuple[Metainfo, Sample]:
    """Start the tracker, nginx and the seeder; the warm-up, then every round."""
    memory = Memory(args.memory, tmp / "memory-scratch")
    blob, seed_dir, meta = _prepare(args, tmp, size)
    torrent = tmp / "blob.torrent"
    piece_bytes = args.piece_kib * KiB if args.piece_kib else None
    with (
        tracker(tmp / "tracker", piece_bytes) as url,
        open_nginx(tmp / "nginx", blob) as ngx,
    ):
        leechers = [Member(url, leecher(i)) for i in range(args.leechers)]
        announces = announce_urls(leechers)
        with (
            seeding(args, Member(url, SEEDER), meta, torrent, seed_dir) as seeder,
            tls_pair(args, tmp, blob, meta, seed_dir) as tls,
            contextlib.ExitStack() as stack,
        ):
            # Seed mode checks each piece the first time it is sent: do that once.
            warmup = swarm_round(args, tmp, torrent, announces[:1], seeder, size, "warmup", memory)
            console.print(f"  warm-up pair (seeder checks pieces): {warmup.mb_per_s:.0f} MB/s")
            run = _Run(args, tmp, announces, seeder, size, memory, ngx.url, ngx.pid, tls)
            run.meta, run.blob = meta, blob
            if "fast2" in args.cases:
                run.slow_url = stack.enter_context(tracker(tmp / "tracker-slow", piece_bytes))
                file_only(Member(run.slow_url, SEEDER), meta)
            if tls is not None:
                w = run.round("pairtls", Case("warm-up TLS", 1), -1)
                console.print(f"  warm-up TLS pair (seeder checks pieces): {w.mb_per_s:.0f} MB/s")
            _rounds(run, cases)
    return meta, warmup


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    size = args.size_mib * MiB
    n = args.leechers
    parse_overrides(args.set)  # fail before starting anything
    if "slowpeer" in args.cases and "fast2" not in args.cases:
        args.cases.append("fast2")
    base = Path(args.workdir) if args.workdir else None
    tmp = Path(tempfile.mkdtemp(prefix="p2preg-bench-peer-", dir=base))
    cases = {
        key: Case(name.format(n=n), 1 if single else n) for key, (name, single) in CASES.items()
    }
    try:
        meta, warmup = _measure(args, tmp, size, cases)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "args": vars(args),
        "machine": machine(),
        "blob_bytes": size,
        "piece_bytes": meta.piece_size,
        "format": "hybrid" if args.hybrid else "v2",
        "memory": args.memory,
        "settings": _jsonable(peer_settings(parse_overrides(args.set))),
        "warmup": warmup.__dict__ if warmup else None,
        "cases": {k: c.summary() for k, c in cases.items() if c.samples},
        "ratios": ratios(cases),
    }


def ratios(cases: dict[str, Case]) -> dict[str, Any]:
    """swarm/nginx (and TLS pair/plain pair): of the medians, and each round's own ratio."""
    out: dict[str, Any] = {}
    for swarm, ngx in (
        ("pairtls", "pair"),
        # rates fast / slow: the slow-peer swarm's time over the same swarm's without it
        ("fast2", "slowpeer"),
        ("pair", "nginx1"),
        ("pair", "nginx1file"),
        ("swarm", "nginxN"),
        ("swarm", "nginxNfile"),
    ):
        a, b = cases[swarm].rates(), cases[ngx].rates()
        if not a or not b:
            continue
        per_round = [x / y for x, y in zip(a, b, strict=False)]
        out[f"{swarm}/{ngx}"] = {
            "of_medians": statistics.median(a) / statistics.median(b),
            "per_round_min": min(per_round),
            "per_round_max": max(per_round),
        }
    return out


def report(result: dict[str, Any], out: Path) -> None:
    n = result["args"]["leechers"]
    table = Table(
        title=f"Blob of {result['blob_bytes'] / MiB:.0f} MiB over loopback, MB/s (10⁶ B/s);"
        f" piece {result['piece_bytes'] // KiB} KiB, {result['format']},"
        f" {result['memory']} memory"
    )
    for col in ("case", "median", "min", "max", "rounds", "others' CPUs (max)"):
        table.add_column(col, justify="left" if col == "case" else "right")
    for case in result["cases"].values():
        rate = case["mb_per_s"]
        table.add_row(
            case["name"] + (" (aggregate)" if case["clients"] > 1 else ""),
            f"{rate['median']:,.0f}",
            f"{rate['min']:,.0f}",
            f"{rate['max']:,.0f}",
            str(len(case["samples"])),
            f"{max(x['others_cpus'] for x in case['samples']):.1f}",
        )
    console.print(table)
    ratios = Table(
        title="ratios: swarm / nginx, TLS pair / plain pair, 2 fast / 2 fast + slow"
        " (= time with the slow peer / without)"
    )
    for col in ("comparison", "of medians", "per round (min .. max)"):
        ratios.add_column(col, justify="left" if col == "comparison" else "right")
    for key, r in result["ratios"].items():
        swarm, ngx = key.split("/")
        ratios.add_row(
            f"{result['cases'][swarm]['name']} / {result['cases'][ngx]['name']}",
            f"{r['of_medians']:.3f}",
            f"{r['per_round_min']:.3f} .. {r['per_round_max']:.3f}",
        )
    console.print(ratios)
    for key in ("pair", "swarm"):
        case = result["cases"].get(key)
        if case is None:
            continue
        details = [s["detail"] for s in case["samples"]]
        uploaded = statistics.median(sum(d["leecher_upload_mb"]) for d in details)
        console.print(
            f"{case['name']}: tracker reply after "
            f"{statistics.median(min(d['tracker_reply_s']) for d in details) * 1000:.0f} ms,"
            f" seeder CPU {statistics.median(d['seeder_cpu_pct'] for d in details):.0f} %,"
            f" leecher CPU {statistics.median(max(d['leecher_cpu_pct']) for d in details):.0f} %"
            + (f", leechers uploaded {uploaded:.0f} MB" if key == "swarm" else "")
            + f" (of {n if key == 'swarm' else 1} x {result['blob_bytes'] / MB:.0f} MB)"
        )
    slow = result["cases"].get("slowpeer")
    if slow is not None:
        samples = slow["samples"]
        shares = [x["detail"]["slow_upload_bytes"] / result["blob_bytes"] for x in samples]
        seconds = ", ".join(f"{x['seconds']:.2f}" for x in samples)
        drops = ", ".join(str(len(x["detail"]["slow_drops"][0])) for x in samples)
        console.print(
            f"{slow['name']}: {seconds} s; the slow seeder sent"
            f" {', '.join(f'{x:.2%}' for x in shares)} of the blob;"
            f" slow peers the leecher disconnected: {drops}"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    console.print(f"wrote {out}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="peer.py", description=(bench.peer.__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--role", choices=["bench", "seed", "leech"], default="bench")
    parser.add_argument("--size-mib", type=int, default=200)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--leechers", type=int, default=4)
    parser.add_argument("--nginx-gets", type=int, default=3, help="fetches per nginx round")
    parser.add_argument("--cases", default=",".join(CASES), type=lambda s: s.split(","))
    parser.add_argument(
        "--memory",
        choices=["cold", "warm"],
        default="cold",
        help="guest memory state before a timed write (see Memory; warm is an experiment)",
    )
    parser.add_argument("--transfer-timeout-s", type=float, default=120.0)
    parser.add_argument(
        "--slow-kib-s", type=int, default=64, help="the slow seeder's upload limit (slowpeer)"
    )
    parser.add_argument(
        "--slow-from-kib-s",
        type=int,
        default=4096,
        help="slowpeer: the slow seeder's limit before it slows (a busy node was fast)",
    )
    parser.add_argument(
        "--slow-head-s",
        type=float,
        default=3.0,
        help="slowpeer: seconds the leecher has the slow seeder alone before the fast ones join",
    )
    parser.add_argument(
        "--no-slow-peers",
        action="store_true",
        help="leechers do not disconnect slow peers as a node does (p2preg/node/slowpeers.py)",
    )
    parser.add_argument(
        "--nagle",
        action="store_true",
        help="peers leave Nagle on, as nodes did before p2preg/node/peersockets.py",
    )
    parser.add_argument(
        "--super-seed",
        action="store_true",
        help="seeders offer each piece to one peer until it spreads (libtorrent's super"
        " seeding, BEP 16; experiment)",
    )
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--disk-io", choices=["default", "mmap", "posix", "pread"])
    parser.add_argument("--piece-kib", type=int, help="force this piece size (experiment)")
    parser.add_argument("--hybrid", action="store_true", help="v1+v2 metainfo (experiment)")
    parser.add_argument(
        "--verify", action="store_true", help="leechers also read back and hash the file"
    )
    parser.add_argument("--workdir", help="parent of the temporary work directory")
    parser.add_argument("--out", type=Path, default=RESULTS)
    add_tls_flag(parser)
    # Worker-only arguments.
    parser.add_argument("--torrent", help=argparse.SUPPRESS)
    parser.add_argument("--save-path", help=argparse.SUPPRESS)
    parser.add_argument("--announce", help=argparse.SUPPRESS)
    parser.add_argument("--tls-dir", help=argparse.SUPPRESS)
    parser.add_argument("--timeout-s", type=float, default=600.0, help=argparse.SUPPRESS)
    parser.add_argument("--upload-limit", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--full-check", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--peer-host", default="127.0.0.1", help=argparse.SUPPRESS)
    parser.add_argument("--peer-log", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role != "bench":
        return run_peer(args)
    report(run_bench(args), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
