"""bench.peer's worker: one libtorrent session, configured as a node's, in a process of its own.

Owns what runs inside a `python -m bench.peer --role seed|leech` child: the
node's session settings (`p2preg.node.swarmsettings.session_settings`, on loopback,
plus experiment overrides), the same add_torrent_params as the node's swarm,
the alert loop that records when the tracker answered, the torrent finished
and its writes were flushed, a leecher's slow-peer watch as the node runs it
(p2preg.node.slowpeers; off with `--no-slow-peers`), Nagle off on its connections as
the node turns it off (p2preg.node.peersockets; a thread sweeps every
`NO_DELAY_SWEEP_S`, where the node sweeps as libtorrent starts each outgoing
connection; left on with `--nagle`), and the JSON lines it reports on stdout to the
orchestrator (which drives it with lines on stdin). With `--tls-dir` it is a
TLS node's session instead: SSL torrent, an `s` listen interface only, added
without trackers, the certificate set, then the tracker, as the node's swarm
does. It must not start other processes or measure anything but its own
session and CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import resource
import select
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO, cast

import libtorrent as lt

from p2preg.node.peersockets import NoDelay
from p2preg.node.peertls import listen_interfaces, write_dh_params
from p2preg.node.slowpeers import SlowPeers
from p2preg.node.swarmsettings import session_settings

MiB = 1 << 20
READY_TIMEOUT_S = 30.0
# How often a leecher judges its peers for slow ones, as the node does (swarm.py).
SLOW_PEERS_INTERVAL_S = 0.5
# How often the worker's sockets are swept for Nagle (a worker has a few dozen).
NO_DELAY_SWEEP_S = 0.01


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


def peer_settings(
    overrides: dict[str, int | bool | str], *, tls: bool = False, host: str = "127.0.0.1"
) -> dict[str, Any]:
    """The node's settings (`session_settings`) on a loopback address, plus experiment
    overrides; its peer connections leave from that address too (a host of its own)."""
    settings: dict[str, Any] = dict(session_settings(listen_interfaces(host, 0, 0, tls=tls)))
    if host != "127.0.0.1":
        settings["outgoing_interfaces"] = host
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
    """The same add_torrent_params as `p2preg.node.swarm.Swarm._params` (+ seed mode for a
    seed; without it a seed's file is checked whole before it announces)."""
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


def _port(session: Any, args: argparse.Namespace) -> int:
    return int(session.ssl_listen_port() if args.tls_dir else session.listen_port())


def _add(session: Any, args: argparse.Namespace, atp: Any) -> Any:
    """add_torrent; with TLS trackerless, then the certificate, then the tracker
    (`p2preg.node.swarm.Swarm._add`)."""
    if not args.tls_dir:
        return session.add_torrent(atp)
    trackers, atp.trackers = list(atp.trackers), []
    handle = session.add_torrent(atp)
    tls, save = Path(args.tls_dir), Path(args.save_path)
    dh = write_dh_params(save.parent / f"dh-{save.name}")
    handle.set_ssl_certificate(str(tls / "tls.crt"), str(tls / "tls.key"), str(dh))
    for url in trackers:
        handle.add_tracker({"url": url})
    return handle


def _set_upload_limit(session: Any, bytes_per_s: int) -> None:
    """Loopback peers are in libtorrent's `local` class, which the global limit
    does not cover: limit both (tests/fixtures/faults.py SlowSeeder); 0 lifts it."""
    for cls in (session.local_peer_class_id, session.global_peer_class_id):
        pc = session.get_peer_class(cls)
        pc["upload_limit"] = bytes_per_s
        session.set_peer_class(cls, pc)


def _open_session(args: argparse.Namespace) -> Any:
    settings = peer_settings(parse_overrides(args.set), tls=bool(args.tls_dir), host=args.peer_host)
    if args.peer_log:
        # Every message to and from each peer, and the picker's decisions (large).
        settings["alert_mask"] = int(settings["alert_mask"]) | lt.alert_category.peer_log
    params = lt.session_params(cast(Any, settings))
    if args.disk_io:
        params.disk_io_constructor = f"{args.disk_io}_disk_io_constructor"
    session = lt.session(params)
    if args.upload_limit:
        _set_upload_limit(session, args.upload_limit)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while _port(session, args) == 0:
        if time.monotonic() > deadline:
            raise SystemExit("peer: session did not start listening")
        time.sleep(0.01)
    return session


def _drain(
    session: Any,
    handle: Any,
    times: dict[str, float],
    counts: dict[str, int],
    peer_log: TextIO | None = None,
) -> None:
    """Record the moments a leecher cares about; raise on a torrent error. With
    `peer_log`, every peer_log and unwanted_block alert is written there, timed
    from the leecher's start."""
    for alert in session.pop_alerts():
        now = time.monotonic()
        if peer_log is not None and isinstance(alert, lt.peer_log_alert | lt.unwanted_block_alert):
            peer_log.write(f"{now - times.get('start', now):.4f} {alert.message()}\n")
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


def _waste(session: Any) -> dict[str, int]:
    """libtorrent's session counters of bytes received twice, by its reason
    (`ses.waste_piece_*`: end_game, timed_out, cancelled, unknown, seed, closing)."""
    names = [m.name for m in lt.session_stats_metrics() if "waste" in m.name]
    session.post_session_stats()
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        session.wait_for_alert(100)
        for alert in session.pop_alerts():
            if isinstance(alert, lt.session_stats_alert):
                values = alert.values  # the binding's: {name: value}
                return {name.split(".", 1)[1]: int(values[name]) for name in names}
    return {}


def _sweep_no_delay() -> None:
    """Nagle off on every connection, until the process exits (a daemon thread)."""
    sweeper = NoDelay()
    while True:
        sweeper.sweep()
        time.sleep(NO_DELAY_SWEEP_S)


def run_peer(args: argparse.Namespace) -> int:
    """`--role seed|leech`: one libtorrent session driven by lines on stdin."""
    stdin = _Stdin()
    deadline = time.monotonic() + args.timeout_s
    session = _open_session(args)
    if not args.nagle:
        threading.Thread(target=_sweep_no_delay, daemon=True).start()
    meta = Path(args.torrent).read_bytes()
    save = Path(args.save_path)
    times: dict[str, float] = {}
    counts = {"hash_failures": 0}
    if args.role == "seed":
        atp = _torrent_params(meta, save, args.announce, seed=not args.full_check)
        if args.super_seed:
            atp.flags |= lt.torrent_flags.super_seeding
        handle = _add(session, args, atp)
        while "tracker_reply" not in times or not handle.status().is_seeding:
            if time.monotonic() > deadline:
                raise SystemExit("seed: the tracker never answered, or the file did not check")
            session.wait_for_alert(100)
            _drain(session, handle, times, counts)
        _emit("ready", port=_port(session, args), at=time.monotonic())
    else:
        _emit("ready", port=_port(session, args))
        while (line := stdin.line(1.0)) != "go":
            if line == "quit" or time.monotonic() > deadline:
                return 0
        cpu0, threads0 = _cpu_s(), _thread_cpu_s()
        times["start"] = time.monotonic()
        handle = _add(session, args, _torrent_params(meta, save, args.announce, seed=False))
        slow, judged = (None if args.no_slow_peers else SlowPeers("leech")), 0.0
        peer_log = open(args.peer_log, "w", encoding="utf-8") if args.peer_log else None  # noqa: SIM115
        while "flushed" not in times:
            if time.monotonic() > deadline:
                raise SystemExit("leech: transfer did not finish in time")
            if slow is not None and time.monotonic() - judged >= SLOW_PEERS_INTERVAL_S:
                judged = time.monotonic()
                slow.sample(handle, handle.get_peer_info(), judged)
            session.wait_for_alert(50)
            if "first_byte" not in times and handle.status().total_payload_download > 0:
                times["first_byte"] = time.monotonic()
            _drain(session, handle, times, counts, peer_log)
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
            redundant=status.total_redundant_bytes,
            slow_drops=[dataclasses.asdict(d) for d in slow.watch.drops] if slow else [],
            waste=_waste(session),
        )
        if peer_log is not None:
            peer_log.close()
    # Stay in the swarm (seeding) until told to quit, as a node does.
    while (line := stdin.line(0.2)) != "quit" and time.monotonic() < deadline:
        session.pop_alerts()
        if line == "stats":
            status = handle.status()
            _emit("stats", payload_up=status.total_payload_upload, cpu_s=_cpu_s())
        elif line is not None and line.startswith("rate "):
            _set_upload_limit(session, int(line.split()[1]))
            _emit("rate", payload_up=handle.status().total_payload_upload)
    status = handle.status()
    _emit("bye", payload_up=status.total_payload_upload, cpu_s=_cpu_s())
    return 0
