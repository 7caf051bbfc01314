"""`python -m bench.simulate`: validate against the fan-out benchmark, run the matrix, report.

    python -m bench.simulate validate                 # N = 4, 8 against docs/img/fanout.json
    python -m bench.simulate run        # N = 100,1000,10000; 2 profiles, 2 policies, 5 seeds
    python -m bench.simulate run --nodes 1000 --profiles edge --policies real --seeds 1
    python -m bench.simulate report bench/results/simulate-run-*.json --plot docs/img/simulate.png

Each writes bench/results/simulate-<kind>-<time>.json (every run's result and
parameters) and prints markdown tables. `--jobs` runs that many simulations at
once in worker processes (each run is one process's work, seeded, so the
results do not depend on it).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.simulate.cluster import simulate
from bench.simulate.params import CONFIRM_PATHS, MB, POLICIES, PROFILES, Params
from bench.simulate.report import (
    leases_table,
    markdown_table,
    measured_fanout,
    plot,
    queue_table,
    simulated_phases,
    summary,
    validation_rows,
    validation_table,
)
from bench.simulate.server import ANNOUNCE_PATHS

RESULTS = Path(__file__).resolve().parents[1] / "results"


def _one(job: tuple[str, Params]) -> dict[str, Any]:
    profile, params = job
    out = simulate(params).as_json()
    out["profile"] = profile
    return out


def _run_all(jobs: list[tuple[str, Params]], workers: int) -> list[dict[str, Any]]:
    if workers <= 1:
        return [_one(j) for j in jobs]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_one, jobs))


def _save(kind: str, doc: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"simulate-{kind}-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(doc, indent=1))
    return path


def validate(seeds: int, workers: int, out: Path) -> list[dict[str, Any]]:
    """The fan-out benchmark's cluster (U 50, B 200 Mbit/s, 100 MB in 4 layers), simulated."""
    base = Params(
        nodes=4, image_bytes=100 * MB, layers=4, upstream_mbit=50.0, node_mbit=200.0,
        fail_fraction=0.0, tracker_replicas=1,  # the benchmark ran one tracker
        client_downloads=0,  # measured with `ctr images pull`: every layer at once
    )
    ns = (4, 8)
    jobs = [("fanout", replace(base, nodes=n, seed=s)) for n in ns for s in range(1, seeds + 1)]
    runs = _run_all(jobs, workers)
    sim = {n: simulated_phases([r for r in runs if r["params"]["nodes"] == n]) for n in ns}
    rows = validation_rows(sim, measured_fanout())
    print(validation_table(rows))
    path = _save("validate", {"runs": runs, "validation": rows}, out)
    print(f"wrote {path}")
    return rows


def matrix(a: argparse.Namespace) -> None:
    jobs = []
    for profile in a.profiles.split(","):
        up, link = PROFILES[profile]
        for n in (int(x) for x in a.nodes.split(",")):
            for policy in a.policies.split(","):
                for seed in range(a.first_seed, a.first_seed + a.seeds):
                    p = Params(
                        nodes=n, upstream_mbit=up, node_mbit=link, policy=policy, seed=seed,
                        holder_failures=a.holder_failures, lease_ttl_s=a.lease_ttl_s,
                        lease_silence_s=a.lease_silence_s, lease_grant_ack_s=a.lease_grant_ack_s,
                        tracker_replicas=a.tracker_replicas, announces=a.announces,
                        control_fronts=a.control_fronts,
                        client_downloads=a.client_downloads, confirms=a.confirms,
                        stall_report_s=a.stall_report_s, fetches_per_image=a.fetches_per_image,
                        connections_limit=a.connections_limit,
                    )
                    jobs.append((profile, p))
    started = time.perf_counter()
    runs = _run_all(jobs, a.jobs)
    rows = summary(runs)
    print(markdown_table(rows))
    print(leases_table(rows))
    print(queue_table(rows))
    wall = time.perf_counter() - started
    path = _save("run", {"runs": runs, "summary": rows, "wall_s": wall}, a.out)
    print(f"wrote {path} ({len(runs)} runs, {wall:.0f} s)")


def report(paths: list[Path], plot_to: Path | None) -> None:
    runs = [r for path in paths for r in json.loads(path.read_text())["runs"]]
    rows = summary(runs)
    print(markdown_table(rows))
    print(leases_table(rows))
    print(queue_table(rows))
    if plot_to is not None:
        plot(rows, plot_to)
        print(f"wrote {plot_to}")


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.simulate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("validate", help="N = 4, 8 against the fan-out benchmark's measurements")
    v.add_argument("--seeds", type=int, default=5)
    r = sub.add_parser("run", help="the cluster runs")
    r.add_argument("--nodes", default="100,1000,10000")
    r.add_argument("--profiles", default=",".join(PROFILES))
    r.add_argument("--policies", default=",".join(POLICIES))
    r.add_argument("--seeds", type=int, default=5)
    r.add_argument("--first-seed", type=int, default=1, help="seeds run from this one (1)")
    r.add_argument("--holder-failures", type=int, default=1,
                   help="of the failing nodes, how many die holding a lease, mid-fetch (1)")
    r.add_argument("--lease-ttl-s", type=float, default=Params(nodes=2).lease_ttl_s,
                   help="the tracker's lease_ttl_s (its default)")
    r.add_argument("--lease-silence-s", type=float, default=Params(nodes=2).lease_silence_s,
                   help="the tracker's lease_silence_s (its default; 0: off)")
    r.add_argument("--lease-grant-ack-s", type=float,
                   default=Params(nodes=2).lease_grant_ack_s,
                   help="the tracker's lease_grant_ack_s (its default; 0: off)")
    r.add_argument("--tracker-replicas", type=int, default=Params(nodes=2).tracker_replicas,
                   help="tracker replicas, each a FIFO server (3; 0: every request "
                   "answered at once, the model before)")
    r.add_argument("--announces", choices=ANNOUNCE_PATHS, default=Params(nodes=2).announces,
                   help="direct: an mTLS handshake per announce (2.4 ms at the serving "
                   "replica, 3.3 ms at a front + 0.7 ms forwarded); relayed: batched "
                   "over the node's kept-alive control connection (0.2 ms); entered: "
                   "relayed, and control calls stand for joins and completions")
    r.add_argument("--control-fronts", type=int, default=0,
                   help="front workers per replica, each a core, that take the nodes' "
                   "control calls and hand the serving replica only decisions (a "
                   "design not built; 0: the serving replica answers them, as built)")
    r.add_argument("--confirms", choices=CONFIRM_PATHS, default=Params(nodes=2).confirms,
                   help="seed confirmations: a call each, or riding the node's next lease "
                   "request (tracker/confirm_rides.py)")
    r.add_argument("--stall-report-s", type=float, default=Params(nodes=2).stall_report_s,
                   help="a download alone this long reports the peers it could not reach "
                   "and asks for the lease again, or with none announces again for "
                   "others (the node's peer_stall_report_s, 10; 0: neither)")
    r.add_argument("--fetches-per-image", type=int,
                   default=Params(nodes=2).fetches_per_image,
                   help="the tracker's upstream_fetches_per_image (its default; 0: no limit)")
    r.add_argument("--client-downloads", type=int,
                   default=Params(nodes=2).client_downloads,
                   help="layers a node's client fetches at once, in order (3, kubelet's "
                   "containerd; 0: every layer at once, as `ctr images pull`)")
    r.add_argument("--connections-limit", type=int,
                   default=Params(nodes=2).connections_limit,
                   help="peer connections per node, all layers (the node's libtorrent "
                   "connections_limit, 400); a full node dials nobody and makes room "
                   "only for a less crowded layer")
    for p in (v, r):
        p.add_argument("--jobs", type=int, default=1, help="simulations at once (1)")
        p.add_argument("--out", type=Path, default=RESULTS)
    rep = sub.add_parser("report", help="tables (and a plot) of runs' JSON files, together")
    rep.add_argument("json", type=Path, nargs="+")
    rep.add_argument("--plot", type=Path)
    a = ap.parse_args(argv)
    if a.cmd == "validate":
        validate(a.seeds, a.jobs, a.out)
    elif a.cmd == "run":
        bad = [x for x in a.profiles.split(",") if x not in PROFILES]
        bad += [x for x in a.policies.split(",") if x not in POLICIES]
        if bad:
            ap.error(f"unknown profile or policy: {', '.join(bad)}")
        matrix(a)
    else:
        report(a.json, a.plot)


if __name__ == "__main__":
    main()
