"""What the links and the machine do with no p2preg code in the path: first copy and ring(N).

Owns the capacity measurements behind the bound: the first copy (nginx on the
seed host, curl on n0, the image's size over U) and ring(N) (every node host
fetches the same size from nginx on its neighbour, all at once, written to
disk), each the best of its repeats, and the bound and floor they give with
client(N). It starts nginx only through the cluster module, runs curl inside
the hosts' namespaces, and must not touch anything p2preg runs.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from bench.fanout.cluster import Cluster, start_nginx
from bench.fanout.settings import MB
from harness.netns import Host
from harness.procs import clean_env

CURL_BIN = Path("/usr/bin/curl")


@dataclass
class Capacity:
    """What the machine and the links do with no p2preg code in the path."""

    first_copy_s: float
    first_copy_runs: list[float]
    ring_s: dict[int, float] = field(default_factory=dict)
    ring_runs: dict[int, list[float]] = field(default_factory=dict)


def bounds(cap: Capacity, client_s: float | None, n: int) -> tuple[float, float]:
    """(bound, floor) for N: first copy + max(ring, client), and max(first copy, ring, client)."""
    spread = max(cap.ring_s.get(n, 0.0), client_s or 0.0)
    return cap.first_copy_s + spread, max(cap.first_copy_s, spread)


def _curl_argv(host: Host, url: str, out: Path, timeout_s: float) -> list[str]:
    return host.argv(
        [
            CURL_BIN,
            "-sS",
            "-f",
            "--noproxy",
            "*",
            "--max-time",
            f"{timeout_s:g}",
            "-o",
            out,
            "-w",
            "%{size_download}",
            url,
        ]
    )


def fetch_all(fetches: Sequence[tuple[Host, str, Path]], size: int, timeout_s: float) -> float:
    """Run one curl per (host, url, file) at once; the wall time until the last is done."""
    procs: list[subprocess.Popen[str]] = []
    start = time.monotonic()
    try:
        for host, url, out in fetches:
            procs.append(
                subprocess.Popen(
                    _curl_argv(host, url, out, timeout_s),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    stdin=subprocess.DEVNULL,
                    env=clean_env(),
                )
            )
        for p, (host, url, _out) in zip(procs, fetches, strict=True):
            stdout, stderr = p.communicate(timeout=timeout_s + 10)
            if p.returncode != 0 or int(stdout.strip() or 0) != size:
                raise RuntimeError(
                    f"curl {url} on {host.role}: exit {p.returncode}, "
                    f"{stdout.strip()} bytes: {stderr.strip()}"
                )
        return time.monotonic() - start
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        for _host, _url, out in fetches:
            out.unlink(missing_ok=True)


def measure_capacity_first(
    cluster: Cluster, workdir: Path, blob: Path, size: int, repeats: int, console: Console
) -> Capacity:
    runs: list[float] = []
    with ExitStack() as stack:
        url = start_nginx(stack, cluster.seed_host, workdir / "cap-first", blob)
        client = cluster.node_hosts[0]
        for _ in range(repeats):
            with console.status(
                f"capacity: first copy, {size / MB:.0f} MB from the registry "
                f"host to {client.role} (nginx → curl)…"
            ):
                runs.append(fetch_all([(client, url, workdir / "first.bin")], size, 900.0))
    return Capacity(first_copy_s=min(runs), first_copy_runs=runs)


def measure_capacity_ring(
    cap: Capacity,
    cluster: Cluster,
    n: int,
    workdir: Path,
    blob: Path,
    size: int,
    repeats: int,
    console: Console,
) -> None:
    hosts = cluster.node_hosts[:n]
    runs: list[float] = []
    with ExitStack() as stack:
        urls = [start_nginx(stack, h, workdir / f"cap-ring-{n}", blob) for h in hosts]
        fetches = [
            (h, urls[(i + 1) % n], workdir / f"ring-{h.role}.bin") for i, h in enumerate(hosts)
        ]
        for _ in range(repeats):
            with console.status(
                f"capacity: ring of {n}, each host fetches {size / MB:.0f} MB "
                "from its neighbour (nginx → curl), all at once…"
            ):
                runs.append(fetch_all(fetches, size, 900.0))
    cap.ring_s[n] = min(runs)
    cap.ring_runs[n] = runs
