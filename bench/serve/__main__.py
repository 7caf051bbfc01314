"""`python -m bench.serve`: the serve benchmark's setup, run, report and JSON.

Owns the command line, the order of things (a seed registry through
harness.registry with the blob pushed, a node through harness.node warmed
until it holds the blob verified, nginx through harness.nginx on that very
file, then the 1-stream and N-stream cases and an optional profile), the
machine description, the table and bench/results/serve.json (its `params`
record every knob, `tls` included). What a round does lives in
bench.serve.measure; it must not time anything itself.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

import bench.serve
from bench.machine import add_tls_flag, status_kib, version_of
from bench.serve.client import RECV_BUFFER, fetch
from bench.serve.measure import (
    PROFILE_GETS,
    QUIET_BUSY,
    Case,
    RssWatch,
    measure,
    pin,
    profile_node,
)
from bench.serve.seed import OCI_MANIFEST, REPO, TAG, make_blob, push_image
from harness.nginx import NGINX_BIN, open_nginx
from harness.node import NodeProcess, open_node
from harness.registry import open_registry

MiB = 1 << 20
RESULTS = Path(__file__).resolve().parents[1] / "results" / "serve.json"

console = Console()


def machine() -> dict[str, object]:
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        "?",
    )
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "memory_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nginx": version_of([str(NGINX_BIN), "-v"]),
        "docker_registry": version_of(["docker-registry", "--version"]),
        "hypercorn": metadata.version("hypercorn"),
        "quart": metadata.version("quart"),
        "trio": metadata.version("trio"),
    }


def _warm_node(
    stack: contextlib.ExitStack, args: argparse.Namespace, tmp: Path, size: int
) -> tuple[NodeProcess, str, Path]:
    """A seed registry holding the blob, and a node that fetched, verified and stored it."""
    blob = tmp / "layer.bin"
    blob_hex = make_blob(blob, size)
    registry = stack.enter_context(open_registry(tmp / "registry"))
    push_image(registry.url, blob, blob_hex)
    blob.unlink()  # the registry holds its own copy now
    console.print(f"pushed sha256:{blob_hex[:16]}… ({size} bytes) to {registry.url}")
    node = stack.enter_context(
        open_node(
            tmp / "node",
            [f"bench={registry.url}"],
            args=["--max-blob-streams", str(args.max_blob_streams)],
            env={"P2PREG_STREAM_CHUNK_BYTES": str(args.chunk_bytes)},
        )
    )
    r = httpx.get(
        f"{node.url}/v2/{REPO}/manifests/{TAG}",
        headers={"Accept": OCI_MANIFEST},
        timeout=60.0,
        trust_env=False,
    )
    r.raise_for_status()
    blob_url = f"{node.url}/v2/{REPO}/blobs/sha256:{blob_hex}"
    fetch(blob_url, size, sha256=blob_hex)  # fetched from upstream, verified, stored
    stored = node.data_dir / "blobs" / "sha256" / blob_hex
    if not stored.is_file() or stored.stat().st_size != size:
        raise RuntimeError(f"the node did not store the blob at {stored}")
    console.print(f"node {node.url} (pid {node.process.pid}) holds the blob at {stored}")
    return node, blob_url, stored


def _params(args: argparse.Namespace, size: int) -> dict[str, object]:
    return {
        "blob_bytes": size,
        "runs": args.runs,
        "streams": args.streams,
        "gets_per_stream_per_run": args.gets,
        "stream_chunk_bytes": args.chunk_bytes,
        "max_blob_streams": args.max_blob_streams,
        "client": f"raw socket, recv_into a reused {RECV_BUFFER} byte buffer, "
        "one thread per stream",
        "nginx": "sendfile on, tcp_nopush on, worker_processes 1, access_log off",
        "pinned": "servers on CPU 0, client on CPU 1" if args.pin else "no",
        "tls": args.tls,
    }


def run(args: argparse.Namespace) -> dict[str, object]:
    size = args.size_mib * MiB
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="p2preg-bench-serve-")))
        console.print(f"[bold]bench/serve.py[/bold]: {args.size_mib} MiB blob, work dir {tmp}")
        node, blob_url, stored = _warm_node(stack, args, tmp, size)
        node_pid = node.process.pid
        ngx = stack.enter_context(open_nginx(tmp / "nginx", stored))
        targets = {"nginx": ngx.url, "node": blob_url}
        if args.pin:  # the servers share core 0, the client (this process) has core 1
            pin(node_pid, {0})
            pin(ngx.pid, {0})
            os.sched_setaffinity(0, {1})
        time.sleep(1.0)
        idle_kib = status_kib(node_pid, "VmRSS")
        cases: list[Case] = []
        for streams in (1, args.streams):
            console.print(f"[bold]{streams} stream(s)[/bold], {args.runs} rounds")
            cases.append(
                measure(targets, size, streams, args.runs, args.gets, lambda: RssWatch(node_pid))
            )
        if args.profile is not None:
            console.print(f"profiling the node with py-spy → {args.profile}")
            profile_node(node_pid, args.profile, blob_url, size, args.profile_streams, tmp)
        return {
            "benchmark": "serve",
            "command": " ".join(["python", "-m", "bench.serve", *sys.argv[1:]]),
            "machine": machine(),
            "params": _params(args, size),
            "node_idle_rss_kib": idle_kib,
            "cases": [
                {
                    **c.summary(),
                    "raw": asdict(c),
                    "rss_bound_kib": idle_kib + c.streams * args.chunk_bytes // 1024,
                }
                for c in cases
            ],
        }


def report(result: dict[str, object]) -> None:
    table = Table(title="Serving a cached blob: node vs nginx (GB/s = 10⁹ B/s)")
    for col in ("streams", "server", "median", "min", "max", "IQR", "node/nginx"):
        table.add_column(col, justify="right")
    cases = result["cases"]
    assert isinstance(cases, list)
    for c in cases:
        for server in ("nginx", "node"):
            s = c[f"{server}_bytes_per_s"]
            ratio = ""
            if server == "node":
                pr = c["ratio_per_round"]
                ratio = f"{c['ratio_of_medians']:.2f} (rounds {pr['min']:.2f}-{pr['max']:.2f})"
            table.add_row(
                str(c["streams"]),
                server,
                f"{s['median'] / 1e9:.2f}",
                f"{s['min'] / 1e9:.2f}",
                f"{s['max'] / 1e9:.2f}",
                f"{s['q1'] / 1e9:.2f}-{s['q3'] / 1e9:.2f}",
                ratio,
            )
    console.print(table)
    idle = result["node_idle_rss_kib"]
    assert isinstance(idle, int)
    for c in cases:
        console.print(
            f"node RSS, {c['streams']} stream(s): idle {idle / 1024:.1f} MiB, "
            f"peak {c['node_peak_rss_kib'] / 1024:.1f} MiB, "
            f"bound idle + streams * chunk = {c['rss_bound_kib'] / 1024:.1f} MiB"
        )
        busiest = max(c["raw"]["machine_busy_before"])
        if busiest > QUIET_BUSY:
            console.print(
                f"[yellow]{c['streams']} stream(s): some runs started with the machine "
                f"{busiest:.0%} busy (others were using it): treat them with care[/yellow]"
            )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="serve.py", description=(bench.serve.__doc__ or "").splitlines()[0]
    )
    p.add_argument("--size-mib", type=int, default=256, help="blob size in MiB (256)")
    p.add_argument("--runs", type=int, default=5, help="alternating rounds per case (5)")
    p.add_argument("--streams", type=int, default=4, help="concurrent streams, second case (4)")
    p.add_argument("--gets", type=int, default=4, help="whole-blob GETs per stream per run (4)")
    p.add_argument(
        "--chunk-bytes", type=int, default=MiB, help="the node's stream_chunk_bytes (1 MiB)"
    )
    p.add_argument("--max-blob-streams", type=int, default=64, help="the node's cap (64)")
    p.add_argument(
        "--profile",
        type=Path,
        help=f"then write py-spy's collapsed stacks of the node serving {PROFILE_GETS} GETs "
        "per stream here",
    )
    p.add_argument("--profile-streams", type=int, default=1, help="streams while profiling (1)")
    p.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="pin nginx and the node to CPU 0 and the client to CPU 1 (off)",
    )
    p.add_argument("--output", type=Path, default=RESULTS, help=f"JSON ({RESULTS})")
    add_tls_flag(p)
    args = p.parse_args(argv)
    if min(args.size_mib, args.runs, args.gets) < 1 or not 1 <= args.streams <= 64:
        p.error("--size-mib, --runs and --gets must be ≥ 1, --streams 1..64")
    result = run(args)
    report(result)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
