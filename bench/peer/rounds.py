"""The rounds bench.peer times: a swarm of peer processes, and curl against nginx.

Owns the peer children (`python -m bench.peer --role seed|leech`, started and
stopped by pid through harness.procs, talking JSON lines), one swarm round (N
leechers at once from the seeder and each other, timed from the first
`add_torrent` to the last flush), one nginx round (N concurrent curl clients,
the median of a few fetches), the guest-memory state kept alike before each
timed write, and the samples and cases they produce, with the CPUs others
used meanwhile (bench.machine's one busy formula). It must not start the
tracker or nginx (the orchestrator does) nor read libtorrent itself.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import select
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.machine import busy_seconds, cpu_seconds, wait_quiet
from bench.peer.worker import READY_TIMEOUT_S
from harness.netns import Host
from harness.procs import Process, WaitTimeout, child_pids, clean_env, wait_until

MiB = 1 << 20
MB = 1e6
REPO_ROOT = Path(__file__).resolve().parents[2]
STOP_TIMEOUT_S = 10.0
# A measurement starts once the machine is at most this busy, or after this long anyway.
QUIET_BUSY = 0.15
QUIET_MAX_WAIT_S = 30.0
# Freed guest memory is handed back to the host within about 2 s (see Memory).
COLD_SETTLE_S = 4.0


def _wait_quiet() -> float:
    # Two quiet half-seconds in a row: the other work here comes in bursts.
    return wait_quiet(QUIET_BUSY, QUIET_MAX_WAIT_S, quiet_reads=2)


def _children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class Peer:
    """A `--role seed|leech` child with JSON lines on stdout; stopped by its pid."""

    def __init__(self, name: str, argv: list[str], log_dir: Path) -> None:
        self.name = name
        self.process = Process(
            argv,
            log_dir,
            name=name,
            env=clean_env(drop_prefixes=["P2PREG_"]),
            cwd=REPO_ROOT,
            term_grace_s=STOP_TIMEOUT_S,
            pipe_stdio=True,
        ).start()
        self._buf = b""

    def send(self, line: str) -> None:
        with contextlib.suppress(BrokenPipeError):
            self.process.stdin.write(line.encode() + b"\n")
            self.process.stdin.flush()

    def expect(self, event: str, timeout_s: float) -> dict[str, Any]:
        fd = self.process.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        while True:
            while b"\n" in self._buf:
                raw, self._buf = self._buf.split(b"\n", 1)
                msg: dict[str, Any] = json.loads(raw)
                if msg.get("event") == event:
                    return msg
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"{self.name}: no {event!r} within {timeout_s:.0f} s")
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    tail = self.process.log_tail(lines=30)
                    raise RuntimeError(f"{self.name} exited ({self.process.returncode}):\n{tail}")
                self._buf += chunk

    def cpu_s(self) -> float:
        return cpu_seconds(self.process.pid)

    def stop(self) -> None:
        """Ask it to quit (it reports `bye`), then stop it by pid if it does not."""
        if self.process.returncode is None:
            self.send("quit")
            with contextlib.suppress(WaitTimeout):
                wait_until(
                    lambda: self.process.returncode is not None,
                    timeout_s=STOP_TIMEOUT_S,
                    what=f"{self.name} to quit",
                )
        self.process.stop()


@contextlib.contextmanager
def peers(
    args: argparse.Namespace,
    role: str,
    torrent: Path,
    save_paths: list[Path],
    announces: Sequence[str],
    extra: Sequence[str] = (),
    hosts: Sequence[Host] | None = None,
) -> Iterator[list[Peer]]:
    """Peer processes, each announcing to its own URL (a node's, bench.peer.cluster's);
    `extra` worker flags (`--tls-dir`) for a TLS pair; with `hosts`, each runs on its
    own lab host (harness.netns) and listens on that host's address."""
    if hosts is not None and len(hosts) != len(save_paths):
        raise ValueError(f"{len(save_paths)} peers but {len(hosts)} hosts")
    started: list[Peer] = []
    try:
        for i, (save, announce) in enumerate(zip(save_paths, announces, strict=True)):
            save.mkdir(parents=True, exist_ok=True)
            argv = [sys.executable, "-m", "bench.peer", "--role", role, "--torrent", str(torrent)]
            argv += ["--save-path", str(save), "--announce", announce]
            argv += ["--timeout-s", str(args.transfer_timeout_s * 3)]
            argv += [f"--set={s}" for s in args.set]
            if args.disk_io:
                argv += ["--disk-io", args.disk_io]
            if args.verify:
                argv.append("--verify")
            if args.no_slow_peers:
                argv.append("--no-slow-peers")
            if args.nagle:
                argv.append("--nagle")
            if getattr(args, "super_seed", False) and role == "seed":
                argv.append("--super-seed")
            argv += list(extra)
            if getattr(args, "peer_log", None) and role == "leech" and i == 0:
                argv += ["--peer-log", str(args.peer_log)]
            if hosts is not None:
                argv = hosts[i].argv([*argv, "--peer-host", hosts[i].addr])
            started.append(Peer(f"{role}-{i}", argv, save.parent))
        yield started
    finally:
        for p in started:
            p.stop()


class Memory:
    """Whether a timed write lands in guest memory the hypervisor has taken back.

    This machine is a VM with virtio-balloon free page reporting: about 2 s after
    memory is freed the host discards it, and the next first touch of those pages
    is several times slower than a copy (`dd` of 200 MiB into a new file: 150 to 320
    MB/s "cold", 1.6 GB/s right after deleting a file as large). Every leecher,
    and curl writing to a file, writes the whole blob into new page cache, so
    rounds are kept alike: "cold" waits `COLD_SETTLE_S` after the last delete
    (what a node pays after being idle), "warm" writes and deletes as many bytes
    just before the timed transfer (libtorrent's own limit, without the VM's).
    """

    def __init__(self, mode: str, scratch: Path) -> None:
        self.mode = mode
        self._scratch = scratch
        self._last_free = time.monotonic()

    def freed(self) -> None:
        self._last_free = time.monotonic()

    def before_timing(self, nbytes: int) -> None:
        if self.mode == "cold":
            time.sleep(max(0.0, self._last_free + COLD_SETTLE_S - time.monotonic()))
            return
        zeros = bytes(4 * MiB)
        with self._scratch.open("wb") as f:
            for _ in range(-(-nbytes // len(zeros))):
                f.write(zeros)
        self._scratch.unlink()


@dataclass
class Sample:
    mb_per_s: float
    seconds: float
    busy_before: float
    # CPUs busy with other work (not this benchmark's processes) while timed.
    others_cpus: float
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Case:
    name: str
    clients: int
    samples: list[Sample] = field(default_factory=list)

    def rates(self) -> list[float]:
        return [s.mb_per_s for s in self.samples]

    def summary(self) -> dict[str, Any]:
        rates = self.rates()
        return {
            "name": self.name,
            "clients": self.clients,
            "mb_per_s": {"median": statistics.median(rates), "min": min(rates), "max": max(rates)},
            "samples": [s.__dict__ for s in self.samples],
        }


def swarm_round(
    args: argparse.Namespace,
    workdir: Path,
    torrent: Path,
    announces: Sequence[str],
    seeder: Peer,
    size: int,
    tag: str,
    memory: Memory,
    extra: Sequence[str] = (),
    midway: Callable[[], float] | None = None,
    hosts: Sequence[Host] | None = None,
) -> Sample:
    """One leecher per announce URL (one per node identity), all at once; `midway`,
    called once they were told to go, returns when (time.monotonic) what it did was done,
    and each leecher's time from then is in the detail (`after_midway_s`)."""
    n = len(announces)
    saves = [workdir / f"leech-{tag}-{i}" for i in range(n)]
    try:
        with peers(args, "leech", torrent, saves, announces, extra, hosts) as leechers:
            for p in leechers:
                p.expect("ready", READY_TIMEOUT_S)
            busy = _wait_quiet()
            memory.before_timing(n * size)
            seed_cpu0, busy0, t0 = seeder.cpu_s(), busy_seconds(), time.monotonic()
            for p in leechers:
                p.send("go")
            mid = midway() if midway is not None else None
            done = [p.expect("done", args.transfer_timeout_s) for p in leechers]
            seed_cpu, busy_s = seeder.cpu_s() - seed_cpu0, busy_seconds() - busy0
            window = time.monotonic() - t0
            for p in leechers:
                p.send("quit")
            byes = [p.expect("bye", STOP_TIMEOUT_S) for p in leechers]
    finally:
        for save in saves:
            shutil.rmtree(save, ignore_errors=True)
        memory.freed()
    starts = [d["times"]["start"] for d in done]
    ends = [d["times"]["flushed"] for d in done]
    wall = max(ends) - min(starts)

    def since_start(key: str) -> list[float]:
        return [round(d["times"][key] - d["times"]["start"], 4) for d in done if key in d["times"]]

    detail = {
        "per_leecher_s": since_start("flushed"),
        "finished_s": since_start("finished"),
        "verified_s": since_start("verified"),
        "tracker_reply_s": since_start("tracker_reply"),
        "first_byte_s": since_start("first_byte"),
        "seeder_cpu_pct": round(100 * seed_cpu / wall, 1),
        "leecher_cpu_pct": [round(100 * d["cpu_s"] / wall, 1) for d in done],
        "leecher_busiest_threads_pct": [
            {k: round(100 * v / wall) for k, v in d["threads_cpu_s"].items()} for d in done
        ],
        "after_midway_s": [round(e - mid, 4) for e in ends] if mid is not None else None,
        "hash_failures": sum(d["hash_failures"] for d in done),
        "leecher_upload_mb": [round(b["payload_up"] / MB, 1) for b in byes],
        "redundant_mb": [round(d.get("redundant", 0) / MB, 2) for d in done],
        "slow_drops": [d.get("slow_drops", []) for d in done],
        # The redundant bytes by libtorrent's reason (ses.waste_piece_*), per leecher.
        "waste": [d.get("waste", {}) for d in done],
    }
    own = seed_cpu + sum(d["cpu_s"] for d in done)
    return Sample(n * size / wall / MB, wall, busy, round((busy_s - own) / window, 2), detail)


def nginx_round(
    url: str, size: int, n: int, gets: int, memory: Memory, store: Path | None, nginx: int
) -> Sample:
    """The median of `gets` fetches, each by `n` concurrent curl clients.

    With `store`, each client writes the blob to a new file there (as a node
    must), else to /dev/null.
    """
    busy = _wait_quiet()
    rates: list[float] = []
    others: list[float] = []
    for g in range(gets):
        outs = [store / f"fetch-{g}-{i}" if store else Path("/dev/null") for i in range(n)]
        if store:
            memory.before_timing(n * size)
        procs = []
        workers = child_pids(nginx)
        own0 = _children_cpu_s() + sum(cpu_seconds(w) for w in workers)
        busy0, t0 = busy_seconds(), time.monotonic()
        for out in outs:
            argv = ["curl", "-s", "--noproxy", "*", "-o", str(out)]
            argv += ["-w", "%{http_code} %{size_download} %{time_total}", url]
            procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=clean_env()))
        times = []
        for p in procs:
            text, _ = p.communicate(timeout=120)
            code, got, total = text.split()
            if code != "200" or int(got) != size:
                raise RuntimeError(f"curl: {text}")
            times.append(float(total))
        window = time.monotonic() - t0
        own = _children_cpu_s() + sum(cpu_seconds(w) for w in workers) - own0
        others.append((busy_seconds() - busy0 - own) / window)
        if store:
            for out in outs:
                out.unlink()
            memory.freed()
        rates.append(n * size / max(times) / MB)
    rate = statistics.median(rates)
    detail = {"fetches_mb_per_s": [round(r, 1) for r in rates]}
    return Sample(rate, n * size / rate / MB, busy, round(max(others), 2), detail)
