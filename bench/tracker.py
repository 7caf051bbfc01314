"""Announce throughput of our tracker against Debian's opentracker, same load, same run.

Both trackers run as processes pinned to core 0 (`taskset`), the load generator
to core 1. Both whitelist the same 1,000 torrents (ours via published metainfo,
opentracker via its whitelist file) and get the same load: a cluster of
10,000 nodes, each swarm 56 of them (6 downloading, 50 confirmed seeders),
each node announcing with its own `node=` name, peer id and port, every
announce a member at random re-announcing (bench/tracker_load.py) — so the
tracker's one peer per identity holds a full swarm and a leecher's answer
carries `numwant=50` peers —

- HTTP: `wrk` with a Lua request generator and `Connection: close`, so every
  announce is a new TCP connection (as libtorrent does);
- UDP (BEP 15): a Python generator keeping a window of announces in flight
  (one connect, then announces; `node=` in BEP 41 URL data, as libtorrent
  sends a tracker URL's query; the same code for both trackers).

Before measuring, every member announces once (over UDP, in order), so
the run measures re-announces, not arrivals; a leecher's and a seeder's
answer are checked to carry peers, and every row gives the mean peers per
answer and, for ours, how many announces replaced an identity's peer (none
should). Tracker CPU use over each run is read from /proc, to tell a saturated
tracker from a saturated generator. Prints a table, writes JSON to
bench/results/. Not a test: no assertions on speed. Usage:

    .venv/bin/python -m bench.tracker [--swarms 1000] [--nodes 10000] [--seconds 10]

Then the mTLS mode (bench/tracker_mtls.py): our tracker with `--tls-dir`,
announces over HTTPS with node certificates from a pool (`--tls-nodes`, in
`--tls-swarms` swarms) and a new TLS handshake each (`Connection: close`, as
libtorrent does); the same with each node's TLS session resumed (what that
would save; libtorrent does not resume); and, in the same run and with the same
Python generator, our tracker in plain HTTP; the table gives their ratio (wrk
cannot show a client certificate, so it cannot drive these rows). `--only wrk`
or `--only gen` runs one part.

`--store redis` adds our tracker with a Redis store beside every row of ours
(SQLite): a redis-server of its own per tracker (bench/tracker_redis.py, a
password file, pinned to the tracker's core), measured once the tracker serves
(`/readyz`). Such a tracker has no UDP, so its warm-up walk goes over HTTP (the
Python generator) and it has no UDP row. Its rows add Redis commands per
announce (`total_commands_processed` before and after, the commands its
scripts run included) and Redis CPU per announce (`used_cpu_sys` +
`used_cpu_user`), both snapshots taken a peer flush period after announces
stop, so each counts whole flushes of the peers' writes.

Needs `wrk` and `opentracker` (apt; installed here if missing and run as root).
All trackers start and stop by pid through harness.procs (ours through
harness.tracker), pinned with `taskset`; `--tls off` (the only value yet) is
recorded in the JSON's `args`: it is about the wrk rows, the mTLS rows always run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import quote_from_bytes

import httpx
import trio
from rich.console import Console
from rich.table import Table

from bench import tracker_fronts as fronts
from bench import tracker_udp as udp
from bench.machine import add_tls_flag, cpu_seconds
from bench.tracker_load import (
    FIRST_PORT,
    NUMWANT,
    Cluster,
    check_answer,
    confirm_seeders,
    make_torrents,
    node_name,
    publish_all,
)
from bench.tracker_mtls import Job, Load, measure_both, run_load, store_for
from bench.tracker_redis import RedisCost, RedisUnderTest, wait_serving
from bench.tracker_udp import Run
from harness.procs import Process, free_port, wait_for_http
from harness.tracker import open_tracker
from p2preg.core.metainfo import Metainfo
from tracker.client import PLAIN_KEEPALIVE_EXPIRY_S, TrackerClient

TOKEN = "bench-token"
# Rows measured with bench/tracker_mtls.py's generator rather than wrk end so.
PY_GEN = " (py gen)"
STORES = {"sqlite": "p2preg", "redis": "p2preg+redis"}  # --store: our tracker's row names
RESULTS = Path(__file__).parent / "results"
TRACKER_CORE, LOAD_CORE = "0", "1"
LOAD = int(LOAD_CORE)
WARMUP_LIMIT_S = 120  # a warm-up walk that takes longer is a broken tracker
UDP_WINDOW = 64


@dataclass
class Result:
    tracker: str
    protocol: str
    announces_per_s: float
    requests: int
    errors: int
    seconds: float
    tracker_cpu_pct: float
    peers_per_answer: float
    # Announces of the run that replaced an identity's peer (ours only, else -1).
    replaced: int = -1
    # With a Redis store: its commands (those its scripts ran included) and CPU µs per announce.
    redis_commands_per_announce: float | None = None
    redis_cpu_us_per_announce: float | None = None
    redis_calls: dict[str, int] | None = None  # by command, over the run

    def with_redis(self, cost: RedisCost | None) -> Result:
        if cost is None:
            return self
        self.redis_commands_per_announce = cost.commands_per(self.requests)
        self.redis_cpu_us_per_announce = cost.cpu_us_per(self.requests)
        self.redis_calls = dict(cost.calls)
        return self


def ensure_tools() -> None:
    missing = [
        p for p, exe in (("wrk", "wrk"), ("opentracker", "opentracker")) if not shutil.which(exe)
    ]
    if missing:
        if os.geteuid() != 0:
            sys.exit(f"bench/tracker.py: please apt-get install {' '.join(missing)}")
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True)


def lua_script(path: Path, hashes: list[bytes], cluster: Cluster, token: str | None) -> None:
    """wrk's request generator: members of `cluster` at random re-announcing
    (tracker_load.py). `response` counts the peers of each answer; `done` prints
    them as `PEERS <answers> <peers>`."""
    encoded = ",\n".join(f'"{quote_from_bytes(h, safe="")}"' for h in hashes)
    extra = f"&token={token}" if token else ""
    path.write_text(
        f"""
local hashes = {{ {encoded} }}
local N, M, L = {cluster.nodes}, {cluster.per_swarm}, {cluster.leechers}
local FIRST, NUMWANT = {FIRST_PORT}, {NUMWANT}
local TOTAL = #hashes * M
answers, peers = 0, 0
math.randomseed(os.time() * 1000 + math.floor(os.clock() * 1000000))
local function member(k)
  local s, j = math.floor(k / M), k % M
  local i = (s * M + j) % N
  local left = 0
  if j < L then left = 1 + j * 1000 end
  return "/announce?info_hash=" .. hashes[s + 1]
    .. string.format("&peer_id=-BN0001-%012d&port=%d", i, FIRST + i)
    .. "&uploaded=0&downloaded=0&left=" .. left .. "&compact=1&numwant=" .. NUMWANT
    .. string.format("&node=bench-node-%05d", i) .. "{extra}"
end
request = function()
  return wrk.format("GET", member(math.random(0, TOTAL - 1)))
end
response = function(status, headers, body)
  answers = answers + 1
  local n = string.match(body, "5:peers(%d+):")
  if n then peers = peers + math.floor(tonumber(n) / 6) end
end
local threads = {{}}
setup = function(thread)
  table.insert(threads, thread)
end
done = function(summary, latency, requests)
  local a, p = 0, 0
  for _, t in ipairs(threads) do a = a + t:get("answers"); p = p + t:get("peers") end
  io.write(string.format("PEERS %d %d\\n", a, p))
end
"""
    )


def run_wrk(port: int, script: Path, seconds: int, connections: int) -> Run:
    out = subprocess.run(
        [
            "taskset",
            "-c",
            LOAD_CORE,
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "-H",
            "Connection: close",
            "-s",
            str(script),
            f"http://127.0.0.1:{port}/",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    elapsed = float(re.search(r"requests in ([\d.]+)s", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    # opentracker closes without reading the rest of the request; wrk counts
    # those as read errors though the answer arrived: count only failures that
    # cost an answer (connect errors, timeouts, non-2xx).
    hard = sum(int(n) for n in re.findall(r"(?:connect|timeout) (\d+)", out))
    peers = int(re.search(r"PEERS \d+ (\d+)", out).group(1))  # type: ignore[union-attr]
    return Run(requests, hard + (int(non2xx.group(1)) if non2xx else 0), peers, elapsed)


def replaced_total(metrics_url: str | None) -> int:
    """p2preg_tracker_peers_replaced_total now (-1 without a metrics URL: opentracker)."""
    if metrics_url is None:
        return -1
    text = httpx.get(f"{metrics_url}/metrics", timeout=10).text
    found = re.search(r"^p2preg_tracker_peers_replaced_total ([\d.e+]+)$", text, re.M)
    return int(float(found.group(1))) if found else -1


@dataclass(frozen=True)
class Target:
    """A tracker under load: its name, pid, port, token and (ours) metrics URL."""

    name: str
    pid: int
    port: int
    token: str | None
    metrics_url: str | None = None
    udp: bool = True  # it answers BEP 15 on the same port number


def warm_up(t: Target, hashes: list[bytes], cluster: Cluster, members: list[bytes]) -> None:
    """Every member announces once: over UDP (3-10x faster than HTTP, same identities),
    or over HTTP with the Python generator where the tracker has no UDP (a Redis store)."""
    if t.udp:
        walked = udp.run_pinned(LOAD, t.port, members, WARMUP_LIMIT_S, UDP_WINDOW, walk=True)
        answered = walked.answered
    else:
        job = Job(t.port, hashes, cluster, None, LOAD, 0, warmup=True, token=t.token)
        answered = run_load(job, t.pid, t.metrics_url or f"http://127.0.0.1:{t.port}").answered
    if answered < cluster.members:
        raise RuntimeError(f"{t.name}: the warm-up reached {answered} members only")


def measure(
    t: Target,
    hashes: list[bytes],
    cluster: Cluster,
    workdir: Path,
    args: argparse.Namespace,
    redis: RedisUnderTest | None = None,
) -> list[Result]:
    script = workdir / f"{t.name}.lua"
    lua_script(script, hashes, cluster, t.token)
    members = udp.packets(cluster, hashes, t.token)
    warm_up(t, hashes, cluster, members)
    sample = check_answer(f"http://127.0.0.1:{t.port}", cluster, hashes[0], token=t.token)
    print(f"{t.name}: swarm 0's first leecher got {sample[0]} peers, a seeder {sample[1]}")
    results = []
    for protocol in ("http", "udp") if t.udp else ("http",):
        redis0 = redis.settled_stats() if redis is not None else None
        cpu0, replaced0 = cpu_seconds(t.pid), replaced_total(t.metrics_url)
        if protocol == "http":
            run = run_wrk(t.port, script, args.seconds, args.connections)
        else:
            run = udp.run_pinned(LOAD, t.port, members, args.seconds, UDP_WINDOW, walk=False)
        cpu = (cpu_seconds(t.pid) - cpu0) / run.seconds * 100
        replaced = replaced_total(t.metrics_url) - replaced0 if t.metrics_url else -1
        cost = redis.cost_since(redis0) if redis is not None and redis0 is not None else None
        rate = run.answered / run.seconds
        per_answer = run.peers / max(1, run.answered)
        results.append(
            Result(
                t.name,
                protocol,
                rate,
                run.answered,
                run.errors,
                run.seconds,
                cpu,
                per_answer,
                replaced,
            ).with_redis(cost)
        )
    return results


async def setup_ours(url: str, metas: list[Metainfo], cluster: Cluster) -> None:
    """Publish every torrent, then every seeding member confirms its swarm's."""
    limits = httpx.Limits(keepalive_expiry=PLAIN_KEEPALIVE_EXPIRY_S)
    async with httpx.AsyncClient(timeout=30, limits=limits) as http:
        await publish_all(TrackerClient(url, node="bench", token=TOKEN, http=http), metas)
        clients = {
            i: TrackerClient(url, node=node_name(i), token=TOKEN, http=http)
            for i in range(cluster.nodes)
        }
        await confirm_seeders(clients, cluster, metas)


def _measure_ours(
    workdir: Path,
    metas: list[Metainfo],
    hashes: list[bytes],
    args: argparse.Namespace,
    store: str = "sqlite",
) -> list[Result]:
    """Our tracker with its SQLite store, or with a redis-server of its own (`store`)."""
    port = free_port(udp=True)
    cluster = Cluster(nodes=args.nodes, swarms=len(metas))
    home = workdir / ("ours" if store == "sqlite" else f"ours-{store}")
    with (
        store_for(store, home, TRACKER_CORE) as redis,
        open_tracker(
            home,
            port=port,
            token=TOKEN,
            args=["--log-level", "WARNING", *(redis.tracker_args if redis else ())],
            cpus=TRACKER_CORE,
        ) as ours,
    ):
        if redis is not None:
            wait_serving(ours.url)  # a replica serves once it took its term
        trio.run(setup_ours, ours.url, metas, cluster)
        target = Target(STORES[store], ours.process.pid, port, TOKEN, ours.url, redis is None)
        return measure(target, hashes, cluster, workdir, args, redis)


def _measure_opentracker(
    workdir: Path, hashes: list[bytes], args: argparse.Namespace
) -> list[Result]:
    port = free_port(udp=True)
    ot = workdir / "opentracker"
    ot.mkdir()
    ot.chmod(0o755)
    (ot / "whitelist").write_text("".join(h.hex() + "\n" for h in hashes))
    (ot / "whitelist").chmod(0o644)
    argv = ["opentracker", "-i", "127.0.0.1", "-p", str(port), "-P", str(port)]
    argv += ["-d", str(ot), "-w", "whitelist"]
    if os.geteuid() == 0:
        argv += ["-u", "nobody"]  # as root it must drop privileges
    cluster = Cluster(nodes=args.nodes, swarms=len(hashes))
    with Process(argv, ot, cwd=ot, cpus=TRACKER_CORE, term_grace_s=10.0) as proc:
        wait_for_http(f"http://127.0.0.1:{port}/announce", timeout_s=20.0, process=proc)
        target = Target("opentracker", proc.pid, port, None)
        return measure(target, hashes, cluster, workdir, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--swarms", type=int, default=1000)
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument(
        "--tls-swarms",
        type=int,
        default=100,
        help="swarms of the Python generator's rows (a walk over every member at ~500"
        " mTLS announces/s must stay short)",
    )
    parser.add_argument(
        "--tls-nodes", type=int, default=1000, help="node certificates in the mTLS pool"
    )
    parser.add_argument("--only", choices=("wrk", "gen"), help="run one part only")
    parser.add_argument(
        "--store",
        choices=tuple(STORES),
        default="sqlite",
        help="redis: also measure our tracker with a Redis store (a redis-server started"
        " for it), beside SQLite: plain, mTLS, and what Redis did per announce",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        choices=(1, fronts.REPLICAS),
        default=1,
        help=f"{fronts.REPLICAS}: also run {fronts.REPLICAS} replicas on one Redis with the"
        " Python generator's announces spread over them (bench/tracker_fronts.py; needs"
        " --store redis)",
    )
    add_tls_flag(parser)
    args = parser.parse_args()
    if args.replicas > 1 and args.store != "redis":
        parser.error("--replicas needs --store redis")
    ensure_tools()
    stores = ("sqlite",) if args.store == "sqlite" else ("sqlite", args.store)
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="p2preg-bench-tracker-") as tmp:
        workdir = Path(tmp)
        metas = make_torrents(workdir, max(args.swarms, args.tls_swarms))
        if args.only != "gen":
            some = metas[: args.swarms]
            hashes = [m.swarm_keys[0] for m in some]
            for store in stores:
                results += _measure_ours(workdir, some, hashes, args, store)
            results += _measure_opentracker(workdir, hashes, args)
        if args.only != "wrk":
            gen = Cluster(nodes=args.tls_nodes, swarms=args.tls_swarms)
            loads = measure_both(
                workdir,
                metas[: args.tls_swarms],
                gen,
                args.seconds,
                tracker_core=TRACKER_CORE,
                load_core=int(LOAD_CORE),
                stores=stores,
            )
            results += [_from_load(key, load) for key, load in loads.items()]
            for (store, mode), load in loads.items():
                if mode in ("https-mtls", "https-mtls-resumed"):
                    done = load.answered + load.errors
                    print(f"{store} {mode}: the tracker resumed {load.resumed} of {done} sessions")
            if args.replicas > 1:
                runs = fronts.measure_fronts(workdir, metas[: args.tls_swarms], gen, args.seconds,
                                             tracker_core=TRACKER_CORE, load_core=LOAD)  # fmt: skip
                direct = {mode: load.tracker_cpu_pct / 100 * load.seconds / load.answered * 1e6
                          for (store, mode), load in loads.items()
                          if store == "redis" and (mode in ("http", "https-mtls")
                                                   or "-relayed-" in mode)}  # fmt: skip
                args.fronts = fronts.report(runs, direct)
    report(results, args)


def _from_load(key: tuple[str, str], load: Load) -> Result:
    store, mode = key
    rate = load.answered / load.seconds
    cpu = load.tracker_cpu_pct
    per_answer = load.peers / max(1, load.answered)
    name = STORES[store] + PY_GEN
    result = Result(
        name, mode, rate, load.answered, load.errors, load.seconds, cpu, per_answer, load.replaced
    )
    return result.with_redis(load.redis)


def report(results: list[Result], args: argparse.Namespace) -> None:
    by = {(r.tracker, r.protocol): r for r in results}
    table = Table(
        title=f"Tracker announces/s — {args.swarms} swarms of 56 of {args.nodes} nodes"
        f" (py gen: {args.tls_swarms} of {args.tls_nodes}), numwant={NUMWANT}, new connection"
        f" per HTTP request, tracker on core {TRACKER_CORE}, load on core {LOAD_CORE};"
        " -relayed-B rows answer B announces a request, -leases rows lease requests"
    )
    ref_name = "vs opentracker (py gen: vs its http)"
    columns = (
        "tracker",
        "protocol",
        "answered/s",
        "errors",
        "tracker CPU",
        "CPU µs/answer",
        "peers/answer",
        "replaced",
        "Redis cmds/announce",
        "Redis CPU µs/announce",
    )
    for name in (*columns, ref_name):
        table.add_column(name, justify="left" if name in ("tracker", "protocol") else "right")
    for r in results:
        # The generator's rows compare with their tracker's plain row: mTLS / plain.
        gen = r.tracker.endswith(PY_GEN)
        ref = by.get((r.tracker, "http") if gen else ("opentracker", r.protocol))
        ratio = r.announces_per_s / ref.announces_per_s if ref else float("nan")
        table.add_row(
            r.tracker,
            r.protocol,
            f"{r.announces_per_s:,.0f}",
            str(r.errors),
            f"{r.tracker_cpu_pct:.0f} %",
            f"{r.tracker_cpu_pct / 100 * r.seconds / max(1, r.requests) * 1e6:.0f}",
            f"{r.peers_per_answer:.1f}",
            "—" if r.replaced < 0 else str(r.replaced),
            _maybe(r.redis_commands_per_announce, ".2f"),
            _maybe(r.redis_cpu_us_per_announce, ".1f"),
            f"{ratio:.2f}",
        )
    Console(width=200).print(table)
    for r in results:
        if r.redis_calls is not None:
            print(f"{r.tracker} {r.protocol}: Redis commands {r.redis_calls}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"tracker-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(
        json.dumps({"args": vars(args), "results": [asdict(r) for r in results]}, indent=2)
    )
    print(f"wrote {out}")


def _maybe(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


if __name__ == "__main__":
    main()
