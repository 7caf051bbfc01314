"""Three tracker replicas on one Redis, announces spread over all of them (tracker/fronts.py).

The standbys answer announces through the serving replica: each terminates its
nodes' connections (a TLS handshake under mutual TLS) and forwards the
announce, in batches, over kept-alive connections; the serving replica applies
it. This measures, for plain HTTP and for mutual TLS with a handshake per
announce, with bench/tracker_mtls.py's generator (node i announces to replica
i mod k, as nodes given every replica spread theirs):

- `spread`: announces to all three replicas; the cluster's rate and each
  replica's CPU;
- `fronts`: announces to the two standbys only, so that everything the serving
  replica does is forwarded work: its CPU per forwarded announce, and a
  front's CPU per announce it fronted; under mutual TLS also as nodes' relays
  send theirs (mode `https-mtls-relayed-B`: batches of B on kept-alive
  connections, bench/tracker_mtls.py), which a front forwards like any.

Those costs give the projection of k replicas on cores of their own (`project`):
each of k replicas takes 1/k of the announces; the serving one applies all of
them, its own at the cost of a direct announce and the rest at the cost of a
forwarded one; each front pays its own share. On the benchmark machine all
three replicas and Redis share one core and the load the other, so the
measured rate is one core's, not three's. Used by bench/tracker.py
(`--replicas 3`); holds no assertions on speed.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import trio
from rich.console import Console
from rich.table import Table

from bench.machine import cpu_seconds
from bench.tracker_load import Cluster, make_torrents
from bench.tracker_mtls import RELAY_BATCHES, Job, _node_pool, _setup, run_load
from bench.tracker_redis import open_redis_store, wait_serving
from harness.node import metric_value
from harness.procs import wait_until
from harness.tlscerts import ClusterCA
from harness.tracker import TrackerProcess, open_tracker
from p2preg.core.metainfo import Metainfo

REPLICAS = 3
# Announces in flight at once (one per generator process): a cluster's nodes
# announce independently, so a front has many at a time to batch; 16 (the
# single-tracker rows') would cap its batches at about 4.
WORKERS = 48
_COUNTERS = {
    "applied": ("p2preg_tracker_forwarded_total", {"result": "applied"}),
    "fronted": ("p2preg_tracker_front_forwards_total", {"result": "answered"}),
    "batches": ("p2preg_tracker_forwarded_batches_total", {}),
}


@dataclass(frozen=True)
class ReplicaRun:
    """One replica over one run: its role, CPU, and what it counted."""

    role: str  # "serving" or "front"
    cpu_s: float
    announces: float  # announces it applied (its own and forwarded ones)
    applied: float  # forwarded announces it applied (the serving replica)
    fronted: float  # announces it forwarded and answered (a front)
    batches: float = 0.0  # batches of forwarded announces it applied (the serving replica)


@dataclass(frozen=True)
class FrontsRun:
    mode: str  # http or https-mtls
    load: str  # spread (all replicas) or fronts (the standbys only)
    answered: int
    errors: int
    seconds: float
    replicas: list[ReplicaRun]

    @property
    def mean_batch(self) -> float:
        batches = sum(r.batches for r in self.replicas)
        return sum(r.applied for r in self.replicas) / batches if batches else float("nan")

    @property
    def per_s(self) -> float:
        return self.answered / self.seconds

    def cpu_us(self, role: str) -> float:
        """CPU µs per announce at a replica of `role`: per forwarded announce applied
        (serving, in the `fronts` load) or per announce fronted (a front)."""
        runs = [r for r in self.replicas if r.role == role]
        work = sum(r.applied if role == "serving" else r.fronted for r in runs)
        return sum(r.cpu_s for r in runs) * 1e6 / work if work else float("nan")


def project(direct_us: float, forwarded_us: float, front_us: float, k: int) -> float:
    """Announces/s that k replicas on a core each carry, announces spread evenly:
    the serving replica's core (1/k direct, (k-1)/k forwarded) or a front's."""
    if k == 1:
        return 1e6 / direct_us
    serving = 1e6 / (direct_us / k + forwarded_us * (k - 1) / k)
    return min(serving, k * 1e6 / front_us)


def _counters(t: TrackerProcess) -> dict[str, float]:
    text = httpx.get(f"{t.metrics_url or t.url}/metrics", timeout=10).text
    found = {key: metric_value(text, name, **labels) for key, (name, labels) in _COUNTERS.items()}
    # Every event's announces (a re-announce is event "none"; the walk's were others).
    found["announces"] = sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith('p2preg_tracker_announces_total{') and 'transport="http"' in line
    )
    return found


@contextmanager
def _replicas(
    workdir: Path, tls_dirs: Sequence[Path | None], core: str
) -> Iterator[tuple[TrackerProcess, list[TrackerProcess]]]:
    """A redis-server and k replicas on it (pinned to `core`): (serving, standbys)."""
    with ExitStack() as stack:
        redis = stack.enter_context(open_redis_store(workdir / "redis", core=int(core)))
        trackers = [
            stack.enter_context(
                open_tracker(
                    workdir / f"t{n}",
                    tls_dir=tls_dir,
                    args=["--log-level", "WARNING", "--no-udp", *redis.tracker_args],
                    cpus=core,
                    name=f"t{n}",
                )
            )
            for n, tls_dir in enumerate(tls_dirs)
        ]
        serving: list[TrackerProcess] = []

        def one() -> bool:
            serving[:] = [t for t in trackers if _ready(t)]
            return len(serving) == 1

        wait_until(one, timeout_s=30, what="a replica to serve", interval_s=0.1)
        wait_serving(serving[0].metrics_url or serving[0].url)
        yield serving[0], [t for t in trackers if t is not serving[0]]


def _ready(t: TrackerProcess) -> bool:
    try:
        return httpx.get(f"{t.metrics_url or t.url}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _port(t: TrackerProcess) -> int:
    return int(t.url.rsplit(":", 1)[1])


def _idle_cpu_s(everyone: Sequence[TrackerProcess], seconds: float) -> list[float]:
    """Each replica's CPU per second with no load: its term, sweeps and flushes."""
    cpu0 = [cpu_seconds(t.process.pid) for t in everyone]
    time.sleep(seconds)
    return [(cpu_seconds(t.process.pid) - c) / seconds for t, c in zip(everyone, cpu0, strict=True)]


def _run(job: Job, load: str, mode: str, serving: TrackerProcess,
         fronts: list[TrackerProcess]) -> FrontsRun:  # fmt: skip
    """One load; each replica's CPU less what it spends idle over as long (the term's
    renewals and the sweeps, which a low rate would otherwise charge to few announces)."""
    everyone = [serving, *fronts]
    idle = _idle_cpu_s(everyone, job.seconds)
    before = [(cpu_seconds(t.process.pid), _counters(t)) for t in everyone]
    result = run_load(job, serving.process.pid, serving.metrics_url or serving.url)
    runs = []
    for t, (cpu0, c0), base in zip(everyone, before, idle, strict=True):
        c1 = _counters(t)
        used = cpu_seconds(t.process.pid) - cpu0 - base * result.seconds
        runs.append(ReplicaRun(
            "serving" if t is serving else "front", max(0.0, used),
            c1["announces"] - c0["announces"], c1["applied"] - c0["applied"],
            c1["fronted"] - c0["fronted"], c1["batches"] - c0["batches"],
        ))  # fmt: skip
    return FrontsRun(mode, load, result.answered, result.errors, result.seconds, runs)


def measure_fronts(
    workdir: Path,
    metas: list[Metainfo],
    cluster: Cluster,
    seconds: float,
    *,
    tracker_core: str,
    load_core: int,
) -> list[FrontsRun]:
    """Plain and mTLS, each with the `spread` and the `fronts` load (module doc)."""
    workdir = workdir / "fronts"
    workdir.mkdir()
    ca = ClusterCA.make("bench")
    pki = workdir / "pki"
    tracker_dirs = [ca.tls_dir(pki / f"t{n}", "tracker", f"t{n}", ips=["127.0.0.1"])
                    for n in range(REPLICAS)]  # fmt: skip
    publisher = ca.tls_dir(pki / "bench", "node", "bench")
    pool = _node_pool(ca, pki / "nodes", cluster)
    ssl_metas = make_torrents(workdir, len(metas), root=ca.cert_pem)
    runs: list[FrontsRun] = []
    for mode, tls in (("http", False), ("https-mtls", True)):
        mode_metas = ssl_metas if tls else metas
        dirs: list[Path | None] = list(tracker_dirs) if tls else [None] * REPLICAS
        with _replicas(workdir / f"fronts-{mode}", dirs, tracker_core) as (serving, fronts):
            trio.run(_setup, serving.url, publisher if tls else None, pool if tls else None,
                     mode_metas, cluster)  # fmt: skip
            everyone = tuple(_port(t) for t in (serving, *fronts))
            job = Job(_port(serving), [m.swarm_keys[0] for m in mode_metas], cluster,
                      pool if tls else None, load_core, seconds, True, ports=everyone,
                      workers=WORKERS)  # fmt: skip
            walked = run_load(job, serving.process.pid, serving.metrics_url or serving.url)
            if walked.answered < cluster.members:
                raise RuntimeError(f"{mode}: the warm-up reached {walked.answered} members only")
            job = dataclasses.replace(job, warmup=False)
            runs.append(_run(job, "spread", mode, serving, fronts))
            only_fronts = dataclasses.replace(job, ports=tuple(_port(t) for t in fronts))
            runs.append(_run(only_fronts, "fronts", mode, serving, fronts))
            for batch in RELAY_BATCHES if tls else ():
                relayed = dataclasses.replace(only_fronts, batch=batch)
                runs.append(_run(relayed, "fronts", f"{mode}-relayed-{batch}", serving, fronts))
    return runs


def report(runs: list[FrontsRun], direct_us: dict[str, float]) -> dict[str, object]:
    """Print the runs and the projection; what goes into the JSON.

    `direct_us`: CPU µs per announce of one replica answering straight, by mode
    (bench/tracker.py's single-replica Redis rows of the same run).
    """
    table = Table(title=f"{REPLICAS} replicas on one Redis: announces through the fronts "
                  "(replicas and Redis share one core, the load the other)")  # fmt: skip
    for name in ("mode", "load", "announces/s", "errors", "serving CPU", "fronts CPU",
                 "serving µs/forwarded", "front µs/announce", "mean batch"):  # fmt: skip
        table.add_column(name, justify="left" if name in ("mode", "load") else "right")
    for r in runs:
        serving = sum(x.cpu_s for x in r.replicas if x.role == "serving") / r.seconds
        fronts = sum(x.cpu_s for x in r.replicas if x.role == "front") / r.seconds
        table.add_row(r.mode, r.load, f"{r.per_s:,.0f}", str(r.errors), f"{serving:.0%}",
                      # Spread, the serving replica's CPU is its own announces' too.
                      f"{fronts:.0%}", f"{r.cpu_us('serving'):.0f}" if r.load == "fronts" else "—",
                      f"{r.cpu_us('front'):.0f}", f"{r.mean_batch:.1f}")  # fmt: skip
    Console(width=200).print(table)
    projection: dict[str, dict[int, float]] = {}
    for mode, direct in direct_us.items():
        only = next((r for r in runs if r.mode == mode and r.load == "fronts"), None)
        if only is None:
            continue
        forwarded, front = only.cpu_us("serving"), only.cpu_us("front")
        projection[mode] = {k: project(direct, forwarded, front, k) for k in (1, 2, 3, 5, 8)}
        print(f"{mode}: direct {direct:.0f} µs, forwarded {forwarded:.0f} µs, front {front:.0f} µs"
              " per announce; projected announces/s, k replicas on a core each: "
              + ", ".join(f"k={k}: {v:,.0f}" for k, v in projection[mode].items()))  # fmt: skip
    return {"runs": [dataclasses.asdict(r) for r in runs], "direct_us": direct_us,
            "projection": projection}  # fmt: skip
