"""bench.serve's measurements: alternating rounds node vs nginx, RSS, pinning, a profile.

Owns one case (1 or N streams): an untimed warm run per server, then rounds
that alternate nginx and the node (the order flips each round), each started
once the machine is nearly idle (bench.machine's one busy formula) and
recorded with how busy it was; the node's peak RSS over its rounds (VmHWM
reset through clear_refs, plus VmRSS sampled every 10 ms); pinning servers and
client to CPUs; and py-spy's stacks of the node. It must not start the servers.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from bench.machine import status_kib, wait_quiet
from bench.serve.client import timed_get
from harness.procs import Process, child_pids, wait_until

# A run starts once the machine is at most this busy, or after this long anyway.
QUIET_BUSY = 0.10
QUIET_MAX_WAIT_S = 60.0
PROFILE_GETS = 16

console = Console()


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
        self.peak_sampled_kib = status_kib(self.pid, "VmRSS")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            with contextlib.suppress(OSError):
                rss = status_kib(self.pid, "VmRSS")
                self.peak_sampled_kib = max(self.peak_sampled_kib, rss)

    @property
    def peak_kib(self) -> int:
        hwm = status_kib(self.pid, "VmHWM") if self.hwm_reset else 0
        return max(hwm, self.peak_sampled_kib)


def pin(pid: int, cpus: set[int]) -> None:
    """Pin every thread of `pid` and of its children to `cpus`."""
    for p in [pid, *child_pids(pid)]:
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{p}/task"):
                os.sched_setaffinity(int(tid), cpus)


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
            busy = wait_quiet(QUIET_BUSY, QUIET_MAX_WAIT_S)
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
