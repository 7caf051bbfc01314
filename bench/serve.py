"""How fast a node serves a blob it already holds, next to nginx serving the same file.

Starts Debian's `docker-registry` as the seed registry, pushes one random blob
(256 MiB by default) and a manifest referencing it with the registry's
monolithic upload (POST, then PUT `?digest=`), starts a real node
(`python -m p2preg node`) against it, and warms the node by resolving the
manifest and GETting the blob once with its digest checked, so that the blob
is in the node's verified store. It then starts Debian nginx (`sendfile on`,
one worker, `user root`) serving that very stored file, and times whole-blob
GETs from both with one client: a raw socket reading into a reused 1 MiB
buffer, one thread per stream (on this machine as fast as a small C client,
and faster than curl or wrk, which would otherwise be what gets measured).

Rounds alternate nginx and the node (the order flips each round), for 1 stream
and for N concurrent streams (4 by default); in one timed run every stream GETs
the whole blob `--gets` times in a row. Throughput is bytes over wall time,
reported as median and spread, and as the node/nginx ratio of the medians and
of each round's pair. The machine may be shared, so each run waits (bounded)
until the CPUs are nearly idle and records how busy they were. The node's RSS
is taken idle, after the warm-up, and at its peak during the measured node runs
(`VmHWM`, reset through `/proc/PID/clear_refs`, and `VmRSS` sampled every
10 ms), against the bound idle + streams * `stream_chunk_bytes`. `--profile
FILE` then records py-spy's collapsed stacks of the node serving more GETs.

Prints a table and writes bench/results/serve.json. Every process it starts is
stopped by its pid when it finishes, fails or is interrupted.

    .venv/bin/python -m bench.serve [--size-mib 256] [--runs 5] [--streams 4]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from rich.console import Console
from rich.table import Table

from bench import nginx
from tests.fixtures.node import open_node
from tests.fixtures.procs import Process, free_port, wait_for_port, wait_until
from tests.fixtures.registry import open_registry

MiB = 1 << 20
REPO = "bench/blob"
TAG = "latest"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
RESULTS = Path(__file__).resolve().parent / "results" / "serve.json"
RECV_BUFFER = MiB
SOCKET_TIMEOUT_S = 120.0
# A run starts once the machine is at most this busy, or after this long anyway.
QUIET_BUSY = 0.10
QUIET_MAX_WAIT_S = 60.0
PROFILE_GETS = 16

console = Console()


# --- the seed registry ---------------------------------------------------------


def make_blob(path: Path, size: int, seed: int = 20240601) -> str:
    """Write `size` pseudo-random bytes to `path`; return their sha256 hex."""
    rng = random.Random(seed)
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = rng.randbytes(min(left, 4 * MiB))
            f.write(chunk)
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def push_blob(http: httpx.Client, base: str, digest: str, body: Path | bytes) -> None:
    """Monolithic upload: POST opens the session, PUT ?digest= sends every byte and commits."""
    r = http.post(f"{base}/v2/{REPO}/blobs/uploads/")
    if r.status_code != 202:
        raise RuntimeError(f"upload POST: {r.status_code} {r.text[:200]}")
    location = r.headers["Location"]
    if location.startswith("/"):
        location = base + location
    sep = "&" if "?" in location else "?"

    def chunks(path: Path) -> Iterator[bytes]:
        with open(path, "rb") as f:
            while chunk := f.read(4 * MiB):
                yield chunk

    size = len(body) if isinstance(body, bytes) else body.stat().st_size
    r = http.put(
        f"{location}{sep}digest={digest}",
        content=body if isinstance(body, bytes) else chunks(body),
        headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
    )
    if r.status_code != 201:
        raise RuntimeError(f"upload PUT: {r.status_code} {r.text[:200]}")


def push_image(base: str, blob: Path, blob_hex: str) -> None:
    """Push the layer, a config and a manifest referencing both under REPO:TAG."""
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}
    ).encode()
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": len(config),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": f"sha256:{blob_hex}",
                "size": blob.stat().st_size,
            }
        ],
    }
    with httpx.Client(timeout=300.0, trust_env=False) as http:
        push_blob(http, base, f"sha256:{blob_hex}", blob)
        push_blob(http, base, config_digest, config)
        r = http.put(
            f"{base}/v2/{REPO}/manifests/{TAG}",
            content=json.dumps(manifest).encode(),
            headers={"Content-Type": OCI_MANIFEST},
        )
        if r.status_code != 201:
            raise RuntimeError(f"manifest PUT: {r.status_code} {r.text[:200]}")


# --- the client ----------------------------------------------------------------


def fetch(url: str, expect: int, sha256: str | None = None) -> int:
    """GET `url` over a raw socket into a reused buffer; return the body's length.

    Reading into one preallocated buffer keeps the client's cost per byte at the
    kernel's copy, so the server is what gets measured. With `sha256`, the body
    is hashed and checked too (only for the warm-up: hashing is slower than
    serving).
    """
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    view = memoryview(bytearray(RECV_BUFFER))
    h = hashlib.sha256() if sha256 else None
    with socket.create_connection((host, port), timeout=SOCKET_TIMEOUT_S) as s:
        s.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            if len(head) > 64 * 1024:
                raise RuntimeError(f"{url}: response head too long")
            n = s.recv_into(view)
            if not n:
                raise RuntimeError(f"{url}: connection closed in the response head")
            head += view[:n]
        head, _, rest = head.partition(b"\r\n\r\n")
        status_line, *lines = head.split(b"\r\n")
        if status_line.split()[1] != b"200":
            raise RuntimeError(f"{url}: {status_line.decode(errors='replace')}")
        length = next(
            (
                int(v)
                for k, _, v in (ln.partition(b":") for ln in lines)
                if k.strip().lower() == b"content-length"
            ),
            -1,
        )
        if length != expect:
            raise RuntimeError(f"{url}: Content-Length {length}, expected {expect}")
        got = len(rest)
        if h is not None:
            h.update(rest)
        while got < length:
            n = s.recv_into(view)
            if not n:
                break
            got += n
            if h is not None:
                h.update(view[:n])
    if got != expect:
        raise RuntimeError(f"{url}: got {got} bytes, expected {expect}")
    if h is not None and h.hexdigest() != sha256:
        raise RuntimeError(f"{url}: body does not hash to sha256:{sha256}")
    return got


def timed_get(url: str, size: int, streams: int, gets: int) -> float:
    """Aggregate bytes per second of `streams` concurrent streams, each GETting the
    whole blob `gets` times in a row."""
    errors: list[BaseException] = []
    start = threading.Barrier(streams + 1)

    def one() -> None:
        try:
            start.wait()
            for _ in range(gets):
                fetch(url, size)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=one, daemon=True) for _ in range(streams)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join(SOCKET_TIMEOUT_S * gets)
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    if any(t.is_alive() for t in threads):
        raise RuntimeError(f"{url}: a stream did not finish in time")
    return size * streams * gets / elapsed


# --- the machine ---------------------------------------------------------------


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


class RssWatch:
    """Peak RSS of one process over a stretch of time: VmHWM reset, plus VmRSS sampling."""

    def __init__(self, pid: int, interval_s: float = 0.01) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.peak_sampled_kib = 0
        self.hwm_reset = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> RssWatch:
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")  # resets VmHWM
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        self.peak_sampled_kib = _status_kib(self.pid, "VmRSS")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            with contextlib.suppress(OSError):
                rss = _status_kib(self.pid, "VmRSS")
                self.peak_sampled_kib = max(self.peak_sampled_kib, rss)

    @property
    def peak_kib(self) -> int:
        hwm = _status_kib(self.pid, "VmHWM") if self.hwm_reset else 0
        return max(hwm, self.peak_sampled_kib)


def _cpu_times() -> tuple[int, int]:
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields), fields[3] + fields[4]  # all, idle + iowait


def cpu_busy(interval_s: float = 0.5) -> float:
    """Fraction of all CPUs busy over `interval_s`."""
    total0, idle0 = _cpu_times()
    time.sleep(interval_s)
    total1, idle1 = _cpu_times()
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def wait_quiet(threshold: float = QUIET_BUSY, max_wait_s: float = QUIET_MAX_WAIT_S) -> float:
    """Wait (bounded) until the machine is nearly idle; return how busy it was last.

    Other test suites or benchmarks may share the machine: a run taken while
    they burn a core measures them, not the servers.
    """
    deadline = time.monotonic() + max_wait_s
    busy = cpu_busy()
    while busy > threshold and time.monotonic() < deadline:
        busy = cpu_busy()
    return busy


def version_of(argv: list[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    out = (r.stdout + r.stderr).strip()
    return out.splitlines()[0] if out else "?"


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
        "nginx": version_of([str(nginx.NGINX_BIN), "-v"]),
        "docker_registry": version_of(["docker-registry", "--version"]),
        "hypercorn": metadata.version("hypercorn"),
        "quart": metadata.version("quart"),
        "trio": metadata.version("trio"),
    }


# --- nginx and py-spy ----------------------------------------------------------


def pin(pid: int, cpus: set[int]) -> None:
    """Pin every thread of `pid` and of its children to `cpus`."""
    for p in [pid, *_children(pid)]:
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{p}/task"):
                os.sched_setaffinity(int(tid), cpus)


def _children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


@contextlib.contextmanager
def open_nginx(workdir: Path, blob: Path) -> Iterator[tuple[str, int]]:
    """nginx serving `blob` at /blob on a free port: its URL and master's pid.
    Master and worker are stopped by pid."""
    workdir.mkdir()
    port = free_port()
    argv = nginx.configure(workdir, "127.0.0.1", port, blob)
    proc = Process(argv, workdir, name="nginx")
    with proc:
        wait_for_port("127.0.0.1", port, process=proc)
        workers = _children(proc.pid)
        try:
            yield f"http://127.0.0.1:{port}/blob", proc.pid
        finally:
            proc.stop()
            for pid in workers:  # only if the master was killed before it could stop them
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def profile_node(pid: int, out: Path, url: str, size: int, streams: int, workdir: Path) -> None:
    """py-spy's collapsed stacks of the node while `streams` streams GET the blob."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        raise RuntimeError("--profile needs py-spy (pip install py-spy)")
    argv = [py_spy, "record", "--pid", str(pid), "--rate", "200", "--native", "--idle"]
    argv += ["--format", "raw", "--output", str(out.resolve())]
    with Process(argv, workdir, name="py-spy") as proc:
        time.sleep(1.0)  # py-spy attaches
        timed_get(url, size, streams, PROFILE_GETS)
        os.kill(proc.pid, signal.SIGINT)  # py-spy writes its output on SIGINT
        wait_until(lambda: proc.returncode is not None, timeout_s=30, what="py-spy to write")


# --- measurement ---------------------------------------------------------------


@dataclass
class Case:
    streams: int
    nginx: list[float] = field(default_factory=list)
    node: list[float] = field(default_factory=list)
    node_peak_rss_kib: int = 0
    machine_busy_before: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        def spread(xs: list[float]) -> dict[str, float]:
            q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
            return {
                "median": statistics.median(xs),
                "min": min(xs),
                "max": max(xs),
                "q1": q[0],
                "q3": q[2],
            }

        pairs = [b / a for a, b in zip(self.nginx, self.node, strict=True)]
        return {
            "streams": self.streams,
            "nginx_bytes_per_s": spread(self.nginx),
            "node_bytes_per_s": spread(self.node),
            "ratio_of_medians": statistics.median(self.node) / statistics.median(self.nginx),
            "ratio_per_round": spread(pairs),
            "node_peak_rss_kib": self.node_peak_rss_kib,
        }


def measure(
    targets: dict[str, str],
    size: int,
    streams: int,
    runs: int,
    gets: int,
    watch: Callable[[], RssWatch],
) -> Case:
    case = Case(streams)
    for url in targets.values():  # one untimed run each, to start from warm caches
        timed_get(url, size, streams, 1)
    for i in range(runs):
        for name in ["nginx", "node"] if i % 2 == 0 else ["node", "nginx"]:
            busy = wait_quiet()
            case.machine_busy_before.append(round(busy, 3))
            if name == "node":
                with watch() as w:
                    case.node.append(timed_get(targets[name], size, streams, gets))
                case.node_peak_rss_kib = max(case.node_peak_rss_kib, w.peak_kib)
            else:
                case.nginx.append(timed_get(targets[name], size, streams, gets))
            rate = (case.nginx if name == "nginx" else case.node)[-1]
            console.print(
                f"  {streams} stream(s) round {i + 1}/{runs} {name:5}: {rate / 1e9:.2f} GB/s"
                f"  (machine {busy:.0%} busy before)"
            )
    return case


def run(args: argparse.Namespace) -> dict[str, object]:
    size = args.size_mib * MiB
    chunk = args.chunk_bytes
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="p2preg-bench-serve-")))
        console.print(f"[bold]bench/serve.py[/bold]: {args.size_mib} MiB blob, work dir {tmp}")

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
                env={"P2PREG_STREAM_CHUNK_BYTES": str(chunk)},
            )
        )
        node_pid = node.process.pid
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
        console.print(f"node {node.url} (pid {node_pid}) holds the blob at {stored}")

        nginx_url, nginx_pid = stack.enter_context(open_nginx(tmp / "nginx", stored))
        targets = {"nginx": nginx_url, "node": blob_url}
        if args.pin:  # the servers share core 0, the client (this process) has core 1
            pin(node_pid, {0})
            pin(nginx_pid, {0})
            os.sched_setaffinity(0, {1})
        time.sleep(1.0)
        idle_kib = _status_kib(node_pid, "VmRSS")
        cases = []
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
            "params": {
                "blob_bytes": size,
                "runs": args.runs,
                "streams": args.streams,
                "gets_per_stream_per_run": args.gets,
                "stream_chunk_bytes": chunk,
                "max_blob_streams": args.max_blob_streams,
                "client": f"raw socket, recv_into a reused {RECV_BUFFER} byte buffer, "
                "one thread per stream",
                "nginx": "sendfile on, tcp_nopush on, worker_processes 1, access_log off",
                "pinned": "servers on CPU 0, client on CPU 1" if args.pin else "no",
            },
            "node_idle_rss_kib": idle_kib,
            "cases": [
                {
                    **c.summary(),
                    "raw": asdict(c),
                    "rss_bound_kib": idle_kib + c.streams * chunk // 1024,
                }
                for c in cases
            ],
        }
    raise AssertionError("unreachable")


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
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
