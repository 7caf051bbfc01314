"""The tracker's announce rate over mutual TLS, one handshake per announce, next to plain HTTP.

libtorrent opens a new connection for every HTTPS announce (`Connection:
close`), so each one pays a full TLS handshake with a client certificate. `wrk`
cannot show a client certificate, so this generator is ours: worker processes
pinned to the load core, each a blocking loop of connect → (TLS handshake with
a node's certificate) → `GET /announce` → read to the end. Under mutual TLS an
announce's identity is its certificate's node, so the load comes from a pool of
node certificates (one per node of the cluster, bench/tracker_load.py), each
worker announcing for its share of the nodes with each node's own certificate;
in plain HTTP the same announces carry `node=` instead. Before measuring, every
member of every swarm announces once, so the swarms are full and the run
measures re-announces. The same generator runs against the same tracker build
in plain HTTP, so the ratio compares like with like; `bench/tracker.py` prints
both beside its `wrk` numbers. With a Redis store (`stores`), each tracker is
given its own redis-server (bench/tracker_redis.py), measured from the moment it
serves, and each run also says what Redis did. The relayed rows (`Job.batch`)
announce as nodes do through their relay (p2preg/node/relay.py): each worker
keeps one connection open for each of 8 nodes of its share (handshakes made,
and kept within the tracker's 5 s keep-alive, before the clock) and posts
`batch` of that node's announces at a time to `/v1/announces` (a node here has
few torrents, so a batch repeats them; applying one costs the same). The lease
rows (`Job.leases`, modes `http-leases` and `https-mtls-leases`) send lease
requests for seeded blobs on the same kept-alive connections instead, one per
request. Used by bench/tracker.py and bench/tracker_profile.py; holds no
assertions on speed.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import multiprocessing.queues
import multiprocessing.synchronize
import os
import random
import re
import socket
import ssl
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import msgpack
import trio

from bench.keptalive import KeptAlive
from bench.machine import cpu_seconds
from bench.tracker_load import (
    Cluster,
    ask_seeded,
    confirm_seeders,
    count_peers,
    make_torrents,
    node_name,
    publish_all,
    query,
)
from bench.tracker_redis import RedisCost, RedisUnderTest, open_redis_store, wait_serving
from harness.tlscerts import ClusterCA, client_ssl_context, https_client
from harness.tracker import TrackerProcess, open_tracker
from p2preg.core import wire
from p2preg.core.metainfo import Metainfo
from tracker.client import PLAIN_KEEPALIVE_EXPIRY_S as PLAIN_EXPIRY_S
from tracker.client import TrackerClient

# Blocking workers on the one load core: enough in flight to keep the tracker busy.
WORKERS = 16
CONNECT_TIMEOUT_S = 10.0
WARMUP_LIMIT_S = 300.0  # a walk over every member that takes longer is a broken tracker
# Batch sizes of the relayed rows (announces per `POST /v1/announces`).
RELAY_BATCHES = (1, 8, 32)
RELAY_NODES_PER_WORKER = 8


@dataclass(frozen=True)
class Load:
    answered: int
    errors: int
    seconds: float
    tracker_cpu_pct: float
    peers: int = 0  # peers in all answers
    replaced: int = -1  # announces that replaced an identity's peer
    resumed: int = 0  # TLS handshakes the tracker resumed (of `answered` + errors)
    redis: RedisCost | None = None  # what its Redis store did over the run (a Redis store)


@dataclass(frozen=True)
class Job:
    """What every worker is given: where to announce, as which cluster, how long."""

    port: int
    hashes: list[bytes]
    cluster: Cluster
    pool: Path | None  # node i's tls_dir is pool/i; None: plain HTTP with node=
    core: int
    seconds: float
    warmup: bool  # walk this worker's members once instead of announcing at random
    # Offer each node's last TLS session (what libtorrent 2.1.1 does not do: a full
    # handshake per announce); measures what resumption would save the tracker.
    resume: bool = False
    token: str | None = None  # sent as `&token=` (plain HTTP only)
    # Several tracker replicas: node i announces to ports[i % len(ports)] (else `port`).
    ports: tuple[int, ...] = ()
    # Worker processes, each with one announce in flight (bench/tracker_fronts.py
    # wants more: a front batches what is in flight together).
    workers: int = WORKERS
    # > 0: announce as nodes' relays do (p2preg/node/relay.py): `batch` announces of
    # one node per `POST /v1/announces`, on that node's kept-alive connection.
    batch: int = 0
    # With `batch`: each swarm's blob digest; the worker then sends lease requests
    # (`POST /v1/leases/<digest>`, one per request, naming the node's peer port) on
    # the same kept-alive connections, each for a blob the node does not seed (most
    # of them asked again: the node's peer is then updated, not added); every answer
    # is SEEDED with peers, anything else counts as an error.
    leases: tuple[str, ...] = ()

    def port_of(self, i: int) -> int:
        return self.ports[i % len(self.ports)] if self.ports else self.port


class _Conn:
    """One worker's TLS side: a context per node, and with `resume` each node's last session."""

    def __init__(self, job: Job, w: int) -> None:
        self.contexts: dict[int, ssl.SSLContext] = {}
        if job.pool is not None:
            for i in range(w, job.cluster.nodes, job.workers):
                self.contexts[i] = client_ssl_context(job.pool / str(i))
        self.resume = job.resume
        self.sessions: dict[int, ssl.SSLSession] = {}
        self.reused = 0  # handshakes the tracker resumed

    def announce(self, port: int, i: int, request: bytes) -> int:
        """Node i's announce on a new connection; peers in the answer, -1 for a failure."""
        ctx = self.contexts.get(i)
        with socket.create_connection(("127.0.0.1", port), timeout=CONNECT_TIMEOUT_S) as raw:
            # Without it, Nagle holds the request behind the unacknowledged client
            # Finished until the tracker's delayed ACK: measured 44 ms per HTTPS
            # announce instead of 3.5 ms. The generator measures the tracker's cost,
            # not that stall (a client latency, not tracker load).
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock: socket.socket = raw
            if ctx is not None:
                offered = self.sessions.get(i) if self.resume else None
                tls = ctx.wrap_socket(raw, server_hostname="127.0.0.1", session=offered)
                sock = tls
                self.reused += bool(tls.session_reused)
            sock.sendall(request)
            answer = b""
            for _ in range(1000):  # an announce answer is a few hundred bytes
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
            if ctx is not None and self.resume and tls.session is not None:
                self.sessions[i] = tls.session  # TLS 1.3: the ticket came after the handshake
            return count_peers(answer) if answer.startswith(b"HTTP/1.1 200") else -1


def _request(job: Job, s: int, j: int) -> bytes:
    """Member j of swarm s announcing (with `node=` in plain HTTP), `Connection: close`."""
    q = query(job.cluster, job.hashes[s], s, j, node=job.pool is None)
    q += f"&token={job.token}" if job.token else ""
    return f"GET /announce?{q} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode()


def _members(cluster: Cluster, w: int, workers: int) -> list[tuple[int, int]]:
    """(swarm, j) of every member whose node is worker `w`'s."""
    return [
        (s, j)
        for s in range(cluster.swarms)
        for j in range(cluster.per_swarm)
        if cluster.node(s, j) % workers == w
    ]


class _Relays:
    """One worker's relayed side: a kept-alive client per node, showing its certificate."""

    def __init__(self, job: Job, members: list[tuple[int, int]]) -> None:
        self.job = job
        self.of: dict[int, list[tuple[int, int]]] = {}
        for s, j in members:
            self.of.setdefault(job.cluster.node(s, j), []).append((s, j))
        # With `job.leases` a node asks for the blobs of swarms it does not seed: a SEEDED
        # answer enters the asker as a downloader (a seeder asking would turn into
        # one, and its swarm lose a seeder).
        self.asks: dict[int, list[int]] = {}
        if job.leases:
            for i, ms in self.of.items():
                seeds = {s for s, j in ms if j >= job.cluster.leechers}
                self.asks[i] = [s for s in range(len(job.leases)) if s not in seeds]
            self.of = {i: ms for i, ms in self.of.items() if self.asks[i]}
        self.clients: dict[int, KeptAlive] = {}

    def client(self, i: int) -> KeptAlive:
        if i not in self.clients:
            ctx = client_ssl_context(self.job.pool / str(i)) if self.job.pool else None
            self.clients[i] = KeptAlive(self.url(i), ctx, CONNECT_TIMEOUT_S)
        return self.clients[i]

    def announce(self, i: int, rnd: random.Random) -> tuple[int, int, int]:
        """One batch of node i's members: (answered, failed, peers)."""
        job = self.job
        mine = self.of[i]
        if job.leases:
            return ask_seeded(self.client(i), job.leases[rnd.choice(self.asks[i])], i)
        picked = [mine[(rnd.randrange(len(mine)) + n) % len(mine)] for n in range(job.batch)]
        rows = [query(job.cluster, job.hashes[s], s, j, node=job.pool is None).encode()
                for s, j in picked]  # fmt: skip
        status, body = self.client(i).post(
            "/v1/announces", msgpack.packb(rows, use_bin_type=True), "application/msgpack"
        )
        if status != 200:
            return 0, len(rows), 0
        counts = [count_peers(a) for a in msgpack.unpackb(body)]
        good = [c for c in counts if c >= 0]
        return len(good), len(counts) - len(good), sum(good)

    def url(self, i: int) -> str:
        """The tracker node i talks to."""
        return f"{'https' if self.job.pool else 'http'}://127.0.0.1:{self.job.port_of(i)}"


def _relay_worker(
    job: Job,
    members: list[tuple[int, int]],
    go: multiprocessing.synchronize.Event,
    ready: multiprocessing.queues.Queue[int],
    w: int,
) -> tuple[int, int, int, float, int]:
    relays = _Relays(job, members)
    # A few nodes each, so that each connection is used well within the keep-alive.
    nodes = sorted(relays.of)[:RELAY_NODES_PER_WORKER]
    if not nodes:
        raise RuntimeError(f"worker {w} has no node to send from: a bigger cluster, please")
    rnd = random.Random()
    for i in nodes:  # each node's connection (and handshake) before the clock
        relays.announce(i, rnd)
    ready.put(w)
    # Until every worker is ready, keep each connection within the tracker's
    # keep-alive (5 s idle): the run measures kept-alive connections only.
    for _ in range(int(WARMUP_LIMIT_S)):
        if go.wait(timeout=1.0):
            break
        for i in nodes:
            relays.announce(i, rnd)
    start = time.perf_counter()
    answered = errors = peers = 0
    while time.perf_counter() < start + job.seconds:
        try:
            got = relays.announce(rnd.choice(nodes), rnd)
        except (OSError, ValueError, wire.WireError):
            got = (0, job.batch, 0)
        answered, errors, peers = answered + got[0], errors + got[1], peers + got[2]
    for c in relays.clients.values():
        c.close()
    return answered, errors, peers, time.perf_counter() - start, 0


def _worker(
    job: Job,
    w: int,
    go: multiprocessing.synchronize.Event,
    ready: multiprocessing.queues.Queue[int],
    out: multiprocessing.queues.Queue[tuple[int, int, int, float, int]],
) -> None:
    os.sched_setaffinity(0, {job.core})
    members = _members(job.cluster, w, job.workers)
    if job.batch:
        out.put(_relay_worker(job, members, go, ready, w))
        return
    conn = _Conn(job, w)
    rnd = random.Random()
    answered = errors = peers = 0
    if job.resume:  # one full handshake per node, before the clock: a session to offer
        firsts = {job.cluster.node(s, j): (s, j) for s, j in reversed(members)}
        for i, (s, j) in firsts.items():
            conn.announce(job.port, i, _request(job, s, j))
    ready.put(w)
    go.wait()
    start = time.perf_counter()
    deadline = start + (WARMUP_LIMIT_S if job.warmup else job.seconds)
    for n in range(len(members) if job.warmup else 1 << 62):
        if time.perf_counter() >= deadline:
            break
        s, j = members[n] if job.warmup else rnd.choice(members)
        i = job.cluster.node(s, j)
        try:
            got = conn.announce(job.port_of(i), i, _request(job, s, j))
        except OSError:
            got = -1
        answered += got >= 0
        errors += got < 0
        peers += max(0, got)
    out.put((answered, errors, peers, time.perf_counter() - start, conn.reused))


def run_load(
    job: Job,
    pid: int,
    metrics_url: str,
    redis: RedisUnderTest | None = None,
    on_go: Callable[[], None] = lambda: None,
) -> Load:
    """`job.workers` processes announcing; the tracker's CPU (and its Redis's work) over
    the same span. `on_go` is called once every worker is ready, as the clock starts
    (bench/tracker_profile.py starts its sampler there)."""
    mp = multiprocessing.get_context("spawn")
    go = mp.Event()
    out: multiprocessing.queues.Queue[tuple[int, int, int, float, int]] = mp.Queue()
    ready: multiprocessing.queues.Queue[int] = mp.Queue()
    procs = [mp.Process(target=_worker, args=(job, w, go, ready, out)) for w in range(job.workers)]
    for p in procs:
        p.start()
    # Every worker has imported, built its contexts (and, resuming, shaken hands once
    # per node) before the clock starts.
    for _ in procs:
        ready.get(timeout=WARMUP_LIMIT_S)
    replaced0 = _replaced(metrics_url)
    redis0 = redis.settled_stats() if redis is not None else None
    on_go()
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    go.set()
    limit = WARMUP_LIMIT_S if job.warmup else job.seconds
    results = [out.get(timeout=limit + 60) for _ in procs]
    elapsed = time.perf_counter() - t0
    cpu = (cpu_seconds(pid) - cpu0) / elapsed * 100
    cost = redis.cost_since(redis0) if redis is not None and redis0 is not None else None
    for p in procs:
        p.join(timeout=30)
    answered = sum(r[0] for r in results)
    rate_seconds = max(r[3] for r in results)
    return Load(
        answered,
        sum(r[1] for r in results),
        rate_seconds,
        cpu,
        sum(r[2] for r in results),
        _replaced(metrics_url) - replaced0,
        sum(r[4] for r in results),
        cost,
    )


def _replaced(metrics_url: str) -> int:
    text = httpx.get(f"{metrics_url}/metrics", timeout=10).text
    found = re.search(r"^p2preg_tracker_peers_replaced_total ([\d.e+]+)$", text, re.M)
    return int(float(found.group(1))) if found else 0


async def _setup(
    url: str, publisher: Path | None, pool: Path | None, metas: list[Metainfo], cluster: Cluster
) -> None:
    """Publish every torrent (as `bench`), then every seeding member confirms."""
    https = pool is not None
    shared = (
        https_client(publisher, timeout=30)
        if https
        else httpx.AsyncClient(timeout=30, limits=httpx.Limits(keepalive_expiry=PLAIN_EXPIRY_S))
    )
    nodes: dict[int, httpx.AsyncClient] = {}
    try:
        await publish_all(TrackerClient(url, node="bench", http=shared), metas)
        for i in range(cluster.nodes):
            # Under mutual TLS a node confirms over a connection showing its certificate.
            nodes[i] = https_client(pool / str(i), timeout=30) if pool is not None else shared
        clients = {i: TrackerClient(url, node=node_name(i), http=h) for i, h in nodes.items()}
        await confirm_seeders(clients, cluster, metas)
    finally:
        for h in {id(h): h for h in (shared, *nodes.values())}.values():
            await h.aclose()


def _node_pool(ca: ClusterCA, root: Path, cluster: Cluster) -> Path:
    """tls_dirs for every node of the cluster: root/i holds node i's certificate."""
    for i in range(cluster.nodes):
        ca.tls_dir(root / str(i), "node", node_name(i))
    return root


def prepare(t: TrackerProcess, job: Job, metas: list[Metainfo], publisher: Path) -> None:
    """Publish and confirm the cluster's torrents at `t`, walk every member once
    (`job.warmup`), and check that a leecher and a seeder get peers."""
    trio.run(_setup, t.url, publisher if job.pool else None, job.pool, metas, job.cluster)
    walked = run_load(job, t.process.pid, t.metrics_url or t.url)
    if walked.answered < job.cluster.members:
        raise RuntimeError(f"the warm-up reached {walked.answered} members only")
    _sample(job)


def _measure_one(
    t: TrackerProcess,
    job: Job,
    metas: list[Metainfo],
    publisher: Path,
    redis: RedisUnderTest | None,
) -> Load:
    prepare(t, job, metas, publisher)
    metrics_url = t.metrics_url or t.url
    return run_load(dataclasses.replace(job, warmup=False), t.process.pid, metrics_url, redis)


def _sample(job: Job) -> None:
    """Swarm 0's first leecher and last seeder announce by hand: both must get peers."""
    for j in (0, job.cluster.per_swarm - 1):
        i = job.cluster.node(0, j)
        got = _Conn(job, i % job.workers).announce(job.port, i, _request(job, 0, j))
        if got <= 0:
            raise RuntimeError(f"member {j} of swarm 0 got {got} peers: no swarm to measure")


@contextmanager
def store_for(store: str, workdir: Path, core: str) -> Iterator[RedisUnderTest | None]:
    """`sqlite`: nothing to start (the tracker's default); `redis`: a redis-server for it."""
    if store == "sqlite":
        yield None
        return
    with open_redis_store(workdir, core=int(core)) as redis:
        yield redis


def measure_both(
    workdir: Path,
    metas: list[Metainfo],
    cluster: Cluster,
    seconds: float,
    *,
    tracker_core: str,
    load_core: int,
    stores: Sequence[str] = ("sqlite",),
) -> dict[tuple[str, str], Load]:
    """The same generator against a plain and an mTLS tracker, one after the other;
    then the mTLS one again with clients resuming their TLS sessions (`Job.resume`),
    and as nodes' relays send theirs (`Job.batch`, each of `RELAY_BATCHES`); then, plain
    and mTLS, lease requests for seeded blobs (`Job.leases`);
    all of it once per store in `stores` (`sqlite`, `redis`). Keyed (store, mode).

    The plain one has no token (loopback): a token check is one constant-time
    compare, nothing beside a handshake.
    """
    ca = ClusterCA.make("bench")
    tracker_dir = ca.tls_dir(workdir / "pki" / "tracker", "tracker", "t", ips=["127.0.0.1"])
    publisher = ca.tls_dir(workdir / "pki" / "bench", "node", "bench")
    pool = _node_pool(ca, workdir / "pki" / "nodes", cluster)
    # Under mutual TLS the cluster's torrents are SSL torrents rooted at its CA.
    ssl_metas = make_torrents(workdir, len(metas), root=ca.cert_pem)
    loads: dict[tuple[str, str], Load] = {}
    for store in stores:
        for mode, tls_dir in (("http", None), ("https-mtls", tracker_dir)):
            mode_metas = metas if tls_dir is None else ssl_metas
            hashes = [m.swarm_keys[0] for m in mode_metas]
            home = workdir / f"gen-{store}-{mode}"
            with (
                store_for(store, home, tracker_core) as redis,
                open_tracker(
                    home,
                    tls_dir=tls_dir,
                    args=[
                        "--log-level",
                        "WARNING",
                        "--no-udp",
                        *(redis.tracker_args if redis else ()),
                    ],
                    cpus=tracker_core,
                ) as t,
            ):
                metrics_url = t.metrics_url or t.url
                if redis is not None:
                    wait_serving(metrics_url)
                port = int(t.url.rsplit(":", 1)[1])
                job = Job(
                    port, hashes, cluster, pool if tls_dir else None, load_core, seconds, True
                )
                loads[store, mode] = _measure_one(t, job, mode_metas, publisher, redis)
                if tls_dir is not None:
                    again = dataclasses.replace(job, warmup=False, resume=True)
                    loads[store, f"{mode}-resumed"] = run_load(
                        again, t.process.pid, metrics_url, redis
                    )
                    for batch in RELAY_BATCHES:
                        relayed = dataclasses.replace(job, warmup=False, batch=batch)
                        loads[store, f"{mode}-relayed-{batch}"] = run_load(
                            relayed, t.process.pid, metrics_url, redis
                        )
                asks = dataclasses.replace(job, warmup=False, batch=1,
                                           leases=tuple(str(m.digest) for m in mode_metas))
                loads[store, f"{mode}-leases"] = run_load(asks, t.process.pid, metrics_url, redis)
    return loads
