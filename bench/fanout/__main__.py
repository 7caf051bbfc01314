"""`python -m bench.fanout`: the whole fan-out benchmark, from the checks to the files it writes.

Owns the order of things: check the tools and root, reap or report stale
namespaces, build and push the image, build the cluster, serve the pushed
storage from the seed (and fast) registry, measure capacity, run every mode
and N (with repeats), then print the report and write the JSON and PNG. It
turns SIGTERM/SIGHUP into an interrupt so everything started is stopped by
pid and every namespace removed. What each step does lives in the sibling
modules; it must not measure or format anything itself.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console

import bench.fanout
from bench.data import write_random
from bench.fanout.capacity import (
    CURL_BIN,
    Capacity,
    measure_capacity_first,
    measure_capacity_ring,
)
from bench.fanout.cluster import Cluster, make_cluster, start_registry
from bench.fanout.document import document
from bench.fanout.report import plot, report, run_line
from bench.fanout.runs import RunResult, run_once
from bench.fanout.settings import CLIENT, MB, PREFIX_ROOT, REPO, Settings, parse_args
from harness.containerd import CONTAINERD_BIN, CTR_BIN
from harness.images import PushedImage, build_image
from harness.netns import remove_namespaces, stale_namespaces, unavailable_reason
from harness.nginx import NGINX_BIN
from harness.registry import REGISTRY_BIN, Registry, open_registry
from harness.skopeo import SKOPEO_BIN, push


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def build_and_push(
    workdir: Path, settings: Settings, console: Console
) -> tuple[PushedImage, int, Path]:
    per_layer = settings.size_bytes // settings.layers
    sizes = [per_layer] * settings.layers
    with console.status(
        f"building a {settings.size_bytes / MB:.0f} MB image in "
        f"{settings.layers} layers and pushing it…"
    ):
        layout = build_image(workdir / "image", seed=settings.seed, layer_sizes=sizes)
        # Pushed on loopback into the storage the seed registry then serves: the
        # push is not what is measured, and would take minutes over U.
        with open_registry(workdir / "push") as reg:
            pushed = push(layout, reg.host, REPO)
    image_bytes = sum(b.size for b in pushed.blobs)
    write_random(workdir / "capacity.bin", image_bytes)
    return pushed, image_bytes, workdir / "push" / "storage"


def _run_order(settings: Settings) -> list[tuple[str, int]]:
    """(mode, repeat) in the order they run.

    Direct pulls are bound by U and repeat within a few percent: once, first.
    The short, machine-bound runs are the noisy ones on a shared machine, so
    their repeats are interleaved (client, p2p, p2p_tls, then again), and
    with two p2p modes each repeat swaps which goes first: a change in the
    machine's load, or a cache warmed by the run before, falls on both alike.
    """
    order = [("direct", 0)] if "direct" in settings.modes else []
    p2p = [m for m in settings.modes if m != "direct"]
    for k in range(settings.repeats):
        client = [CLIENT] if settings.client_floor else []
        order += [(m, k) for m in client + (p2p[::-1] if k % 2 else p2p)]
    return order


def _prune(run_dir: Path, keep: bool) -> None:
    """Free a finished run's disk: all of it, or with `keep` all but the logs.

    A p2p run at N = 8 leaves about 4 GB (every containerd's content and
    snapshots, every node's store): kept until the end, ten runs filled the
    disk this machine shares.
    """
    if not keep:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    for heavy in [*run_dir.glob("ctrd*/root"), *run_dir.glob("node*/data")]:
        shutil.rmtree(heavy, ignore_errors=True)


def _modes_for(
    n: int,
    settings: Settings,
    cluster: Cluster,
    seed: Registry,
    fast: Registry | None,
    image: PushedImage,
    image_bytes: int,
    workdir: Path,
    console: Console,
    keep: bool = False,
) -> list[RunResult]:
    results: list[RunResult] = []
    for mode, k in _run_order(settings):
        run_dir = workdir / f"run-{mode}-{n}-{k}"
        run_dir.mkdir()
        try:
            r = run_once(
                mode, n, cluster, seed, fast, image, image_bytes, settings, run_dir, console
            )
        finally:
            _prune(run_dir, keep)
        r.repeat = k
        results.append(r)
        console.print(run_line(r, image_bytes))
        for failure in r.failures:
            console.print(f"  [red]{failure}[/]")
    return results


def _first_copy(cluster: Cluster, workdir: Path, image_bytes: int, console: Console) -> Capacity:
    if cluster.lab is not None:
        for role, qd in cluster.lab.shaping().items():
            console.print(f"[dim]{role}: {qd}[/]")
    blob = workdir / "capacity.bin"
    cap = measure_capacity_first(cluster, workdir, blob, image_bytes, 1, console)
    console.print(
        f"capacity: first copy over the upstream link {cap.first_copy_s:.2f} s "
        f"({image_bytes * 8 / cap.first_copy_s / 1e6:.1f} Mbit/s goodput)"
    )
    return cap


def run_benchmark(
    settings: Settings, workdir: Path, console: Console, keep: bool = False
) -> dict[str, Any]:
    results: list[RunResult] = []
    with ExitStack() as stack:
        cluster = make_cluster(stack, settings, workdir)
        pushed, image_bytes, storage = build_and_push(workdir, settings, console)
        console.print(
            f"image {REPO}: {len(pushed.blobs)} blobs, {image_bytes / MB:.1f} MB "
            f"({', '.join(f'{b.size / MB:.1f}' for b in pushed.manifests[0].layers)}"
            " MB layers)"
        )
        seed = start_registry(stack, cluster.seed_host, workdir, storage, "seed")
        fast = (
            start_registry(stack, cluster.fast_host, workdir, storage, "fast")
            if settings.client_floor
            else None
        )
        # The registry's name in every reference is its address: nothing is looked up in DNS.
        image = replace(pushed, registry_host=seed.host)
        cap = _first_copy(cluster, workdir, image_bytes, console)
        for n in settings.nodes:
            measure_capacity_ring(
                cap,
                cluster,
                n,
                workdir,
                workdir / "capacity.bin",
                image_bytes,
                settings.capacity_repeats,
                console,
            )
            console.print(
                f"capacity: ring of {n}: {cap.ring_s[n]:.2f} s "
                f"(runs {', '.join(f'{r:.2f}' for r in cap.ring_runs[n])})"
            )
            results += _modes_for(
                n, settings, cluster, seed, fast, image, image_bytes, workdir, console, keep
            )
    return document(settings, pushed, image_bytes, cap, results)


def disk_needed(settings: Settings) -> int:
    """Bytes of disk a run needs at its peak, with a margin left for others on the machine.

    One run at a time holds the disk (`_prune`): per host, containerd's
    content and native snapshots (about 3.5 S for 4 layers) and the node's
    store; beside them the image, its pushed copy and the capacity file.
    """
    per_host = 5 * settings.size_bytes
    return max(settings.nodes) * per_host + 4 * settings.size_bytes + 2 * 10**9


def _preflight(settings: Settings, reap_stale: bool, console: Console) -> bool:
    """Whether the tools, root and (unless --loopback) namespaces are there; says why not."""
    tools = [REGISTRY_BIN, CONTAINERD_BIN, CTR_BIN, SKOPEO_BIN, NGINX_BIN, CURL_BIN]
    missing = [str(t) for t in tools if not t.exists()]
    if missing:
        console.print(
            f"[red]missing: {', '.join(missing)}[/] (apt-get install docker-registry "
            "containerd skopeo nginx curl)"
        )
        return False
    if os.geteuid() != 0:
        console.print(
            "[red]containerd (and network namespaces) need root here[/]: run as root, as CI does"
        )
        return False
    need = disk_needed(settings)
    free = shutil.disk_usage(tempfile.gettempdir()).free
    if free < need:
        console.print(
            f"[red]{free / 1e9:.1f} GB free in {tempfile.gettempdir()}, the benchmark needs "
            f"about {need / 1e9:.1f} GB[/] (smaller --size-mb or --nodes)"
        )
        return False
    if settings.loopback:
        return True
    reason = unavailable_reason()
    if reason is not None:
        console.print(f"[red]cannot build the cluster:[/] {reason}")
        return False
    stale = stale_namespaces(PREFIX_ROOT)
    if stale and reap_stale:
        errors = remove_namespaces(stale)
        console.print(f"removed {len(stale) - len(errors)} stale namespace(s)")
    elif stale:
        console.print(
            f"[yellow]namespaces left by a benchmark that died:[/] "
            f"{' '.join(stale)} (--reap-stale removes them)"
        )
    return True


def _write(doc: dict[str, Any], out: Path, console: Console) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path = out / f"fanout-{stamp}.json"
    json_path.write_text(json.dumps(doc, indent=2, default=str))
    png_path = out / f"fanout-{stamp}.png"
    plot(doc, png_path)
    console.print(f"wrote {json_path} and {png_path} (whole run {doc['wall_s']:.0f} s)")


def main(argv: Sequence[str] | None = None) -> int:
    description = bench.fanout.__doc__.splitlines()[0] if bench.fanout.__doc__ else None
    settings, args = parse_args(argv, description)
    # Tables are wide; a log file or pipe gets them whole rather than cut at 80 columns.
    console = Console() if sys.stdout.isatty() else Console(width=180)
    if not _preflight(settings, args.reap_stale, console):
        return 2
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)
    workdir = Path(tempfile.mkdtemp(prefix=f"{PREFIX_ROOT}-{os.getpid()}-"))
    started = time.monotonic()
    try:
        doc = run_benchmark(settings, workdir, console, args.keep)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: everything started was stopped[/]")
        return 130
    finally:
        if args.keep:
            console.print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    doc["wall_s"] = time.monotonic() - started
    report(doc, console)
    _write(doc, args.out, console)
    failed = [f for r in doc["runs"] for f in r["failures"]]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
