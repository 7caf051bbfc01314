"""What each control-plane attack costs the honest nodes: reruns the adversary tests, tabulates.

Each `tests/test_adversary_*.py` runs its attack against a real TLS cluster
(tracker, nodes, docker-registry, an adversary holding a valid certificate) and
runs the same honest pulls of a twin layer of the same size without it, in the
same run; it writes both to `bench/results/reliability-adversary-*.json`. This
script runs those tests (unless `--no-run`) and prints the side-by-side table
that docs/RELIABILITY.md and docs/SECURITY.md quote: pull time without and with
the attack, upstream copies, and how long until peers served the digest again.
The tests assert; this only gathers.

    python -m bench.adversary [--no-run] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TESTS = sorted((ROOT / "tests").glob("test_adversary_*.py"))
# The issue's target: an attack at most doubles the honest pulls' time.
TARGET_RATIO = 2.0


def run_tests(repeats: int) -> list[dict[str, Any]]:
    """Run every adversary test `repeats` times; the attacks each run recorded."""
    rows: list[dict[str, Any]] = []
    for n in range(repeats):
        started = time.time()
        argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                *(str(t) for t in TESTS)]  # fmt: skip
        done = subprocess.run(argv, cwd=ROOT, timeout=1800, check=False)
        if done.returncode != 0:
            raise SystemExit(f"adversary tests failed (exit {done.returncode}): numbers not taken")
        rows += [dict(row, run=n + 1) for row in read_results(since=started)]
    return rows


def read_results(since: float = 0.0) -> list[dict[str, Any]]:
    """The attacks recorded in result files written at or after `since`."""
    rows = []
    for path in sorted(RESULTS.glob("reliability-adversary-*.json")):
        if path.stat().st_mtime < since:
            continue
        doc = json.loads(path.read_text())
        for attack in doc.get("attacks", []):
            rows.append(dict(attack, commit=doc["commit"], finished_at=doc["finished_at"],
                             command=doc["command"]))  # fmt: skip
    return rows


def _seconds(value: float | None) -> str:
    return "never stopped" if value is None else f"{value:.2f} s"


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| attack | honest pulls without / with | ratio | upstream copies without / with "
        "| until P2P serves again | run | conditions |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        without, with_ = r["pull_s_without"], r["pull_s_with"]
        ratio = with_ / without if without > 0 else float("inf")
        flag = "" if ratio <= TARGET_RATIO else " ⚠"
        lines.append(
            f"| {r['attack']} | {without:.2f} s / {with_:.2f} s | {ratio:.2f}x{flag} "
            f"| {r['upstream_copies_without']} / {r['upstream_copies_with']} "
            f"| {_seconds(r['p2p_again_s'])} | {r.get('run', 1)} | {r['note']} |"
        )
    commits = sorted({r["commit"] for r in rows})
    when = sorted(r["finished_at"] for r in rows)
    lines.append("")
    lines.append(f"Commit {', '.join(commits)}; runs finished {when[0]} to {when[-1]}. "
                 f"⚠: over the target of {TARGET_RATIO:.0f}x the time without the attack.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.adversary", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-run", action="store_true",
                        help="tabulate the last results in bench/results without running")
    parser.add_argument("--repeats", type=int, default=1, help="runs of the tests (default 1)")
    args = parser.parse_args(argv)
    if not 1 <= args.repeats <= 10:
        parser.error("--repeats must be 1..10")
    rows = read_results() if args.no_run else run_tests(args.repeats)
    if not rows:
        raise SystemExit("no adversary results in bench/results: run without --no-run first")
    print(table(rows))


if __name__ == "__main__":
    main()
