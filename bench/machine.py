"""What every benchmark reads about the machine: how busy it is, and what a process used.

Owns the one machine-busy formula (from the first line of /proc/stat, the
same for fanout, peer and serve), waiting until a shared machine is nearly
idle, a process's CPU seconds and peak RSS from /proc, the version line of a
tool, and the `--tls` switch every benchmark takes. Busy is
the share of all CPUs' time spent running anything (user, nice, system, irq,
softirq; guest time is already inside user and nice); idle, iowait and steal
are not busy: steal is time the hypervisor gave our CPUs to someone else, and
counting it would make "machine CPU seconds" larger than the work done here.
It starts no process and must not judge the numbers it reads.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "TLS_MODES",
    "BusyMeter",
    "ProcStat",
    "add_tls_flag",
    "busy_over",
    "busy_seconds",
    "cpu_seconds",
    "proc_stat",
    "status_kib",
    "version_of",
    "wait_quiet",
]

_USER_HZ = os.sysconf("SC_CLK_TCK")


def _jiffies() -> tuple[int, int]:
    """(all, busy) jiffies of all CPUs since boot; see the module's formula."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields[:8]
    total = user + nice + system + idle + iowait + irq + softirq + steal
    return total, user + nice + system + irq + softirq


class BusyMeter:
    """The busy share of all CPUs between two reads (the first from construction)."""

    def __init__(self) -> None:
        self._last = _jiffies()

    def busy(self) -> float:
        now = _jiffies()
        total, busy = now[0] - self._last[0], now[1] - self._last[1]
        self._last = now
        return busy / total if total > 0 else 0.0


def busy_over(interval_s: float = 0.5) -> float:
    """The busy share of all CPUs over the next `interval_s`."""
    meter = BusyMeter()
    time.sleep(interval_s)
    return meter.busy()


def busy_seconds() -> float:
    """CPU seconds spent busy since boot, all CPUs of the machine together."""
    return _jiffies()[1] / _USER_HZ


def wait_quiet(threshold: float, max_wait_s: float, *, quiet_reads: int = 1) -> float:
    """Wait (bounded) until the shared machine is at most `threshold` busy; return the last read.

    Other test suites or benchmarks may share the machine: a run taken while
    they burn a core measures them. `quiet_reads` half-second reads in a row
    must be quiet (work that comes in bursts needs two).
    """
    deadline = time.monotonic() + max_wait_s
    reads: list[float] = []
    while True:
        reads.append(busy_over())
        recent = reads[-quiet_reads:]
        quiet = len(recent) == quiet_reads and max(recent) <= threshold
        if quiet or time.monotonic() >= deadline:
            return reads[-1]


@dataclass(frozen=True)
class ProcStat:
    cpu_s: float
    peak_rss_mib: float


def _cpu_s(pid: int) -> float:
    """utime + stime of /proc/PID/stat, in seconds (OSError once the process is gone)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _USER_HZ


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of a live process; 0 once it is gone."""
    try:
        return _cpu_s(pid)
    except OSError:
        return 0.0


def status_kib(pid: int, key: str) -> int:
    """One kB figure of /proc/PID/status (`VmRSS`, `VmHWM`); KeyError if it has none."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def proc_stat(pid: int) -> ProcStat:
    """CPU seconds (user + system) and peak RSS (VmHWM) of a live process; NaN once gone."""
    try:
        cpu = _cpu_s(pid)
        hwm_kib = status_kib(pid, "VmHWM")
    except (OSError, KeyError):
        return ProcStat(float("nan"), float("nan"))
    return ProcStat(cpu, hwm_kib / 1024)


def version_of(argv: list[str]) -> str:
    """The first line a tool prints about its version, or "?"."""
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    out = (r.stdout + r.stderr).strip()
    return out.splitlines()[0] if out else "?"


TLS_MODES = ("off",)
"""What `--tls` accepts where a benchmark has no TLS runs yet; each run records its value."""


def add_tls_flag(parser: argparse.ArgumentParser, modes: tuple[str, ...] = TLS_MODES) -> None:
    """`--tls` from `modes` (default off); a benchmark with TLS runs passes its own."""
    helps = {
        "off": "plain text",
        "on": "mutual TLS, with a cluster CA made for the run",
        "both": "plain and TLS runs side by side, interleaved",
    }
    parser.add_argument(
        "--tls",
        choices=modes,
        default="off",
        help="TLS between the pieces under test: "
        + "; ".join(f"{m}: {helps.get(m, m)}" for m in modes)
        + " (off; recorded in the JSON)",
    )
