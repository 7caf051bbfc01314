"""The tracker's announce rate over mutual TLS, one handshake per announce, next to plain HTTP.

libtorrent opens a new connection for every HTTPS announce (`Connection:
close`), so each one pays a full TLS handshake with a client certificate. `wrk`
cannot show a client certificate, so this generator is ours: worker processes
pinned to the load core, each a blocking loop of connect → (TLS handshake with
the node's certificate) → `GET /announce` → read to the end. The same
generator also runs against the same tracker build in plain HTTP, so the ratio
compares like with like; `bench/tracker.py` prints both beside its `wrk`
numbers. Used by bench/tracker.py only; holds no assertions.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.queues
import multiprocessing.synchronize
import os
import random
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote_from_bytes

import trio

from bench.machine import cpu_seconds
from harness.tlscerts import ClusterCA, client_ssl_context, https_client
from harness.tracker import open_tracker
from p2preg.core.metainfo import Metainfo
from tracker.client import TrackerClient

# Blocking workers on the one load core: enough in flight to keep the tracker busy.
WORKERS = 16
CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Load:
    answered: int
    errors: int
    seconds: float
    tracker_cpu_pct: float


def _request(hashes: Sequence[bytes], rnd: random.Random) -> bytes:
    query = (
        f"info_hash={quote_from_bytes(rnd.choice(hashes), safe='')}"
        f"&peer_id={quote_from_bytes(rnd.randbytes(20), safe='')}&port={rnd.randint(1024, 65535)}"
        f"&uploaded=0&downloaded=0&left={rnd.randint(1, 10**6)}&compact=1&numwant=50"
    )
    return f"GET /announce?{query} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode()


def _one(port: int, request: bytes, ctx: ssl.SSLContext | None) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=CONNECT_TIMEOUT_S) as raw:
        # Without it, Nagle holds the request behind the unacknowledged client
        # Finished until the tracker's delayed ACK: measured 44 ms per HTTPS
        # announce instead of 3.5 ms. The generator measures the tracker's cost,
        # not that stall (a client latency, not tracker load).
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock = raw if ctx is None else ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        sock.sendall(request)
        answer = b""
        for _ in range(1000):  # an announce answer is a few hundred bytes
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        return answer.startswith(b"HTTP/1.1 200") and b"failure reason" not in answer


def _worker(
    port: int,
    hashes: list[bytes],
    seconds: float,
    tls_dir: Path | None,
    core: int,
    go: multiprocessing.synchronize.Event,
    out: multiprocessing.queues.Queue[tuple[int, int, float]],
) -> None:
    os.sched_setaffinity(0, {core})
    ctx = None if tls_dir is None else client_ssl_context(tls_dir)
    rnd = random.Random()
    answered = errors = 0
    go.wait()
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        try:
            ok = _one(port, _request(hashes, rnd), ctx)
        except OSError:
            ok = False
        answered += ok
        errors += not ok
    out.put((answered, errors, time.perf_counter() - start))


def run_load(
    port: int, pid: int, hashes: list[bytes], seconds: float, tls_dir: Path | None, core: int
) -> Load:
    """WORKERS processes announcing for `seconds`; the tracker's CPU over the same span."""
    mp = multiprocessing.get_context("spawn")
    go = mp.Event()
    out: multiprocessing.queues.Queue[tuple[int, int, float]] = mp.Queue()
    procs = [
        mp.Process(target=_worker, args=(port, hashes, seconds, tls_dir, core, go, out))
        for _ in range(WORKERS)
    ]
    for p in procs:
        p.start()
    time.sleep(2.0)  # let every worker import and build its context before the clock starts
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    go.set()
    results = [out.get(timeout=seconds + 60) for _ in procs]
    elapsed = time.perf_counter() - t0
    cpu = (cpu_seconds(pid) - cpu0) / elapsed * 100
    for p in procs:
        p.join(timeout=30)
    answered = sum(r[0] for r in results)
    rate_seconds = max(r[2] for r in results)
    return Load(answered, sum(r[1] for r in results), rate_seconds, cpu)


async def _publish(url: str, node_dir: Path | None, metas: list[Metainfo]) -> None:
    http = https_client(node_dir) if node_dir is not None else None
    client = TrackerClient(url, node="bench", http=http)
    try:
        for meta in metas:
            # Only the digest's lease holder defines its first torrent.
            await client.acquire_lease(meta.digest, size=meta.size)
            await client.publish_metainfo(meta.digest, meta.size, meta.data)
    finally:
        await client.aclose()
        if http is not None:
            await http.aclose()


def measure_both(
    workdir: Path,
    metas: list[Metainfo],
    hashes: list[bytes],
    seconds: float,
    *,
    tracker_core: str,
    load_core: int,
) -> dict[str, Load]:
    """The same generator against a plain and an mTLS tracker, one after the other.

    The plain one has no token (loopback): a token check is one constant-time
    compare, nothing beside a handshake.
    """
    ca = ClusterCA.make("bench")
    tracker_dir = ca.tls_dir(workdir / "pki" / "tracker", "tracker", "t", ips=["127.0.0.1"])
    node_dir = ca.tls_dir(workdir / "pki" / "node", "node", "bench")
    loads: dict[str, Load] = {}
    for mode, tls_dir in (("http", None), ("https-mtls", tracker_dir)):
        with open_tracker(
            workdir / f"gen-{mode}",
            tls_dir=tls_dir,
            args=["--log-level", "WARNING", "--no-udp"],
            cpus=tracker_core,
        ) as t:
            trio.run(_publish, t.url, node_dir if tls_dir else None, metas)
            port = int(t.url.rsplit(":", 1)[1])
            client_dir = node_dir if tls_dir else None
            run_load(port, t.process.pid, hashes, 3, client_dir, load_core)  # warm-up
            loads[mode] = run_load(port, t.process.pid, hashes, seconds, client_dir, load_core)
    return loads
