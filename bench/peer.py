"""Peer-to-peer blob throughput of the node's libtorrent session, next to nginx, same run.

What it measures: how fast one blob moves between libtorrent sessions configured
exactly as a node configures its own (`p2preg.node.swarm.session_settings`), through
the cluster's own torrent format (`tracker.metainfo.make_metainfo`) and a real
tracker process, compared with nginx serving the same bytes from the same disk.

How: a random blob (200 MiB by default) is written to a work directory, its
metainfo made and published to a real tracker (`tests.fixtures.tracker`) before
any announce. One seeder process seeds the blob (seed mode, as `Swarm.seed`
does) for the whole run; an untimed warm-up transfer first makes it check
every piece once. Then rounds alternate (order flipped every round):

- pair: one leecher process downloads from the seeder;
- swarm: N leecher processes (4 by default) download at once, from the seeder
  and from each other; each keeps seeding until all are done;
- nginx: `sendfile on`, one worker, serving the same file; `curl -o /dev/null`
  with 1 client and with N concurrent clients.

Every peer is a separate process on 127.0.0.1, announcing to the tracker's HTTP
announce URL. A leecher is started and listening before its round; its time is
from `add_torrent` to the torrent finished *and* its disk writes flushed
(`cache_flushed_alert`), tracker announce and peer connect included. A swarm
round's aggregate is N * size over first `add_torrent` to last flush. A curl
time is curl's own `time_total`; N clients give N * size over the slowest one.
MB/s is 10⁶ bytes per second. Before each measurement the run waits (bounded)
for the shared machine to be nearly idle, and records how busy it was. Seeder
and leecher CPU time over each round is reported, to tell CPU-bound from
waiting.

Flags for experiments (not what a node does): `--set NAME=VALUE` overrides a
session setting in every peer, `--disk-io` picks libtorrent's disk backend,
`--piece-kib` forces a piece size (the tracker is then started with the same
rule), `--hybrid` uses v1+v2 metainfo.

Prints a table and writes bench/results/peer.json. Every process it starts is
ended by its pid when it finishes, fails or is interrupted.

    .venv/bin/python -m bench.peer [--size-mib 200] [--runs 5] [--leechers 4]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import resource
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import libtorrent as lt
import trio
from rich.console import Console
from rich.table import Table

import p2preg.core.metainfo as metainfo_rules
from bench import nginx
from p2preg.core.digest import Digest
from p2preg.core.metainfo import Metainfo, info_name
from p2preg.node.swarm import session_settings
from tests.fixtures.procs import Process, clean_env, free_port, wait_for_http, wait_for_port
from tests.fixtures.tracker import open_tracker
from tracker.client import TrackerClient
from tracker.metainfo import make_metainfo

MiB = 1 << 20
KiB = 1 << 10
MB = 1e6
TOKEN = "bench-peer-token"
REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "bench" / "results" / "peer.json"
# What is measured; nginx*file are curl writing the blob to a file, as a node must.
# Each case: its name and whether it has one client (else N).
CASES = {
    "pair": ("swarm 1→1", True),
    "nginx1": ("nginx 1 client", True),
    "nginx1file": ("nginx 1 client → file", True),
    "swarm": ("swarm 1→{n}", False),
    "nginxN": ("nginx {n} clients", False),
    "nginxNfile": ("nginx {n} clients → file", False),
}
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
# A measurement starts once the machine is at most this busy, or after this long anyway.
QUIET_BUSY = 0.15
QUIET_MAX_WAIT_S = 30.0
# Freed guest memory is handed back to the host within about 2 s (see Memory).
COLD_SETTLE_S = 4.0

console = Console()


# --- the peer worker (its own process) ------------------------------------------


def parse_overrides(pairs: Sequence[str]) -> dict[str, int | bool | str]:
    """`NAME=VALUE` strings to session settings; unknown names are an error."""
    known = lt.default_settings()
    out: dict[str, int | bool | str] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or name not in known:
            raise SystemExit(f"bench/peer.py: unknown libtorrent setting {pair!r}")
        default = known[name]  # type: ignore[literal-required]
        if isinstance(default, bool):
            out[name] = text.lower() in ("1", "true", "yes", "on")
        elif isinstance(default, int):
            out[name] = int(text, 0)
        else:
            out[name] = text
    return out


def peer_settings(overrides: dict[str, int | bool | str]) -> dict[str, Any]:
    """The node's settings (`session_settings`) on loopback, plus experiment overrides."""
    settings: dict[str, Any] = dict(session_settings("127.0.0.1:0"))
    settings.update(overrides)
    return settings


def _emit(event: str, **fields: object) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _thread_cpu_s() -> dict[str, float]:
    """CPU seconds of each of this process's threads, by `name/tid`."""
    out: dict[str, float] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[f"{comm}/{task.name}"] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def _busiest_threads(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    used = {k: round(v - before.get(k, 0.0), 3) for k, v in after.items()}
    return dict(sorted(used.items(), key=lambda kv: -kv[1])[:4])


class _Stdin:
    """Lines from the orchestrator, read without blocking the alert loop for long."""

    def __init__(self) -> None:
        self._fd = sys.stdin.fileno()
        self._buf = b""
        self.closed = False

    def line(self, timeout_s: float) -> str | None:
        if b"\n" not in self._buf and not self.closed:
            ready, _, _ = select.select([self._fd], [], [], timeout_s)
            if ready:
                chunk = os.read(self._fd, 4096)
                self._buf += chunk
                self.closed = not chunk
        if b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            return line.decode().strip()
        return "quit" if self.closed else None


def _torrent_params(meta: bytes, save_path: Path, announce: str, *, seed: bool) -> Any:
    """The same add_torrent_params as `p2preg.node.swarm.Swarm._params` (+ seed mode for a seed)."""
    atp = lt.add_torrent_params()
    atp.ti = lt.torrent_info(meta)
    atp.save_path = str(save_path)
    atp.trackers = [announce]
    atp.flags &= ~(lt.torrent_flags.auto_managed | lt.torrent_flags.paused)
    atp.flags |= lt.torrent_flags.disable_dht | lt.torrent_flags.disable_lsd
    atp.flags |= lt.torrent_flags.disable_pex
    if seed:
        atp.flags |= lt.torrent_flags.seed_mode
    return atp


def _open_session(args: argparse.Namespace) -> Any:
    params = lt.session_params(cast(Any, peer_settings(parse_overrides(args.set))))
    if args.disk_io:
        params.disk_io_constructor = f"{args.disk_io}_disk_io_constructor"
    session = lt.session(params)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while session.listen_port() == 0:
        if time.monotonic() > deadline:
            raise SystemExit("peer: session did not start listening")
        time.sleep(0.01)
    return session


def _drain(session: Any, handle: Any, times: dict[str, float], counts: dict[str, int]) -> None:
    """Record the moments a leecher cares about; raise on a torrent error."""
    for alert in session.pop_alerts():
        now = time.monotonic()
        if isinstance(alert, lt.tracker_reply_alert):
            times.setdefault("tracker_reply", now)
        elif isinstance(alert, lt.torrent_finished_alert):
            if "finished" not in times:
                times["finished"] = now
                handle.flush_cache()
        elif isinstance(alert, lt.cache_flushed_alert):
            if "finished" in times:
                times.setdefault("flushed", now)
        elif isinstance(alert, lt.hash_failed_alert):
            counts["hash_failures"] += 1
        elif isinstance(alert, lt.torrent_error_alert | lt.file_error_alert):
            raise SystemExit(f"peer: {alert.message()}")


def run_peer(args: argparse.Namespace) -> int:
    """`--role seed|leech`: one libtorrent session driven by lines on stdin."""
    stdin = _Stdin()
    deadline = time.monotonic() + args.timeout_s
    session = _open_session(args)
    meta = Path(args.torrent).read_bytes()
    save = Path(args.save_path)
    times: dict[str, float] = {}
    counts = {"hash_failures": 0}
    if args.role == "seed":
        handle = session.add_torrent(_torrent_params(meta, save, args.announce, seed=True))
        while "tracker_reply" not in times:
            if time.monotonic() > deadline:
                raise SystemExit("seed: the tracker never answered")
            session.wait_for_alert(100)
            _drain(session, handle, times, counts)
        _emit("ready", port=session.listen_port())
    else:
        _emit("ready", port=session.listen_port())
        while (line := stdin.line(1.0)) != "go":
            if line == "quit" or time.monotonic() > deadline:
                return 0
        cpu0, threads0 = _cpu_s(), _thread_cpu_s()
        times["start"] = time.monotonic()
        handle = session.add_torrent(_torrent_params(meta, save, args.announce, seed=False))
        while "flushed" not in times:
            if time.monotonic() > deadline:
                raise SystemExit("leech: transfer did not finish in time")
            session.wait_for_alert(50)
            _drain(session, handle, times, counts)
        status = handle.status()
        if not status.is_seeding:
            raise SystemExit("leech: finished but not seeding")
        if args.verify:
            # What a node does next: read the whole file back and check its digest.
            h = hashlib.sha256()
            with (save / handle.torrent_file().name()).open("rb") as f:
                while chunk := f.read(MiB):
                    h.update(chunk)
            times["verified"] = time.monotonic()
            if f"sha256-{h.hexdigest()}" != handle.torrent_file().name():
                raise SystemExit("leech: the downloaded file does not match its digest")
        _emit(
            "done",
            times=times,
            cpu_s=_cpu_s() - cpu0,
            threads_cpu_s=_busiest_threads(threads0, _thread_cpu_s()),
            hash_failures=counts["hash_failures"],
            payload_down=status.total_payload_download,
        )
    # Stay in the swarm (seeding) until told to quit, as a node does.
    while (line := stdin.line(0.2)) != "quit" and time.monotonic() < deadline:
        session.pop_alerts()
        if line == "stats":
            status = handle.status()
            _emit("stats", payload_up=status.total_payload_upload, cpu_s=_cpu_s())
    status = handle.status()
    _emit("bye", payload_up=status.total_payload_upload, cpu_s=_cpu_s())
    return 0


# --- child processes -----------------------------------------------------------


class Peer:
    """A `--role seed|leech` child with JSON lines on stdout; stopped by its pid."""

    def __init__(self, name: str, argv: list[str], log: Path) -> None:
        self.name = name
        self.log = log
        with log.open("wb") as err:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                cwd=REPO_ROOT,
                env=clean_env(drop_prefixes=["P2PREG_"]),
                start_new_session=True,
            )
        self._buf = b""

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()

    def expect(self, event: str, timeout_s: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
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
                    tail = self.log.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"{self.name} exited ({self.proc.poll()}):\n{tail}")
                self._buf += chunk

    def cpu_s(self) -> float:
        return cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.send("quit")
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(STOP_TIMEOUT_S)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


@contextlib.contextmanager
def peers(
    args: argparse.Namespace, role: str, torrent: Path, save_paths: list[Path], announce: str
) -> Iterator[list[Peer]]:
    started: list[Peer] = []
    try:
        for i, save in enumerate(save_paths):
            save.mkdir(parents=True, exist_ok=True)
            argv = [sys.executable, "-m", "bench.peer", "--role", role, "--torrent", str(torrent)]
            argv += ["--save-path", str(save), "--announce", announce]
            argv += ["--timeout-s", str(args.transfer_timeout_s * 3)]
            argv += [f"--set={s}" for s in args.set]
            if args.disk_io:
                argv += ["--disk-io", args.disk_io]
            if args.verify:
                argv.append("--verify")
            started.append(Peer(f"{role}-{i}", argv, save.parent / f"{save.name}.log"))
        yield started
    finally:
        for p in started:
            p.stop()


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_times() -> tuple[int, int]:
    """(all, not busy) jiffies of the machine; idle, iowait and steal are not busy."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields[:8]), fields[3] + fields[4] + fields[7]


def cpu_busy(interval_s: float = 0.5) -> float:
    total0, idle0 = _cpu_times()
    time.sleep(interval_s)
    total1, idle1 = _cpu_times()
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def machine_busy_s() -> float:
    """CPU seconds spent busy so far, all CPUs of the machine together."""
    total, idle = _cpu_times()
    return (total - idle) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def child_pids(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def wait_quiet() -> float:
    """Wait (bounded) until the shared machine is nearly idle; return how busy it was."""
    deadline = time.monotonic() + QUIET_MAX_WAIT_S
    # Two quiet half-seconds in a row: the other work here comes in bursts.
    busy, last = cpu_busy(), 1.0
    while max(busy, last) > QUIET_BUSY and time.monotonic() < deadline:
        busy, last = cpu_busy(), busy
    return busy


# --- measurements --------------------------------------------------------------


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
    announce: str,
    seeder: Peer,
    size: int,
    n: int,
    tag: str,
    memory: Memory,
) -> Sample:
    saves = [workdir / f"leech-{tag}-{i}" for i in range(n)]
    try:
        with peers(args, "leech", torrent, saves, announce) as leechers:
            for p in leechers:
                p.expect("ready", READY_TIMEOUT_S)
            busy = wait_quiet()
            memory.before_timing(n * size)
            seed_cpu0, busy0, t0 = seeder.cpu_s(), machine_busy_s(), time.monotonic()
            for p in leechers:
                p.send("go")
            done = [p.expect("done", args.transfer_timeout_s) for p in leechers]
            seed_cpu, busy_s = seeder.cpu_s() - seed_cpu0, machine_busy_s() - busy0
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
        "seeder_cpu_pct": round(100 * seed_cpu / wall, 1),
        "leecher_cpu_pct": [round(100 * d["cpu_s"] / wall, 1) for d in done],
        "leecher_busiest_threads_pct": [
            {k: round(100 * v / wall) for k, v in d["threads_cpu_s"].items()} for d in done
        ],
        "hash_failures": sum(d["hash_failures"] for d in done),
        "leecher_upload_mb": [round(b["payload_up"] / MB, 1) for b in byes],
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
    busy = wait_quiet()
    rates: list[float] = []
    others: list[float] = []
    for g in range(gets):
        outs = [store / f"fetch-{g}-{i}" if store else Path("/dev/null") for i in range(n)]
        if store:
            memory.before_timing(n * size)
        procs = []
        workers = child_pids(nginx)
        own0 = children_cpu_s() + sum(cpu_seconds(w) for w in workers)
        busy0, t0 = machine_busy_s(), time.monotonic()
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
        own = children_cpu_s() + sum(cpu_seconds(w) for w in workers) - own0
        others.append((machine_busy_s() - busy0 - own) / window)
        if store:
            for out in outs:
                out.unlink()
            memory.freed()
        rates.append(n * size / max(times) / MB)
    rate = statistics.median(rates)
    detail = {"fetches_mb_per_s": [round(r, 1) for r in rates]}
    return Sample(rate, n * size / rate / MB, busy, round(max(others), 2), detail)


# --- setup ---------------------------------------------------------------------


def make_blob(path: Path, size: int) -> Digest:
    h = hashlib.sha256()
    with path.open("wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 4 * MiB))
            f.write(chunk)
            h.update(chunk)
            left -= len(chunk)
    return Digest("sha256", h.hexdigest())


@contextlib.contextmanager
def piece_rule(piece_bytes: int | None) -> Iterator[None]:
    """Force one piece size in this process's metainfo rules (`--piece-kib` only)."""
    if piece_bytes is None:
        yield
        return
    saved = metainfo_rules.MIN_PIECE_BYTES, metainfo_rules.MAX_PIECE_BYTES
    metainfo_rules.MIN_PIECE_BYTES = metainfo_rules.MAX_PIECE_BYTES = piece_bytes
    try:
        yield
    finally:
        metainfo_rules.MIN_PIECE_BYTES, metainfo_rules.MAX_PIECE_BYTES = saved


@contextlib.contextmanager
def tracker(workdir: Path, piece_bytes: int | None) -> Iterator[str]:
    """A real tracker process; with a forced piece size, one that checks that rule instead."""
    args = ["--log-level", "WARNING"]
    if piece_bytes is None:
        with open_tracker(workdir, token=TOKEN, args=args) as t:
            yield t.url
        return
    port = free_port()
    patch = (
        "import sys, p2preg.core.metainfo as m; "
        f"m.MIN_PIECE_BYTES = m.MAX_PIECE_BYTES = {piece_bytes}; "
        "from p2preg.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    argv = [sys.executable, "-c", patch, "tracker", "--listen", f"127.0.0.1:{port}"]
    argv += ["--data-dir", str(workdir / "data"), *args]
    env = clean_env(drop_prefixes=["P2PREG_"], P2PREG_TOKEN=TOKEN)
    workdir.mkdir(parents=True, exist_ok=True)
    with Process(argv, workdir, name="tracker", env=env, cwd=REPO_ROOT) as proc:
        url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{url}/healthz", timeout_s=20.0, statuses=[200], process=proc)
        yield url


async def publish(url: str, meta: Metainfo) -> str:
    client = TrackerClient(url, node="bench-peer", token=TOKEN)
    try:
        await client.publish_metainfo(meta.digest, meta.size, meta.data)
    finally:
        await client.aclose()
    return client.announce_url


def machine() -> dict[str, Any]:
    def version(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except OSError:
            return "?"
        return (out.stdout + out.stderr).strip().splitlines()[0]

    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "libtorrent": lt.__version__,
        "nginx": version([str(nginx.NGINX_BIN), "-v"]),
        "curl": version(["curl", "--version"]),
    }


def _jsonable(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v if isinstance(v, bool | str) else int(v) for k, v in sorted(settings.items())}


# --- the run -------------------------------------------------------------------


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    size = args.size_mib * MiB
    n = args.leechers
    piece_bytes = args.piece_kib * KiB if args.piece_kib else None
    parse_overrides(args.set)  # fail before starting anything
    base = Path(args.workdir) if args.workdir else None
    tmp = Path(tempfile.mkdtemp(prefix="p2preg-bench-peer-", dir=base))
    cases = {
        key: Case(name.format(n=n), 1 if single else n) for key, (name, single) in CASES.items()
    }
    memory = Memory(args.memory, tmp / "memory-scratch")
    warmup: Sample | None = None
    try:
        blob = tmp / "blob"
        digest = make_blob(blob, size)
        seed_dir = tmp / "seed"
        seed_dir.mkdir()
        os.link(blob, seed_dir / info_name(digest))
        with piece_rule(piece_bytes):
            meta = make_metainfo(blob, digest, size, hybrid=args.hybrid)
        torrent = tmp / "blob.torrent"
        torrent.write_bytes(meta.data)
        console.print(
            f"blob {size / MiB:.0f} MiB, piece {meta.piece_size // KiB} KiB, "
            f"{'hybrid' if args.hybrid else 'v2'}, overrides {args.set or 'none'}, "
            f"disk_io {args.disk_io or 'default'}"
        )
        ngx_root = tmp / "nginx"
        ngx_root.mkdir()
        ngx_port = free_port()
        ngx_argv = nginx.configure(ngx_root, "127.0.0.1", ngx_port, blob)
        with (
            tracker(tmp / "tracker", piece_bytes) as url,
            Process(ngx_argv, ngx_root, name="nginx") as ngx,
        ):
            wait_for_port("127.0.0.1", ngx_port, process=ngx)
            ngx_url = f"http://127.0.0.1:{ngx_port}/blob"
            # The tracker refuses announces for info-hashes it has no metainfo for.
            announce = trio.run(publish, url, meta)
            with peers(args, "seed", torrent, [seed_dir], announce) as (seeder,):
                seeder.expect("ready", READY_TIMEOUT_S)
                # Seed mode checks each piece the first time it is sent: do that once.
                warmup = swarm_round(
                    args, tmp, torrent, announce, seeder, size, 1, "warmup", memory
                )
                console.print(f"  warm-up pair (seeder checks pieces): {warmup.mb_per_s:.0f} MB/s")
                for r in range(args.runs):
                    order = [key for key in CASES if key in args.cases]
                    if r % 2:
                        order.reverse()
                    for key in order:
                        clients = cases[key].clients
                        if key in ("pair", "swarm"):
                            s = swarm_round(
                                args, tmp, torrent, announce, seeder, size, clients, f"{r}", memory
                            )
                        else:
                            store = tmp / "fetched" if key.endswith("file") else None
                            if store:
                                store.mkdir(exist_ok=True)
                            s = nginx_round(
                                ngx_url, size, clients, args.nginx_gets, memory, store, ngx.pid
                            )
                        cases[key].samples.append(s)
                        cpu = (
                            f"  seeder CPU {s.detail['seeder_cpu_pct']:.0f} %, leechers "
                            f"{'/'.join(f'{c:.0f}' for c in s.detail['leecher_cpu_pct'])} %"
                            if "seeder_cpu_pct" in s.detail
                            else ""
                        )
                        console.print(
                            f"  round {r + 1}/{args.runs} {cases[key].name:16}"
                            f" {s.mb_per_s:8.0f} MB/s  (others used {s.others_cpus:.1f} CPUs){cpu}"
                        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "args": vars(args),
        "machine": machine(),
        "blob_bytes": size,
        "piece_bytes": meta.piece_size,
        "format": "hybrid" if args.hybrid else "v2",
        "memory": args.memory,
        "settings": _jsonable(peer_settings(parse_overrides(args.set))),
        "warmup": warmup.__dict__ if warmup else None,
        "cases": {k: c.summary() for k, c in cases.items() if c.samples},
        "ratios": ratios(cases),
    }


def ratios(cases: dict[str, Case]) -> dict[str, Any]:
    """swarm/nginx: of the medians, and the spread of each round's own pair."""
    out: dict[str, Any] = {}
    for swarm, ngx in (
        ("pair", "nginx1"),
        ("pair", "nginx1file"),
        ("swarm", "nginxN"),
        ("swarm", "nginxNfile"),
    ):
        a, b = cases[swarm].rates(), cases[ngx].rates()
        if not a or not b:
            continue
        per_round = [x / y for x, y in zip(a, b, strict=False)]
        out[f"{swarm}/{ngx}"] = {
            "of_medians": statistics.median(a) / statistics.median(b),
            "per_round_min": min(per_round),
            "per_round_max": max(per_round),
        }
    return out


def report(result: dict[str, Any], out: Path) -> None:
    n = result["args"]["leechers"]
    table = Table(
        title=f"Blob of {result['blob_bytes'] / MiB:.0f} MiB over loopback, MB/s (10⁶ B/s);"
        f" piece {result['piece_bytes'] // KiB} KiB, {result['format']},"
        f" {result['memory']} memory"
    )
    for col in ("case", "median", "min", "max", "rounds", "others' CPUs (max)"):
        table.add_column(col, justify="left" if col == "case" else "right")
    for case in result["cases"].values():
        rate = case["mb_per_s"]
        table.add_row(
            case["name"] + (" (aggregate)" if case["clients"] > 1 else ""),
            f"{rate['median']:,.0f}",
            f"{rate['min']:,.0f}",
            f"{rate['max']:,.0f}",
            str(len(case["samples"])),
            f"{max(x['others_cpus'] for x in case['samples']):.1f}",
        )
    console.print(table)
    ratios = Table(title="swarm / nginx")
    for col in ("comparison", "of medians", "per round (min .. max)"):
        ratios.add_column(col, justify="left" if col == "comparison" else "right")
    for key, r in result["ratios"].items():
        swarm, ngx = key.split("/")
        ratios.add_row(
            f"{result['cases'][swarm]['name']} / {result['cases'][ngx]['name']}",
            f"{r['of_medians']:.3f}",
            f"{r['per_round_min']:.3f} .. {r['per_round_max']:.3f}",
        )
    console.print(ratios)
    for key in ("pair", "swarm"):
        case = result["cases"].get(key)
        if case is None:
            continue
        details = [s["detail"] for s in case["samples"]]
        uploaded = statistics.median(sum(d["leecher_upload_mb"]) for d in details)
        console.print(
            f"{case['name']}: tracker reply after "
            f"{statistics.median(min(d['tracker_reply_s']) for d in details) * 1000:.0f} ms,"
            f" seeder CPU {statistics.median(d['seeder_cpu_pct'] for d in details):.0f} %,"
            f" leecher CPU {statistics.median(max(d['leecher_cpu_pct']) for d in details):.0f} %"
            + (f", leechers uploaded {uploaded:.0f} MB" if key == "swarm" else "")
            + f" (of {n if key == 'swarm' else 1} x {result['blob_bytes'] / MB:.0f} MB)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    console.print(f"wrote {out}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--role", choices=["bench", "seed", "leech"], default="bench")
    parser.add_argument("--size-mib", type=int, default=200)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--leechers", type=int, default=4)
    parser.add_argument("--nginx-gets", type=int, default=3, help="fetches per nginx round")
    parser.add_argument("--cases", default=",".join(CASES), type=lambda s: s.split(","))
    parser.add_argument(
        "--memory",
        choices=["cold", "warm"],
        default="cold",
        help="guest memory state before a timed write (see Memory; warm is an experiment)",
    )
    parser.add_argument("--transfer-timeout-s", type=float, default=120.0)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--disk-io", choices=["default", "mmap", "posix", "pread"])
    parser.add_argument("--piece-kib", type=int, help="force this piece size (experiment)")
    parser.add_argument("--hybrid", action="store_true", help="v1+v2 metainfo (experiment)")
    parser.add_argument(
        "--verify", action="store_true", help="leechers also read back and hash the file"
    )
    parser.add_argument("--workdir", help="parent of the temporary work directory")
    parser.add_argument("--out", type=Path, default=RESULTS)
    # Worker-only arguments.
    parser.add_argument("--torrent", help=argparse.SUPPRESS)
    parser.add_argument("--save-path", help=argparse.SUPPRESS)
    parser.add_argument("--announce", help=argparse.SUPPRESS)
    parser.add_argument("--timeout-s", type=float, default=600.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role != "bench":
        return run_peer(args)
    report(run_bench(args), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
