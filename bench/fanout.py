"""Pull fan-out: N hosts pull one image at the same moment, straight from the seed
registry ("direct") and through each host's p2preg node ("p2p"), side by side.

It builds its own cluster on this machine (bench/netns.py): network namespaces
on one bridge, addresses in 198.18.0.0/24, `tc tbf` on every veth in both
directions. The seed registry (Debian's `docker-registry`) sits behind an
upstream link of U Mbit/s; a tracker host is unshaped; each of N node hosts has
a link of B Mbit/s and runs its own containerd (a daemon of its own; `ctr`, which
does the registry HTTP itself, runs in the host's namespace) and, in p2p mode,
its own p2preg node (facade on the host's 127.0.0.1, peers on its 198.18 address).
The registry is named by its IP address in every image reference, so no name is
ever looked up in DNS, and every `hosts.toml` has a working host entry.

Per mode and N it reports the time until the last node finished, p50/p90 of the
per-node pull times, the bytes that crossed the upstream link (the registry
link's tx counter, and the blob bytes the registry itself logged — never our own
metrics), per-node CPU and peak RSS of nodes, containerd and ctr, and, in p2p
mode, where the time went (first copy over U, spread through the swarm, client).

The machine is part of the limit (two cores receive, hash, write, unpack and
serve everything all N hosts move), so the same run measures it, with no
p2preg code involved:

- first copy: one host fetches an S-byte file from nginx on the registry host,
  over the U link (curl, written to disk);
- ring(N): every node host fetches S from nginx on its neighbour, all N at once,
  over their B links — the data movement of a perfectly balanced swarm;
- client(N): all N hosts `ctr images pull` the image at once from a second
  docker-registry on an unshaped host, over their B links — the network plus
  containerd's own receive/write/unpack work, without U and without p2preg.

bound(N) = first copy + max(ring(N), client(N)): the image must cross U once,
then every host must receive it and hand it to containerd, and the machine does
that no faster than measured (a store-and-forward bound; the targets use it).
Beside it: the network-only bound, first copy + ring(N), with no client work in
it, and floor(N) = max(first copy, ring(N), client(N)), what perfect cut-through
pipelining would allow. docs/BENCHMARKS.md argues the choice.

Prints progress and tables; writes bench/results/fanout-<time>.json and .png.
Needs root (containerd, and the namespaces; says so and stops otherwise);
`--loopback` runs the same on 127.0.0.1 with no namespaces and no shaping.
Everything it starts is stopped by pid and every namespace removed by name at
the end, also on Ctrl-C, SIGTERM or failure. The machine may be shared, so the
JSON records how busy it was just before each run; `--repeats` runs the short,
CPU-bound runs (client(N), p2p) several times and reports the median.

    .venv/bin/python -m bench.fanout                       # N = 2,4,8, S = 100 MB, L = 4
    .venv/bin/python -m bench.fanout --repeats 3           # medians of 3, ~13 min
    .venv/bin/python -m bench.fanout --nodes 16 --upstream-mbit 100
    .venv/bin/python -m bench.fanout --loopback --nodes 2,4 --size-mb 50
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, get_args

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from bench import nginx
from bench.netns import (
    Host,
    Lab,
    loopback_host,
    open_lab,
    remove_namespaces,
    stale_namespaces,
    unavailable_reason,
)
from tests.fixtures.containerd import (
    CLOSED_SERVER,
    CONTAINERD_BIN,
    CTR_BIN,
    Containerd,
    Snapshotter,
    open_containerd,
    write_hosts_toml,
)
from tests.fixtures.images import SKOPEO_BIN, ImageManifest, PushedImage, build_image, push
from tests.fixtures.node import metric_value
from tests.fixtures.procs import Process, clean_env, free_port, wait_until
from tests.fixtures.registry import REGISTRY_BIN, Registry, open_registry, registry_config

RESULTS = Path(__file__).parent / "results"
MB = 10**6
MiB = 1 << 20
REPO = "bench/app"
PREFIX_ROOT = "p2pfo"
CURL_BIN = Path("/usr/bin/curl")
SETPRIV_BIN = shutil.which("setpriv")
MODES = ("direct", "p2p")
CLIENT = "client"  # the client-floor run: not a mode under test, a measure of the machine

# Fixed ports are safe inside a namespace (each has its own port space).
REGISTRY_PORT, TRACKER_PORT, FACADE_PORT, PEER_PORT, NGINX_PORT = 5000, 6969, 5000, 6881, 8080
# Host numbers in 198.18.0.0/24.
SEED_IX, FAST_IX, TRACKER_IX, NODE_IX0 = 2, 3, 4, 10
MAX_NODES = 64
SAMPLE_S = 0.5
START_TIMEOUT_S = 30.0

_BLOB_LOG = re.compile(r"^blob (?P<digest>\S+) source=(?P<source>\S+) size=(?P<size>\d+) ")
_GO_DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|ms|us|µs|ns|m|s)")
_GO_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


# -- settings and results -------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    nodes: tuple[int, ...]
    size_bytes: int
    layers: int
    upstream_mbit: float
    node_mbit: float
    loopback: bool
    modes: tuple[str, ...]
    client_floor: bool
    snapshotter: Snapshotter
    unpack: bool
    capacity_repeats: int
    repeats: int
    pull_timeout_s: float
    node_args: tuple[str, ...]
    seed: str


@dataclass
class NodeRun:
    """One host's pull in one run."""

    host: str
    ok: bool
    pull_s: float
    unpack_s: float | None
    ctr_cpu_s: float
    containerd_cpu_s: float
    containerd_peak_rss_mib: float
    node_cpu_s: float | None = None
    node_peak_rss_mib: float | None = None
    node_from_peers_bytes: float | None = None
    node_redundant_bytes: float | None = None
    node_from_upstream_bytes: float | None = None
    node_fallbacks: float | None = None
    error: str | None = None


@dataclass
class RunResult:
    mode: str
    nodes: int
    all_done_s: float
    p50_s: float
    p90_s: float
    upstream_link_bytes: int | None
    upstream_log_blob_bytes: int
    upstream_log_all_bytes: int
    machine_busy: float
    machine_busy_before: float
    cpu_s: dict[str, float]
    phases: dict[str, float]
    per_node: list[NodeRun]
    timeline: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    repeat: int = 0
    # The run of its (mode, N) with the median time: the one tables and targets use.
    representative: bool = True


@dataclass
class Capacity:
    """What the machine and the links do with no p2preg code in the path."""

    first_copy_s: float
    first_copy_runs: list[float]
    ring_s: dict[int, float] = field(default_factory=dict)
    ring_runs: dict[int, list[float]] = field(default_factory=dict)


# -- small helpers ---------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def go_duration_s(text: str) -> float | None:
    parts = _GO_DURATION.findall(text)
    if not parts:
        return None
    return sum(float(n) * _GO_UNITS[u] for n, u in parts)


def _port(host: Host, fixed: int) -> int:
    return fixed if host.isolated else free_port()


def _curl(host: Host, *args: str, timeout_s: float = 5.0) -> subprocess.CompletedProcess[str]:
    argv = host.argv([CURL_BIN, "-sS", "--noproxy", "*", "--max-time", f"{timeout_s:g}", *args])
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout_s + 10,
        stdin=subprocess.DEVNULL,
        env=clean_env(),
    )


def http_get(host: Host, url: str, timeout_s: float = 10.0) -> str:
    proc = _curl(host, "-f", url, timeout_s=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"GET {url} on {host.role}: {proc.stderr.strip()}")
    return proc.stdout


def wait_http(host: Host, url: str, process: Process, timeout_s: float = START_TIMEOUT_S) -> None:
    """Wait until `url` answers anything over HTTP, asked from inside `host`."""

    def ready() -> bool:
        proc = _curl(host, "-o", "/dev/null", "-w", "%{http_code}", url, timeout_s=2.0)
        return proc.stdout.strip() not in ("", "000")

    wait_until(
        ready,
        timeout_s=timeout_s,
        what=f"GET {url} on {host.role}",
        process=process,
        interval_s=0.1,
    )


@dataclass(frozen=True)
class ProcStat:
    cpu_s: float
    peak_rss_mib: float


def proc_stat(pid: int) -> ProcStat:
    """CPU seconds (user + system) and peak RSS (VmHWM) of a live process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return ProcStat(float("nan"), float("nan"))
    fields = stat[stat.rindex(")") + 2 :].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    hwm = next(
        (int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), 0
    )
    return ProcStat(cpu, hwm / 1024)


class CpuMeter:
    """Fraction of all cores busy between two reads of /proc/stat."""

    def __init__(self) -> None:
        self._last = self._read()

    @staticmethod
    def _read() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = values[3] + values[4]  # idle + iowait
        return sum(values[:8]) - idle, sum(values[:8])

    def busy(self) -> float:
        now = self._read()
        busy, total = now[0] - self._last[0], now[1] - self._last[1]
        self._last = now
        return busy / total if total > 0 else 0.0


def content_bytes(daemon: Containerd) -> int:
    """Bytes in a containerd's content store, finished and in flight."""
    total = 0
    for dirpath, _dirs, files in os.walk(daemon.root / "io.containerd.content.v1.content"):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(dirpath, name)).st_size
    return total


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# -- the cluster ----------------------------------------------------------------------------


@dataclass
class Cluster:
    lab: Lab | None
    seed_host: Host
    fast_host: Host
    tracker_host: Host
    node_hosts: list[Host]

    def tx_bytes(self, host: Host) -> int | None:
        return None if self.lab is None else self.lab.link_bytes(host)[1]


def make_cluster(stack: ExitStack, settings: Settings) -> Cluster:
    count = max(settings.nodes)
    if settings.loopback:
        return Cluster(
            None,
            loopback_host("seed"),
            loopback_host("fast"),
            loopback_host("tracker"),
            [loopback_host(f"n{i}") for i in range(count)],
        )
    lab = stack.enter_context(open_lab(f"{PREFIX_ROOT}-{os.getpid()}"))
    u, b = settings.upstream_mbit, settings.node_mbit
    seed = lab.add_host("seed", SEED_IX, up_mbit=u, down_mbit=u)
    fast = lab.add_host("fast", FAST_IX)
    tracker = lab.add_host("tracker", TRACKER_IX)
    nodes = [lab.add_host(f"n{i}", NODE_IX0 + i, up_mbit=b, down_mbit=b) for i in range(count)]
    return Cluster(lab, seed, fast, tracker, nodes)


@contextlib.contextmanager
def run_registry(host: Host, workdir: Path, storage: Path, name: str) -> Iterator[Registry]:
    """docker-registry serving `storage` on `host` (the fixture's config, the host's address)."""
    port = _port(host, REGISTRY_PORT)
    config = registry_config(storage, port)
    config["http"]["addr"] = f"{host.addr}:{port}"
    config_path = workdir / f"{name}.yml"
    config_path.write_text(json.dumps(config, indent=2))
    access = workdir / f"{name}.access.log"
    proc = Process(
        host.argv([REGISTRY_BIN, "serve", config_path]),
        workdir,
        name=name,
        env=clean_env(drop_prefixes=["REGISTRY_"]),
        stdout_path=access,
    )
    with proc:
        url = f"http://{host.addr}:{port}"
        wait_http(host, f"{url}/v2/", proc)
        yield Registry(
            url=url,
            host=f"{host.addr}:{port}",
            port=port,
            workdir=workdir,
            storage_dir=storage,
            config_path=config_path,
            log_path=proc.log_path,
            access_log_path=access,
            token_auth=None,
            process=proc,
        )


@dataclass(frozen=True)
class NodeProc:
    host: Host
    url: str
    process: Process


def start_tracker(stack: ExitStack, host: Host, workdir: Path) -> tuple[str, Process]:
    port = _port(host, TRACKER_PORT)
    argv: list[str | os.PathLike[str]] = [
        sys.executable,
        "-m",
        "p2preg",
        "tracker",
        "--listen",
        f"{host.addr}:{port}",
        "--data-dir",
        workdir / "data",
    ]
    proc = stack.enter_context(
        Process(host.argv(argv), workdir, name="tracker", env=clean_env(drop_prefixes=["P2PREG_"]))
    )
    url = f"http://{host.addr}:{port}"
    wait_http(host, f"{url}/healthz", proc)
    return url, proc


def start_nodes(
    stack: ExitStack,
    hosts: Sequence[Host],
    run_dir: Path,
    upstream: str,
    tracker_url: str,
    extra: Sequence[str],
) -> list[NodeProc]:
    nodes: list[NodeProc] = []
    for i, host in enumerate(hosts):
        workdir = run_dir / f"node{i}"
        workdir.mkdir(parents=True)
        port = _port(host, FACADE_PORT)
        peer_port = PEER_PORT if host.isolated else 0
        argv: list[str | os.PathLike[str]] = [
            sys.executable,
            "-m",
            "p2preg",
            "node",
            "--listen",
            f"127.0.0.1:{port}",
            "--data-dir",
            workdir / "data",
            "--upstream",
            upstream,
            "--tracker",
            tracker_url,
            "--peer-host",
            host.addr,
            "--peer-port",
            str(peer_port),
            "--node-name",
            host.role,
            "--log-json",
            *extra,
        ]
        proc = stack.enter_context(
            Process(
                host.argv(argv),
                workdir,
                name=f"node-{host.role}",
                env=clean_env(drop_prefixes=["P2PREG_"]),
                term_grace_s=10.0,
            )
        )
        nodes.append(NodeProc(host, f"http://127.0.0.1:{port}", proc))
    for node in nodes:  # started together, then waited for: the imports overlap
        wait_http(node.host, f"{node.url}/healthz", node.process)
    return nodes


def start_nginx(stack: ExitStack, host: Host, workdir: Path, blob: Path) -> str:
    """nginx (one process, sendfile) serving `blob` on `host`; returns its URL."""
    root = workdir / f"nginx-{host.role}"
    root.mkdir(parents=True)
    port = _port(host, NGINX_PORT)
    argv = nginx.configure(root, host.addr, port, blob, master=False)
    proc = stack.enter_context(Process(host.argv(argv), root, name="nginx"))
    url = f"http://{host.addr}:{port}/blob"
    wait_http(host, url, proc)
    return url


def fetch_all(fetches: Sequence[tuple[Host, str, Path]], size: int, timeout_s: float) -> float:
    """Run one curl per (host, url, file) at once; the wall time until the last is done."""
    procs: list[subprocess.Popen[str]] = []
    start = time.monotonic()
    try:
        for host, url, out in fetches:
            argv = host.argv(
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
            procs.append(
                subprocess.Popen(
                    argv,
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


# -- one run: N hosts pull at once ----------------------------------------------------------


class _Pull:
    """One `ctr` child, reaped by a waiter thread with its rusage; killed only if unreaped."""

    def __init__(self, argv: list[str], out: Path, lock: threading.Lock) -> None:
        self._lock = lock
        self.out = out
        with out.open("wb") as f:
            self.popen = subprocess.Popen(
                argv,
                stdout=f,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=clean_env(drop_prefixes=["CONTAINERD_"]),
                start_new_session=True,
            )
        self.end: float | None = None
        self.rc: int | None = None
        self.cpu_s = 0.0
        self.reaped = threading.Event()
        threading.Thread(target=self._wait, daemon=True, name=f"ctr-{self.popen.pid}").start()

    def _wait(self) -> None:
        pid = self.popen.pid
        # Wait without reaping, so the pid cannot be reused while kill() may still aim at it.
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        end = time.monotonic()
        with self._lock:
            _, status, usage = os.wait4(pid, 0)
            self.rc = self.popen.returncode = os.waitstatus_to_exitcode(status)
            self.cpu_s = usage.ru_utime + usage.ru_stime
            self.end = end
            self.reaped.set()

    def kill(self) -> None:
        with self._lock:
            if not self.reaped.is_set():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.popen.pid, signal.SIGKILL)


def _ctr_argv(host: Host, daemon: Containerd, hosts_dir: Path, ref: str, unpack: bool) -> list[str]:
    args: list[str | os.PathLike[str]] = [
        CTR_BIN,
        "--address",
        daemon.address,
        "--namespace",
        daemon.namespace,
    ]
    if unpack:
        args += ["images", "pull", "--hosts-dir", hosts_dir, "--snapshotter", daemon.snapshotter]
    else:
        args += ["content", "fetch", "--hosts-dir", hosts_dir]
    argv = host.argv([*args, ref])
    # Like Process: if this benchmark is killed outright, the kernel ends its pulls too.
    return [SETPRIV_BIN, "--pdeathsig", "KILL", "--", *argv] if SETPRIV_BIN else argv


def _blob_events(log: Path, t0_wall: float) -> list[tuple[str, str, float]]:
    """(digest, source, seconds after t0) for every blob a node fetched, from its JSON log."""
    events: list[tuple[str, str, float]] = []
    with contextlib.suppress(OSError):
        for line in log.read_text("utf-8", "replace").splitlines():
            if not line.startswith("{"):
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            m = _BLOB_LOG.match(str(rec.get("msg", "")))
            if m is None:
                continue
            ts = datetime.strptime(rec["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
            events.append((m["digest"], m["source"], ts.timestamp() - t0_wall))
    return events


def _fallbacks(metrics: str) -> float:
    return sum(
        float(line.rpartition(" ")[2])
        for line in metrics.splitlines()
        if line.startswith("p2preg_fallbacks_total")
    )


def run_once(
    mode: str,
    n: int,
    cluster: Cluster,
    seed: Registry,
    fast: Registry | None,
    image: PushedImage,
    image_bytes: int,
    settings: Settings,
    run_dir: Path,
    console: Console,
) -> RunResult:
    """Start fresh nodes/daemons, pull on all `n` hosts at the same moment, measure, stop."""
    hosts = cluster.node_hosts[:n]
    registry = fast if mode == CLIENT and fast is not None else seed
    link_host = cluster.fast_host if registry is fast else cluster.seed_host
    ref = f"{registry.host}/{image.repository}:{image.tag}"
    manifest = image.manifests[0]
    failures: list[str] = []
    with ExitStack() as stack:
        nodes: list[NodeProc] = []
        tracker_proc: Process | None = None
        with console.status(
            f"{mode} N={n}: starting {n} containerd"
            + (f", a tracker and {n} nodes…" if mode == "p2p" else "…")
        ):
            if mode == "p2p":
                tracker_url, tracker_proc = start_tracker(
                    stack, cluster.tracker_host, run_dir / "tracker"
                )
                nodes = start_nodes(
                    stack,
                    hosts,
                    run_dir,
                    f"{registry.host}={registry.url}",
                    tracker_url,
                    settings.node_args,
                )
            daemons = [
                stack.enter_context(
                    open_containerd(run_dir / f"ctrd{i}", snapshotter=settings.snapshotter)
                )
                for i in range(n)
            ]
            hosts_dirs = [run_dir / f"hosts{i}" for i in range(n)]
            for i, hd in enumerate(hosts_dirs):
                if mode == "p2p":
                    # The registry's own address is a closed port here: a pull that
                    # succeeds went through the node.
                    write_hosts_toml(hd, registry.host, nodes[i].url, server=CLOSED_SERVER)
                else:
                    # containerd 1.6 rejects a hosts.toml with only `server`, so the
                    # registry is also its one host entry.
                    write_hosts_toml(hd, registry.host, registry.url, server=registry.url)

        # Other work on the machine skews every number: say how busy it was just before.
        idle_meter = CpuMeter()
        time.sleep(1.0)
        busy_before = idle_meter.busy()
        log_before = len(registry.served_requests())
        tx_before = cluster.tx_bytes(link_host)
        node_before = [proc_stat(nd.process.pid) for nd in nodes]
        ctrd_before = [proc_stat(d.process.pid) for d in daemons]
        registry_before = proc_stat(registry.process.pid)
        tracker_before = proc_stat(tracker_proc.pid) if tracker_proc is not None else None
        meter = CpuMeter()
        lock = threading.Lock()
        t0_wall = time.time()
        t0 = time.monotonic()
        pulls = [
            _Pull(_ctr_argv(h, d, hd, ref, settings.unpack), run_dir / f"ctr{i}.out", lock)
            for i, (h, d, hd) in enumerate(zip(hosts, daemons, hosts_dirs, strict=True))
        ]
        timeline: list[dict[str, Any]] = []
        sample_meter = CpuMeter()
        columns = (
            TextColumn("{task.description:>12}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeElapsedColumn(),
        )
        try:
            with Progress(*columns, console=console, transient=True) as progress:
                up_total = image_bytes * (1 if mode == "p2p" else n)
                up_task = progress.add_task(f"{mode} upstream", total=up_total)
                tasks = [progress.add_task(f"{mode} {h.role}", total=image_bytes) for h in hosts]
                deadline = t0 + settings.pull_timeout_s
                while not all(p.reaped.is_set() for p in pulls):
                    if time.monotonic() > deadline:
                        failures.append(f"pulls still running after {settings.pull_timeout_s} s")
                        break
                    got = [content_bytes(d) for d in daemons]
                    tx = cluster.tx_bytes(link_host)
                    up = (tx - tx_before) if tx is not None and tx_before is not None else None
                    timeline.append(
                        {
                            "t": round(time.monotonic() - t0, 3),
                            "upstream_tx": up,
                            "client_bytes": got,
                            "busy": round(sample_meter.busy(), 3),
                        }
                    )
                    for task, g, p in zip(tasks, got, pulls, strict=True):
                        progress.update(
                            task,
                            completed=image_bytes if p.reaped.is_set() else min(g, image_bytes),
                        )
                    if up is not None:
                        progress.update(up_task, completed=min(up, up_total))
                    time.sleep(SAMPLE_S)
        finally:
            for p in pulls:
                p.kill()
            for p in pulls:
                p.reaped.wait(timeout=15)
        busy = meter.busy()
        elapsed = time.monotonic() - t0
        registry_cpu = proc_stat(registry.process.pid).cpu_s - registry_before.cpu_s
        tracker_cpu = (
            proc_stat(tracker_proc.pid).cpu_s - tracker_before.cpu_s
            if tracker_proc is not None and tracker_before is not None
            else None
        )
        registry.settle(timeout_s=15.0)
        tx_after = cluster.tx_bytes(link_host)
        served = registry.served_requests()[log_before:]
        blob_bytes = sum(r.written for r in served if r.blob is not None and r.method == "GET")
        all_bytes = sum(r.written for r in served)

        per_node: list[NodeRun] = []
        for i, (host, daemon, pull) in enumerate(zip(hosts, daemons, pulls, strict=True)):
            out = pull.out.read_text("utf-8", "replace")
            unpack_s: float | None = None
            for line in out.splitlines():
                if line.startswith("done:"):
                    unpack_s = go_duration_s(line)
            if settings.unpack:
                ok = pull.rc == 0 and daemon.is_unpacked(manifest)
            else:
                ok = pull.rc == 0 and {b.digest for b in manifest.blobs} <= daemon.content_digests()
            after = proc_stat(daemon.process.pid)
            run = NodeRun(
                host=host.role,
                ok=ok,
                pull_s=(pull.end - t0) if pull.end is not None else float("nan"),
                unpack_s=unpack_s,
                ctr_cpu_s=pull.cpu_s,
                containerd_cpu_s=after.cpu_s - ctrd_before[i].cpu_s,
                containerd_peak_rss_mib=after.peak_rss_mib,
                error=None if ok else out[-2000:],
            )
            if nodes:
                nd = nodes[i]
                st = proc_stat(nd.process.pid)
                metrics = http_get(nd.host, f"{nd.url}/metrics")
                run.node_cpu_s = st.cpu_s - node_before[i].cpu_s
                run.node_peak_rss_mib = st.peak_rss_mib
                run.node_from_peers_bytes = metric_value(metrics, "p2preg_peer_blob_bytes_total")
                run.node_redundant_bytes = metric_value(
                    metrics, "p2preg_peer_redundant_bytes_total"
                )
                run.node_from_upstream_bytes = metric_value(
                    metrics, "p2preg_upstream_blob_bytes_total"
                )
                run.node_fallbacks = _fallbacks(metrics)
            if not ok:
                failures.append(f"{host.role}: pull failed (exit {pull.rc})")
            per_node.append(run)

        phases = _phases(mode, per_node, nodes, manifest, t0_wall)
        phases["client_stall_max_s"] = _longest_stall(timeline, image_bytes)
    # Where the CPU went while the pulls ran, summed over hosts; "machine" is all
    # cores' busy time, including the kernel's networking and anyone else's work.
    cpu_s: dict[str, float] = {
        "machine": busy * (os.cpu_count() or 1) * elapsed,
        "containerd": sum(r.containerd_cpu_s for r in per_node),
        "ctr": sum(r.ctr_cpu_s for r in per_node),
        "registry": registry_cpu,
    }
    if nodes:
        cpu_s["nodes"] = sum(r.node_cpu_s or 0.0 for r in per_node)
    if tracker_cpu is not None:
        cpu_s["tracker"] = tracker_cpu
    times = [r.pull_s for r in per_node]
    return RunResult(
        mode=mode,
        nodes=n,
        all_done_s=max(times),
        p50_s=percentile(times, 50),
        p90_s=percentile(times, 90),
        upstream_link_bytes=(tx_after - tx_before)
        if tx_after is not None and tx_before is not None
        else None,
        upstream_log_blob_bytes=blob_bytes,
        upstream_log_all_bytes=all_bytes,
        machine_busy=busy,
        machine_busy_before=busy_before,
        cpu_s=cpu_s,
        phases=phases,
        per_node=per_node,
        timeline=timeline,
        failures=failures,
    )


def _phases(
    mode: str,
    per_node: list[NodeRun],
    nodes: list[NodeProc],
    manifest: ImageManifest,
    t0_wall: float,
) -> dict[str, float]:
    """Where the time went: from the nodes' logs (p2p) and ctr's own unpack timing."""
    phases: dict[str, float] = {}
    unpacks = [r.unpack_s for r in per_node if r.unpack_s is not None]
    fetched = [r.pull_s - (r.unpack_s or 0.0) for r in per_node]
    phases["client_fetch_done_s"] = max(fetched)
    if unpacks:
        phases["unpack_median_s"] = percentile(unpacks, 50)
        phases["unpack_max_s"] = max(unpacks)
    if mode != "p2p":
        return phases
    layers = {b.digest for b in manifest.layers}
    done: dict[str, list[float]] = {}
    sources: dict[str, int] = {}
    for nd in nodes:
        for digest, source, t in _blob_events(nd.process.log_path, t0_wall):
            if digest in layers:
                done.setdefault(digest, []).append(t)
                sources[source] = sources.get(source, 0) + 1
    if done:
        firsts = [min(ts) for ts in done.values()]
        # The first node to hold a layer verified got it over U (the lease holder).
        phases["first_copy_done_s"] = max(firsts)
        phases["first_layer_done_s"] = min(firsts)
        phases["swarm_done_s"] = max(max(ts) for ts in done.values())
        # Per layer: from the holder's verified copy to the first and the last peer's.
        spreads = [sorted(ts) for ts in done.values() if len(ts) > 1]
        if spreads:
            phases["layer_to_first_peer_median_s"] = percentile(
                [ts[1] - ts[0] for ts in spreads], 50
            )
            phases["layer_to_all_peers_median_s"] = percentile(
                [ts[-1] - ts[0] for ts in spreads], 50
            )
            phases["layer_to_all_peers_max_s"] = max(ts[-1] - ts[0] for ts in spreads)
    for source, count in sources.items():
        phases[f"layer_fetches_{source}"] = count
    return phases


def _longest_stall(timeline: list[dict[str, Any]], image_bytes: int) -> float:
    """The longest a client went without a new byte before it held the whole image.

    containerd's CRI (1.7 and later) cancels a pull that shows no progress for
    `image_pull_progress_timeout`; this is the figure to hold against it.
    Sampled every SAMPLE_S, so good to about that.
    """
    worst = 0.0
    for i in range(len(timeline[0]["client_bytes"]) if timeline else 0):
        since, held = 0.0, 0
        for sample in timeline:
            got = sample["client_bytes"][i]
            if got >= image_bytes:
                break
            if got > held:
                since, held = sample["t"], got
            worst = max(worst, sample["t"] - since)
    return worst


# -- the whole benchmark --------------------------------------------------------------------


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
    blob = workdir / "capacity.bin"
    with blob.open("wb") as f:
        left = image_bytes
        while left:
            chunk = min(left, 4 * MiB)
            f.write(os.urandom(chunk))
            left -= chunk
    return pushed, image_bytes, workdir / "push" / "storage"


def bounds(cap: Capacity, client: RunResult | None, n: int) -> tuple[float, float]:
    spread = max(cap.ring_s.get(n, 0.0), client.all_done_s if client else 0.0)
    return cap.first_copy_s + spread, max(cap.first_copy_s, spread)


def run_benchmark(settings: Settings, workdir: Path, console: Console) -> dict[str, Any]:
    results: list[RunResult] = []
    with ExitStack() as stack:
        cluster = make_cluster(stack, settings)
        pushed, image_bytes, storage = build_and_push(workdir, settings, console)
        console.print(
            f"image {REPO}: {len(pushed.blobs)} blobs, {image_bytes / MB:.1f} MB "
            f"({', '.join(f'{b.size / MB:.1f}' for b in pushed.manifests[0].layers)}"
            " MB layers)"
        )
        seed = stack.enter_context(run_registry(cluster.seed_host, workdir, storage, "seed"))
        fast = (
            stack.enter_context(run_registry(cluster.fast_host, workdir, storage, "fast"))
            if settings.client_floor
            else None
        )
        # The registry's name in every reference is its address: nothing is looked up in DNS.
        image = PushedImage(
            seed.host,
            pushed.repository,
            pushed.tag,
            pushed.digest,
            pushed.media_type,
            pushed.manifests,
            pushed.layout,
        )
        if cluster.lab is not None:
            for role, qd in cluster.lab.shaping().items():
                console.print(f"[dim]{role}: {qd}[/]")
        blob = workdir / "capacity.bin"
        cap = measure_capacity_first(cluster, workdir, blob, image_bytes, 1, console)
        console.print(
            f"capacity: first copy over the upstream link {cap.first_copy_s:.2f} s "
            f"({image_bytes * 8 / cap.first_copy_s / 1e6:.1f} Mbit/s goodput)"
        )
        for n in settings.nodes:
            measure_capacity_ring(
                cap, cluster, n, workdir, blob, image_bytes, settings.capacity_repeats, console
            )
            console.print(
                f"capacity: ring of {n}: {cap.ring_s[n]:.2f} s "
                f"(runs {', '.join(f'{r:.2f}' for r in cap.ring_runs[n])})"
            )
            modes = ([CLIENT] if settings.client_floor else []) + list(settings.modes)
            for mode in modes:
                # Direct pulls are bound by U and repeat within a few percent; the
                # short, machine-bound runs are the noisy ones on a shared machine.
                for k in range(1 if mode == "direct" else settings.repeats):
                    run_dir = workdir / f"run-{mode}-{n}-{k}"
                    run_dir.mkdir()
                    r = run_once(
                        mode,
                        n,
                        cluster,
                        seed,
                        fast,
                        image,
                        image_bytes,
                        settings,
                        run_dir,
                        console,
                    )
                    r.repeat = k
                    results.append(r)
                    console.print(_run_line(r, image_bytes))
                    for failure in r.failures:
                        console.print(f"  [red]{failure}[/]")
    return _document(settings, pushed, image_bytes, cap, results)


def _run_line(r: RunResult, image_bytes: int) -> str:
    up = ""
    if r.upstream_link_bytes is not None:
        up = f"link {r.upstream_link_bytes / image_bytes:.2f}x, "
    log_x = r.upstream_log_blob_bytes / image_bytes
    line = (
        f"{r.mode:>6} N={r.nodes} #{r.repeat + 1}: all done {r.all_done_s:.2f} s "
        f"(p50 {r.p50_s:.2f}, p90 {r.p90_s:.2f}); upstream {up}log {log_x:.2f}x the image; "
        f"machine {r.machine_busy:.0%} busy ({r.machine_busy_before:.0%} just before)"
    )
    if r.mode == "p2p" and "first_copy_done_s" in r.phases:
        line += (
            f"; first copy {r.phases['first_copy_done_s']:.1f} s, "
            f"swarm done {r.phases['swarm_done_s']:.1f} s"
        )
    return line + f"; longest client stall {r.phases['client_stall_max_s']:.1f} s"


def _document(
    settings: Settings,
    image: PushedImage,
    image_bytes: int,
    cap: Capacity,
    results: list[RunResult],
) -> dict[str, Any]:
    groups: dict[tuple[str, int], list[RunResult]] = {}
    for result in results:
        groups.setdefault((result.mode, result.nodes), []).append(result)
    by: dict[tuple[str, int], RunResult] = {}
    for key, group in groups.items():
        ordered = sorted(group, key=lambda x: x.all_done_s)
        by[key] = ordered[(len(ordered) - 1) // 2]
        for run in group:
            run.representative = run is by[key]
    summary: list[dict[str, Any]] = []
    for n in settings.nodes:
        client = by.get((CLIENT, n))
        bound, floor = bounds(cap, client, n)
        row: dict[str, Any] = {
            "nodes": n,
            "bound_s": bound,
            "bound_net_s": cap.first_copy_s + cap.ring_s.get(n, 0.0),
            "floor_s": floor,
            "ring_s": cap.ring_s.get(n),
            "client_s": client.all_done_s if client else None,
            "client_s_runs": [x.all_done_s for x in groups.get((CLIENT, n), [])],
        }
        for mode in settings.modes:
            r = by.get((mode, n))
            if r is not None:
                row[f"{mode}_s"] = r.all_done_s
                row[f"{mode}_s_runs"] = [x.all_done_s for x in groups[(mode, n)]]
                row[f"{mode}_upstream_link_x"] = (
                    r.upstream_link_bytes / image_bytes
                    if r.upstream_link_bytes is not None
                    else None
                )
                row[f"{mode}_upstream_log_x"] = r.upstream_log_blob_bytes / image_bytes
        summary.append(row)
    targets = _targets(summary, results, settings)
    return {
        "benchmark": "fanout",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": asdict(settings),
        "machine": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
        },
        "image": {
            "reference": f"{image.repository}:{image.tag}",
            "digest": image.digest,
            "bytes": image_bytes,
            "layers": [b.size for b in image.manifests[0].layers],
            "blobs": len(image.blobs),
        },
        "capacity": asdict(cap),
        "bound_formula": "bound = first_copy + max(ring(N), client(N)); "
        "bound_net = first_copy + ring(N); floor = max(first_copy, ring(N), client(N))",
        "summary": summary,
        "targets": targets,
        "runs": [asdict(r) for r in results],
    }


def _targets(
    summary: list[dict[str, Any]], results: list[RunResult], settings: Settings
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "p2p" not in settings.modes:
        return out
    ups = {row["nodes"]: row.get("p2p_upstream_log_x") for row in summary}
    out["upstream_log_x_le_1.05"] = {
        str(n): (x, x is not None and x <= 1.05) for n, x in ups.items()
    }
    links = {row["nodes"]: row.get("p2p_upstream_link_x") for row in summary}
    if any(x is not None for x in links.values()):
        out["upstream_link_x_le_1.05"] = {
            str(n): (x, x is not None and x <= 1.05) for n, x in links.items()
        }
    rows = {row["nodes"]: row for row in summary}
    if 8 in rows and rows[8].get("p2p_s") is not None:
        ratio = rows[8]["p2p_s"] / rows[8]["bound_s"]
        out["p2p_over_bound_at_8_le_1.5"] = (ratio, ratio <= 1.5)
        # The same against the network-only bound (first copy + ring, no client work).
        net = rows[8]["p2p_s"] / rows[8]["bound_net_s"]
        out["p2p_over_net_bound_at_8_le_1.5"] = (net, net <= 1.5)
    if 4 in rows and 8 in rows and rows[4].get("p2p_s") and rows[8].get("p2p_s"):
        growth = rows[8]["p2p_s"] / rows[4]["p2p_s"] - 1
        out["p2p_growth_4_to_8_lt_0.20"] = (growth, growth < 0.20)
    rss = [
        r.node_peak_rss_mib
        for res in results
        if res.mode == "p2p"
        for r in res.per_node
        if r.node_peak_rss_mib is not None
    ]
    if rss:
        peak_mb = max(rss) * MiB / MB
        out["node_peak_rss_lt_200MB"] = (peak_mb, peak_mb < 200)
    return out


# -- reporting --------------------------------------------------------------------------------


def _fmt(x: float | None, unit: str = "", digits: int = 1) -> str:
    if x is None or x != x:
        return "-"
    return f"{x:.{digits}f}{unit}"


def report(doc: dict[str, Any], console: Console) -> None:
    settings = doc["settings"]
    image_bytes = doc["image"]["bytes"]
    runs = {(r["mode"], r["nodes"]): r for r in doc["runs"] if r["representative"]}
    where = (
        "loopback, no shaping"
        if settings["loopback"]
        else f"U = {settings['upstream_mbit']:g} Mbit/s, B = {settings['node_mbit']:g} Mbit/s"
    )
    t = Table(
        title=f"Pull fan-out: {image_bytes / MB:.0f} MB in {settings['layers']} layers, "
        f"{where}; seconds until the last node is done"
    )
    for col in (
        "N",
        "direct",
        "p2p",
        "bound",
        "p2p/bound",
        "net bound",
        "p2p/net",
        "floor",
        "first copy",
        "ring",
        "client",
        "direct p50/p90",
        "p2p p50/p90",
    ):
        t.add_column(col, justify="right")
    cap = doc["capacity"]
    for row in doc["summary"]:
        n = row["nodes"]
        d, p = runs.get(("direct", n)), runs.get(("p2p", n))
        ratio = row["p2p_s"] / row["bound_s"] if row.get("p2p_s") else None
        net = row["p2p_s"] / row["bound_net_s"] if row.get("p2p_s") else None
        t.add_row(
            str(n),
            _fmt(row.get("direct_s")),
            _fmt(row.get("p2p_s")),
            _fmt(row["bound_s"]),
            _fmt(ratio, "x", 2),
            _fmt(row["bound_net_s"]),
            _fmt(net, "x", 2),
            _fmt(row["floor_s"]),
            _fmt(cap["first_copy_s"]),
            _fmt(row["ring_s"]),
            _fmt(row["client_s"]),
            f"{_fmt(d['p50_s'])}/{_fmt(d['p90_s'])}" if d else "-",
            f"{_fmt(p['p50_s'])}/{_fmt(p['p90_s'])}" if p else "-",
        )
    console.print(t)

    u = Table(
        title="Bytes that crossed the upstream link, as multiples of the image "
        "(link: registry veth tx; log: blob bytes docker-registry logged)"
    )
    for col in ("N", "direct link", "direct log", "p2p link", "p2p log", "p2p MB (log)"):
        u.add_column(col, justify="right")
    for row in doc["summary"]:
        n = row["nodes"]
        p = runs.get(("p2p", n))
        u.add_row(
            str(n),
            _fmt(row.get("direct_upstream_link_x"), "x", 2),
            _fmt(row.get("direct_upstream_log_x"), "x", 2),
            _fmt(row.get("p2p_upstream_link_x"), "x", 3),
            _fmt(row.get("p2p_upstream_log_x"), "x", 3),
            _fmt(p["upstream_log_blob_bytes"] / MB) if p else "-",
        )
    console.print(u)

    r = Table(
        title="Per node in p2p mode (max over nodes; CPU during the pull) and where "
        "the time went (s after the pulls started)"
    )
    for col in (
        "N",
        "node CPU s",
        "node peak RSS MiB",
        "containerd CPU s",
        "ctr CPU s",
        "unpack s (med)",
        "first layer",
        "first copy done",
        "swarm done",
        "layer to all peers",
        "client fetch done",
        "all done",
        "longest client stall",
        "machine busy",
    ):
        r.add_column(col, justify="right")
    for row in doc["summary"]:
        p = runs.get(("p2p", row["nodes"]))
        if p is None:
            continue
        nodes = p["per_node"]
        ph = p["phases"]

        def mx(key: str, nodes: list[dict[str, Any]] = nodes) -> float | None:
            vals = [x[key] for x in nodes if x.get(key) is not None]
            return max(vals) if vals else None

        r.add_row(
            str(row["nodes"]),
            _fmt(mx("node_cpu_s")),
            _fmt(mx("node_peak_rss_mib"), "", 0),
            _fmt(mx("containerd_cpu_s")),
            _fmt(mx("ctr_cpu_s")),
            _fmt(ph.get("unpack_median_s"), "", 2),
            _fmt(ph.get("first_layer_done_s")),
            _fmt(ph.get("first_copy_done_s")),
            _fmt(ph.get("swarm_done_s")),
            _fmt(ph.get("layer_to_all_peers_median_s")),
            _fmt(ph.get("client_fetch_done_s")),
            _fmt(p["all_done_s"]),
            _fmt(ph.get("client_stall_max_s")),
            f"{p['machine_busy']:.0%}",
        )
    console.print(r)

    c = Table(
        title="CPU seconds while the pulls ran, summed over hosts (machine: all cores' "
        "busy time, kernel and other users included)"
    )
    for col in (
        "mode",
        "N",
        "run",
        "machine",
        "nodes",
        "containerd",
        "ctr",
        "registry",
        "tracker",
        "busy before",
    ):
        c.add_column(col, justify="right")
    for run in doc["runs"]:
        cpu = run["cpu_s"]
        c.add_row(
            run["mode"],
            str(run["nodes"]),
            f"{run['repeat'] + 1}" + ("*" if run["representative"] else ""),
            _fmt(cpu.get("machine")),
            _fmt(cpu.get("nodes")),
            _fmt(cpu.get("containerd")),
            _fmt(cpu.get("ctr")),
            _fmt(cpu.get("registry")),
            _fmt(cpu.get("tracker")),
            f"{run['machine_busy_before']:.0%}",
        )
    console.print(c)
    if doc["targets"]:
        console.print("targets: " + "; ".join(f"{k}: {v}" for k, v in doc["targets"].items()))


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["summary"]
    ns = [row["nodes"] for row in rows]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    series = [
        ("direct_s", "direct", "o-"),
        ("p2p_s", "p2p", "s-"),
        ("bound_s", "bound: first copy + max(ring, client)", "kx--"),
        ("bound_net_s", "network-only bound: first copy + ring", "x-."),
        ("floor_s", "floor: max(first copy, ring, client)", "k+:"),
    ]
    for key, label, style in series:
        pts = [(n, row[key]) for n, row in zip(ns, rows, strict=True) if row.get(key) is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
    ax.set_xlabel("nodes pulling at once (N)")
    ax.set_ylabel("time until the last node is done (s)")
    ax.set_xticks(ns)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    for key, label, style in [
        ("direct_upstream_log_x", "direct", "o-"),
        ("p2p_upstream_log_x", "p2p", "s-"),
    ]:
        pts = [(n, row[key]) for n, row in zip(ns, rows, strict=True) if row.get(key) is not None]
        if pts:
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
    ax2.set_xlabel("nodes pulling at once (N)")
    ax2.set_ylabel("upstream bytes / image size (registry log)")
    ax2.set_xticks(ns)
    ax2.set_ylim(bottom=0)
    ax2.grid(alpha=0.3)
    ax2.legend()
    s = doc["settings"]
    where = (
        "loopback"
        if s["loopback"]
        else f"U={s['upstream_mbit']:g} Mbit/s, B={s['node_mbit']:g} Mbit/s"
    )
    fig.suptitle(
        f"p2preg pull fan-out: {doc['image']['bytes'] / MB:.0f} MB, "
        f"{s['layers']} layers, {where}, {doc['machine']['cpus']} cores"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- entry point ------------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> tuple[Settings, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--nodes", default="2,4,8", help="values of N, comma-separated (2,4,8)")
    p.add_argument("--size-mb", type=float, default=100.0, help="image size S in MB (100)")
    p.add_argument("--layers", type=int, default=4, help="layers L, of equal size (4)")
    p.add_argument("--upstream-mbit", type=float, default=50.0, help="upstream link U (50)")
    p.add_argument("--node-mbit", type=float, default=200.0, help="each node's link B (200)")
    p.add_argument(
        "--loopback",
        action="store_true",
        help="everything on 127.0.0.1: no namespaces, no shaping, no root needed",
    )
    p.add_argument("--modes", default="direct,p2p", help="modes to run (direct,p2p)")
    p.add_argument(
        "--no-client-floor",
        action="store_true",
        help="skip the client(N) runs (then the bound has no client term)",
    )
    p.add_argument("--snapshotter", default="native", choices=get_args(Snapshotter))
    p.add_argument(
        "--fetch-only",
        action="store_true",
        help="`ctr content fetch` instead of `ctr images pull` (no unpack)",
    )
    p.add_argument(
        "--capacity-repeats",
        type=int,
        default=2,
        help="ring measurements per N; the best counts (2)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs of client(N) and p2p per N; the median counts (1; direct runs once)",
    )
    p.add_argument("--pull-timeout-s", type=float, default=900.0)
    p.add_argument(
        "--node-arg",
        action="append",
        default=[],
        help="extra flag for every p2preg node, e.g. --node-arg=--p2p-min-bytes=4MiB",
    )
    p.add_argument("--seed", default="fanout", help="image content seed")
    p.add_argument("--out", type=Path, default=RESULTS, help="where JSON and PNG go")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    p.add_argument(
        "--reap-stale",
        action="store_true",
        help=f"first remove {PREFIX_ROOT}-<pid>-* namespaces whose benchmark died",
    )
    a = p.parse_args(argv)
    nodes = tuple(sorted({int(x) for x in a.nodes.split(",") if x.strip()}))
    modes = tuple(m for m in a.modes.split(",") if m)
    if not nodes or nodes[0] < 2 or nodes[-1] > MAX_NODES:
        p.error(f"--nodes: values between 2 and {MAX_NODES}")
    if any(m not in MODES for m in modes):
        p.error(f"--modes: from {', '.join(MODES)}")
    if a.layers < 1 or a.size_mb <= 0 or a.upstream_mbit <= 0 or a.node_mbit <= 0:
        p.error("sizes, layers and rates must be positive")
    settings = Settings(
        nodes=nodes,
        size_bytes=int(a.size_mb * MB),
        layers=a.layers,
        upstream_mbit=a.upstream_mbit,
        node_mbit=a.node_mbit,
        loopback=a.loopback,
        modes=modes,
        client_floor=not a.no_client_floor,
        snapshotter=a.snapshotter,
        unpack=not a.fetch_only,
        capacity_repeats=max(1, a.capacity_repeats),
        repeats=max(1, a.repeats),
        pull_timeout_s=a.pull_timeout_s,
        node_args=tuple(a.node_arg),
        seed=a.seed,
    )
    return settings, a


def main(argv: Sequence[str] | None = None) -> int:
    settings, args = _parse_args(argv)
    # Tables are wide; a log file or pipe gets them whole rather than cut at 80 columns.
    console = Console() if sys.stdout.isatty() else Console(width=180)
    tools = [REGISTRY_BIN, CONTAINERD_BIN, CTR_BIN, SKOPEO_BIN, nginx.NGINX_BIN, CURL_BIN]
    missing = [str(t) for t in tools if not t.exists()]
    if missing:
        console.print(
            f"[red]missing: {', '.join(missing)}[/] (apt-get install docker-registry "
            "containerd skopeo nginx curl)"
        )
        return 2
    if os.geteuid() != 0:
        console.print(
            "[red]containerd (and network namespaces) need root here[/]: run as root, as CI does"
        )
        return 2
    if not settings.loopback:
        reason = unavailable_reason()
        if reason is not None:
            console.print(f"[red]cannot build the cluster:[/] {reason}")
            return 2
        stale = stale_namespaces(PREFIX_ROOT)
        if stale and args.reap_stale:
            errors = remove_namespaces(stale)
            console.print(f"removed {len(stale) - len(errors)} stale namespace(s)")
        elif stale:
            console.print(
                f"[yellow]namespaces left by a benchmark that died:[/] "
                f"{' '.join(stale)} (--reap-stale removes them)"
            )
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)
    workdir = Path(tempfile.mkdtemp(prefix=f"{PREFIX_ROOT}-{os.getpid()}-"))
    started = time.monotonic()
    try:
        doc = run_benchmark(settings, workdir, console)
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
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path = args.out / f"fanout-{stamp}.json"
    json_path.write_text(json.dumps(doc, indent=2, default=str))
    png_path = args.out / f"fanout-{stamp}.png"
    plot(doc, png_path)
    console.print(f"wrote {json_path} and {png_path} (whole run {doc['wall_s']:.0f} s)")
    failed = [f for r in doc["runs"] for f in r["failures"]]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
