"""Announce throughput of our tracker against Debian's opentracker, same load, same run.

Both trackers run as processes pinned to core 0 (`taskset`), the load generator
to core 1. Both whitelist the same 1,000 torrents (ours via published metainfo,
opentracker via its whitelist file) and get the same shape of load: random
torrent among the 1,000, random peer id and port, `left` > 0 so every answer
carries up to `numwant=50` peers, and —

- HTTP: `wrk` with a Lua request generator and `Connection: close`, so every
  announce is a new TCP connection (as libtorrent does);
- UDP (BEP 15): a Python generator keeping a window of announces in flight
  (one connect, then announces; the same code for both trackers).

Before measuring, a warm-up fills the swarms. Tracker CPU use over each run is
read from /proc, to tell a saturated tracker from a saturated generator.
Prints a table, writes JSON to bench/results/. Not a test: no assertions on
speed. Usage:

    .venv/bin/python -m bench.tracker [--swarms 1000] [--seconds 10] [--connections 64]

Then the mTLS mode (bench/tracker_mtls.py): our tracker with `--tls-dir`,
announces over HTTPS with a node's client certificate and a new TLS handshake
each (`Connection: close`, as libtorrent does), and, in the same run and with
the same Python generator, our tracker in plain HTTP; the table gives their
ratio (wrk cannot show a client certificate, so it cannot drive this row).

Needs `wrk` and `opentracker` (apt; installed here if missing and run as root).
All trackers start and stop by pid through harness.procs (ours through
harness.tracker), pinned with `taskset`; `--tls off` (the only value yet) is
recorded in the JSON's `args`: it is about the wrk rows, the mTLS rows always run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast
from urllib.parse import quote_from_bytes

import httpx
import libtorrent as lt
import trio
from rich.console import Console
from rich.table import Table

from bench.machine import add_tls_flag, cpu_seconds
from bench.tracker_mtls import Load, measure_both
from harness.procs import Process, free_port, wait_for_http
from harness.tracker import open_tracker
from p2preg.core.digest import Digest
from p2preg.core.metainfo import Metainfo
from tracker.client import open_tracker_client
from tracker.metainfo import make_metainfo

TOKEN = "bench-token"
# Rows measured with bench/tracker_mtls.py's generator rather than wrk.
PY_GEN = "p2preg (py gen)"
RESULTS = Path(__file__).parent / "results"
TRACKER_CORE, LOAD_CORE = "0", "1"


@dataclass
class Result:
    tracker: str
    protocol: str
    announces_per_s: float
    requests: int
    errors: int
    seconds: float
    tracker_cpu_pct: float


def ensure_tools() -> None:
    missing = [
        p for p, exe in (("wrk", "wrk"), ("opentracker", "opentracker")) if not shutil.which(exe)
    ]
    if missing:
        if os.geteuid() != 0:
            sys.exit(f"bench/tracker.py: please apt-get install {' '.join(missing)}")
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True)


def make_torrents(workdir: Path, n: int) -> list[Metainfo]:
    blobs = workdir / "blobs"
    blobs.mkdir()
    metas = []
    for i in range(n):
        data = i.to_bytes(4, "big") + os.urandom(16 * 1024)
        path = blobs / str(i)
        path.write_bytes(data)
        metas.append(make_metainfo(path, Digest.of(data), len(data)))
    return metas


def lua_script(path: Path, hashes: list[bytes], token: str | None) -> None:
    encoded = ",\n".join(f'"{quote_from_bytes(h, safe="")}"' for h in hashes)
    extra = f"&token={token}" if token else ""
    path.write_text(
        f"""
local hashes = {{ {encoded} }}
local enc = {{}}
for i = 0, 255 do enc[i] = string.format("%%%02X", i) end
local function rand20()
  local t = {{}}
  for i = 1, 20 do t[i] = enc[math.random(0, 255)] end
  return table.concat(t)
end
math.randomseed(os.time() * 1000 + math.floor(os.clock() * 1000000))
request = function()
  local path = "/announce?info_hash=" .. hashes[math.random(#hashes)]
    .. "&peer_id=" .. rand20() .. "&port=" .. math.random(1024, 65535)
    .. "&uploaded=0&downloaded=0&left=" .. math.random(1, 1000000)
    .. "&compact=1&numwant=50{extra}"
  return wrk.format("GET", path)
end
"""
    )


def run_wrk(port: int, script: Path, seconds: int, connections: int) -> tuple[int, int, float]:
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
    return requests, hard + (int(non2xx.group(1)) if non2xx else 0), elapsed


def udp_load(
    port: int, hashes: list[bytes], seconds: float, window: int, token: str | None
) -> tuple[int, int, float]:
    """Announce over BEP 15 as fast as replies come back; returns (answered, errors, seconds)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(("127.0.0.1", port))
    sock.settimeout(2)
    sock.send(struct.pack(">QII", 0x41727101980, 0, 1))
    _, _, cid = struct.unpack(">IIQ", sock.recv(64))
    sock.setblocking(False)
    url = (f"/announce?token={token}" if token else "/announce").encode()
    options = bytes([2, len(url)]) + url + b"\x00"
    head = struct.Struct(">QII20s20sQQQIIIiH")
    rnd = random.Random()
    answered = errors = inflight = 0
    tid = 0
    start = last_reply = time.perf_counter()
    deadline = start + seconds
    while True:
        now = time.perf_counter()
        if now >= deadline:
            break
        while inflight < window:
            tid = (tid + 1) & 0xFFFFFFFF
            packet = head.pack(
                cid,
                1,
                tid,
                rnd.choice(hashes),
                rnd.randbytes(20),
                0,
                rnd.randint(1, 10**6),
                0,
                0,
                0,
                0,
                50,
                rnd.randint(1024, 65535),
            )
            try:
                sock.send(packet + options)
            except BlockingIOError:
                break
            inflight += 1
        got = 0
        while True:
            try:
                reply = sock.recv(2048)
            except BlockingIOError:
                break
            got += 1
            if reply[:4] == b"\x00\x00\x00\x01":
                answered += 1
            else:
                errors += 1
        inflight -= got
        if got:
            last_reply = now
        elif now - last_reply > 0.2:
            inflight = 0  # replies lost (socket buffer overflow): refill the window
            last_reply = now
    sock.close()
    return answered, errors, time.perf_counter() - start


def measure(
    name: str,
    pid: int,
    port: int,
    hashes: list[bytes],
    token: str | None,
    workdir: Path,
    seconds: int,
    connections: int,
) -> list[Result]:
    script = workdir / f"{name}.lua"
    lua_script(script, hashes, token)
    run_wrk(port, script, 3, connections)  # warm-up: fill the swarms
    results = []
    cpu0 = cpu_seconds(pid)
    requests, errs, elapsed = run_wrk(port, script, seconds, connections)
    cpu = (cpu_seconds(pid) - cpu0) / elapsed * 100
    results.append(Result(name, "http", requests / elapsed, requests, errs, elapsed, cpu))
    cpu0 = cpu_seconds(pid)
    answered, errs, elapsed = run_pinned_udp(port, hashes, seconds, token)
    cpu = (cpu_seconds(pid) - cpu0) / elapsed * 100
    results.append(Result(name, "udp", answered / elapsed, answered, errs, elapsed, cpu))
    return results


def run_pinned_udp(
    port: int, hashes: list[bytes], seconds: float, token: str | None
) -> tuple[int, int, float]:
    os.sched_setaffinity(0, {int(LOAD_CORE)})
    try:
        return udp_load(port, hashes, seconds, 64, token)
    finally:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))


def check_answers(port: int, ih: bytes, token: str | None) -> None:
    """One announce by hand: both trackers must answer with peers, not a failure."""
    q = f"info_hash={quote_from_bytes(ih)}&peer_id={'x' * 20}&port=999&left=5&compact=1&numwant=50"
    body = lt.bdecode(
        httpx.get(
            f"http://127.0.0.1:{port}/announce?{q}" + (f"&token={token}" if token else "")
        ).content
    )
    if not isinstance(body, dict):
        raise RuntimeError(f"tracker on {port} answered something not a dictionary: {body!r}")
    reason = cast(dict[bytes, object], body).get(b"failure reason")
    if reason is not None:
        raise RuntimeError(f"tracker on {port} refused the load: {reason!r}")


async def publish_all(url: str, metas: list[Metainfo]) -> None:
    async with open_tracker_client(url, node="bench", token=TOKEN) as client:
        for meta in metas:
            # Only the digest's lease holder defines its first torrent.
            await client.acquire_lease(meta.digest, size=meta.size)
            await client.publish_metainfo(meta.digest, meta.size, meta.data)


def _measure_ours(
    workdir: Path, metas: list[Metainfo], hashes: list[bytes], args: argparse.Namespace
) -> list[Result]:
    port = free_port(udp=True)
    with open_tracker(
        workdir / "ours",
        port=port,
        token=TOKEN,
        args=["--log-level", "WARNING"],
        cpus=TRACKER_CORE,
    ) as ours:
        trio.run(publish_all, ours.url, metas)
        check_answers(port, hashes[0], TOKEN)
        return measure(
            "p2preg", ours.process.pid, port, hashes, TOKEN, workdir, args.seconds, args.connections
        )


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
    with Process(argv, ot, cwd=ot, cpus=TRACKER_CORE, term_grace_s=10.0) as proc:
        wait_for_http(f"http://127.0.0.1:{port}/announce", timeout_s=20.0, process=proc)
        check_answers(port, hashes[0], None)
        return measure(
            "opentracker", proc.pid, port, hashes, None, workdir, args.seconds, args.connections
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--swarms", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    add_tls_flag(parser)
    args = parser.parse_args()
    ensure_tools()
    with tempfile.TemporaryDirectory(prefix="p2preg-bench-tracker-") as tmp:
        workdir = Path(tmp)
        metas = make_torrents(workdir, args.swarms)
        hashes = [m.swarm_keys[0] for m in metas]
        results = _measure_ours(workdir, metas, hashes, args)
        results += _measure_opentracker(workdir, hashes, args)
        loads = measure_both(
            workdir,
            metas,
            hashes,
            args.seconds,
            tracker_core=TRACKER_CORE,
            load_core=int(LOAD_CORE),
        )
    results += [_from_load(mode, load) for mode, load in loads.items()]
    report(results, args)


def _from_load(mode: str, load: Load) -> Result:
    rate = load.answered / load.seconds
    cpu = load.tracker_cpu_pct
    return Result(PY_GEN, mode, rate, load.answered, load.errors, load.seconds, cpu)


def report(results: list[Result], args: argparse.Namespace) -> None:
    by = {(r.tracker, r.protocol): r for r in results}
    table = Table(
        title=f"Tracker announces/s — {args.swarms} swarms, numwant=50, new connection per"
        f" HTTP request, tracker on core {TRACKER_CORE}, load on core {LOAD_CORE}"
    )
    ref_name = "vs opentracker (py gen: vs its http)"
    columns = ("tracker", "protocol", "announces/s", "errors", "tracker CPU", "CPU µs/announce")
    for name in (*columns, ref_name):
        table.add_column(name, justify="left" if name in ("tracker", "protocol") else "right")
    for r in results:
        # The generator's rows compare with its own plain row: mTLS / plain.
        ref = by.get((PY_GEN, "http") if r.tracker == PY_GEN else ("opentracker", r.protocol))
        ratio = r.announces_per_s / ref.announces_per_s if ref else float("nan")
        table.add_row(
            r.tracker,
            r.protocol,
            f"{r.announces_per_s:,.0f}",
            str(r.errors),
            f"{r.tracker_cpu_pct:.0f} %",
            f"{r.tracker_cpu_pct / 100 * r.seconds / max(1, r.requests) * 1e6:.0f}",
            f"{ratio:.2f}",
        )
    Console().print(table)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"tracker-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(
        json.dumps({"args": vars(args), "results": [asdict(r) for r in results]}, indent=2)
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
