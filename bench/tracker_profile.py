"""Where the tracker's CPU goes under relayed announces (or lease requests): py-spy, as text.

Starts one tracker (mutual TLS, or plain HTTP with `--plain`) pinned to core 0,
publishes and confirms the cluster of bench/tracker_mtls.py, walks every member
once, then drives relayed announces (`POST /v1/announces`, `--batch` of one
node's announces per request, on kept-alive connections: tracker_mtls's
relayed rows) from core 1 while `py-spy record` samples the tracker for the
whole measured span. Prints the tracker's CPU per announce over that span
(the sampler's pauses included: compare it with itself, the bench/tracker.py
rows are the figures) and the profile's top entries: by function's own time,
by inclusive time, and own time per source file. The raw stacks go to
bench/results/ for a flame graph. Not a test: no assertions on speed. Usage:

    .venv/bin/python -m bench.tracker_profile [--batch 1] [--seconds 15] [--plain] [--leases]

`--leases` drives lease requests for seeded blobs instead (SEEDED answers, one
per request on the same kept-alive connections: bench/tracker_mtls.py's lease rows).
py-spy is the venv's (`.venv/bin` on PATH).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench.tracker_load import Cluster, make_torrents
from bench.tracker_mtls import Job, _node_pool, prepare, run_load
from harness.tlscerts import ClusterCA
from harness.tracker import open_tracker

TRACKER_CORE, LOAD_CORE = "0", 1
RESULTS = Path(__file__).parent / "results"
SAMPLE_RATE_HZ = 250
# A frame of py-spy's raw format: `function (file:line)`.
_FRAME = re.compile(r"^(?P<fn>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


@dataclasses.dataclass(frozen=True)
class Profile:
    samples: int
    own: Counter[str]  # function (file) -> samples where it was running
    inclusive: Counter[str]  # function (file) -> samples where it was on the stack
    files: Counter[str]  # file -> own samples


def read_raw(text: str) -> Profile:
    """py-spy's raw output (`frame;frame;… count` a line) summed by function and file."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    files: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = []
        for frame in stack.split(";"):
            m = _FRAME.match(frame)
            if m is not None:
                frames.append((f"{m['fn']} ({m['file']})", m["file"]))
        if not frames:
            continue
        own[frames[-1][0]] += n
        files[frames[-1][1]] += n
        for name in {name for name, _ in frames}:
            inclusive[name] += n
    return Profile(total, own, inclusive, files)


def render(profile: Profile, top: int) -> str:
    out = [f"{profile.samples} samples"]
    for title, counter in (
        ("own time, by function", profile.own),
        ("inclusive time, by function", profile.inclusive),
        ("own time, by file", profile.files),
    ):
        out.append(f"\n{title}:")
        for name, n in counter.most_common(top):
            out.append(f"  {100 * n / max(1, profile.samples):5.1f} %  {name}")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1, help="announces per relayed request")
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--tls-swarms", type=int, default=20)
    parser.add_argument("--tls-nodes", type=int, default=100)
    parser.add_argument("--plain", action="store_true", help="plain HTTP, no mutual TLS")
    parser.add_argument("--leases", action="store_true",
                        help="lease requests for seeded blobs (SEEDED answers) in place of"
                        " relayed announces, one per request (`--batch` is ignored)")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    cluster = Cluster(nodes=args.tls_nodes, swarms=args.tls_swarms)
    RESULTS.mkdir(exist_ok=True)
    raw = RESULTS / f"tracker-profile-{time.strftime('%Y%m%d-%H%M%S')}.txt"
    with tempfile.TemporaryDirectory(prefix="p2preg-bench-profile-") as tmp:
        workdir = Path(tmp)
        ca = ClusterCA.make("bench")
        tls_dir = None
        if not args.plain:
            tls_dir = ca.tls_dir(workdir / "pki" / "tracker", "tracker", "t", ips=["127.0.0.1"])
        publisher = ca.tls_dir(workdir / "pki" / "bench", "node", "bench")
        pool = None if args.plain else _node_pool(ca, workdir / "pki" / "nodes", cluster)
        metas = make_torrents(workdir, cluster.swarms, root=None if args.plain else ca.cert_pem)
        tracker_args = ["--log-level", "WARNING", "--no-udp"]
        with open_tracker(
            workdir / "tracker", tls_dir=tls_dir, args=tracker_args, cpus=TRACKER_CORE
        ) as t:
            port = int(t.url.rsplit(":", 1)[1])
            hashes = [m.swarm_keys[0] for m in metas]
            job = Job(port, hashes, cluster, pool, LOAD_CORE, args.seconds, True)
            prepare(t, job, metas, publisher)
            spy: list[subprocess.Popen[bytes]] = []

            def start_spy() -> None:
                argv = ["py-spy", "record", "--pid", str(t.process.pid), "--rate",
                        str(SAMPLE_RATE_HZ), "--duration", str(args.seconds), "--format",
                        "raw", "--function", "--output", str(raw)]  # fmt: skip
                spy.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL))

            relayed = dataclasses.replace(job, warmup=False, batch=args.batch)
            if args.leases:
                relayed = dataclasses.replace(relayed, batch=1,
                                              leases=tuple(str(m.digest) for m in metas))
            load = run_load(relayed, t.process.pid, t.metrics_url or t.url, on_go=start_spy)
            spy[0].wait(timeout=args.seconds + 60)
    us = load.tracker_cpu_pct / 100 * load.seconds / max(1, load.answered) * 1e6
    mode = "plain HTTP" if args.plain else "mutual TLS"
    what = "lease requests" if args.leases else f"relayed batches of {args.batch}"
    print(f"{what} over {mode}: {load.answered / load.seconds:,.0f}"
          f" answered/s, {load.errors} errors, tracker CPU {load.tracker_cpu_pct:.0f} %,"
          f" {us:.0f} µs per answer (sampled at {SAMPLE_RATE_HZ} Hz)")  # fmt: skip
    print(render(read_raw(raw.read_text()), args.top))
    print(f"raw stacks: {raw}")


if __name__ == "__main__":
    main()
