"""The node's libtorrent session, driven from trio.

Owns one session per node and `<data_dir>/swarm/`, where every torrent's file
lives as `sha256-<hex>`. A blob the node seeds is a hard link to the store's
verified file (no copy); a blob being downloaded is written there by
libtorrent and only becomes a store blob after the node has checked its whole
digest. The swarm is private: BEP 27 flag on every torrent, no DHT, LSD, UPnP,
NAT-PMP or PEX peers; its one tracker is the node's announce relay (relay.py),
which carries announces to the cluster's trackers. With a tls_dir every torrent
is a libtorrent SSL torrent: the session listens on an `s` interface only and
each torrent is given the node's certificate as it is added; renewed files are
set again on every torrent. While a download runs it samples the torrent's
peers, and the connections that failed, for stalling or unreachable ones and
reports them through the `report_stall` it was given (the tracker client's;
stallreports.py); slow ones lose their requests (slowpeers.py); no connection
keeps Nagle on (peersockets.py). Alerts reach trio through `set_alert_fd` on a
pipe and `trio.lowlevel.wait_readable`, never a Python callback in libtorrent's
thread (which hung teardown with the 2.1.1 wheel). It decides nothing about
where a blob should come from.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import libtorrent as lt
import trio

from p2preg.core.digest import Digest
from p2preg.core.hostfiles import private_dir
from p2preg.core.logs import redact_urls
from p2preg.core.metainfo import Metainfo, info_name
from p2preg.node.metrics import NodeMetrics
from p2preg.node.peersockets import NoDelay
from p2preg.node.peertls import PeerTLS
from p2preg.node.seams import SwarmError
from p2preg.node.slowpeers import SlowPeers
from p2preg.node.stallreports import ReportStall, StallReports, Watched
from p2preg.node.swarmsettings import session_settings

log = logging.getLogger(__name__)

STATUS_INTERVAL_S = 0.5
# How often renewed certificate files are looked for (a clock read; ReloadingTLS
# itself stats the files at most every few seconds).
TLS_CHECK_INTERVAL_S = 1.0


def _said(alert: Any) -> str:
    """An alert's message with its URLs' queries and userinfo redacted.

    libtorrent quotes the tracker URL in its tracker alerts, and a token
    cluster's announce URL carries `?token=`: logged as is, every tracker
    error would hand the cluster token to whoever reads the logs.
    """
    return f"{alert.what()}: {redact_urls(alert.message())}"


@dataclass
class _Torrent:
    digest: Digest
    handle: Any
    seeding: bool
    finished: trio.Event = field(default_factory=trio.Event)
    announced: trio.Event = field(default_factory=trio.Event)
    error: SwarmError | None = None
    done_bytes: int = 0
    last_progress: float = 0.0
    hash_failures: int = 0
    from_peers_bytes: int = 0
    wasted_bytes: int = 0
    stalls: Watched | None = None
    changed_at: float = 0.0  # added, or began seeding (trio's clock)


class Swarm:
    def __init__(
        self,
        session: Any,
        swarm_dir: Path,
        announce_url: str,
        metrics: NodeMetrics,
        tls: PeerTLS | None = None,
    ) -> None:
        self._session = session
        self._reports: StallReports | None = None  # set once the nursery runs
        self.swarm_dir = swarm_dir
        self._announce_url = announce_url
        self._metrics = metrics
        self._tls = tls
        self._torrents: dict[Digest, _Torrent] = {}
        self._by_hash: dict[bytes, _Torrent] = {}
        self._no_delay = NoDelay()  # Nagle off on every connection (peersockets.py)

    @property
    def session(self) -> Any:
        """The libtorrent session, for session-wide settings (limits.py)."""
        return self._session

    @property
    def listen_port(self) -> int:
        """The port peers connect to: the SSL one with a tls_dir."""
        if self._tls is not None:
            return int(self._session.ssl_listen_port())
        return int(self._session.listen_port())

    @property
    def listen_ports(self) -> frozenset[int]:
        """Every port this session listens on: what its announces may name."""
        return frozenset({self._session.listen_port(), self._session.ssl_listen_port()} - {0})

    def holds(self, info_hash: bytes) -> bool:
        """Whether a torrent here announces under `info_hash` (v2, truncated to 20 bytes)."""
        return any(full[:20] == info_hash for full in self._by_hash)

    def path(self, digest: Digest) -> Path:
        return self.swarm_dir / info_name(digest)

    def seeding(self) -> list[Digest]:
        return [d for d, t in self._torrents.items() if t.seeding]

    def __contains__(self, digest: Digest) -> bool:
        return digest in self._torrents

    def _params(self, meta: Metainfo) -> Any:
        atp = lt.add_torrent_params()
        atp.ti = lt.torrent_info(meta.data)
        atp.save_path = str(self.swarm_dir)
        # The node's announce relay (relay.py) is the one tracker: it needs no
        # certificate of libtorrent, and the control client fails over.
        atp.trackers = [self._announce_url]
        atp.flags &= ~(lt.torrent_flags.auto_managed | lt.torrent_flags.paused)
        flags = lt.torrent_flags
        atp.flags |= flags.disable_dht | flags.disable_lsd | flags.disable_pex
        return atp

    def _add(self, atp: Any) -> Any:
        handle = self._session.add_torrent(atp)
        if self._tls is not None:
            self._tls.apply(handle)
        return handle

    def _track(self, meta: Metainfo, handle: Any, *, seeding: bool) -> _Torrent:
        now = trio.current_time()
        t = _Torrent(meta.digest, handle, seeding, last_progress=now, changed_at=now)
        self._torrents[meta.digest] = t
        self._by_hash[meta.info_hash_v2] = t
        return t

    def seed(self, meta: Metainfo, verified: Path) -> None:
        """Seed the store's verified file `verified` under `meta` (no copy, no re-check)."""
        if meta.digest in self._torrents:
            return
        target = self.path(meta.digest)
        target.unlink(missing_ok=True)
        os.link(verified, target)
        atp = self._params(meta)
        # The bytes were verified against the digest; libtorrent still checks
        # each piece lazily the first time it serves it.
        atp.flags |= lt.torrent_flags.seed_mode
        handle = self._add(atp)
        t = self._track(meta, handle, seeding=True)
        t.finished.set()
        self._metrics.blobs_seeded.set(len(self.seeding()))

    async def download(
        self,
        meta: Metainfo,
        *,
        stall_s: float,
        max_hash_failures: int,
        report_as: Digest | None = None,
    ) -> Path:
        """Download `meta`'s file from peers; returns its path once every piece checked.

        The caller must still verify the whole digest before the bytes are used.
        Raises SwarmError when no byte arrives for `stall_s`, every peer it has
        stalls it or cannot be reached (`peers_stalled`, once the tracker has
        the reports: stallreports.py), or pieces keep failing their hash.
        Stalling peers are reported as peers of `report_as` (default: `meta`'s
        digest; a chunk's blob, whose chunk swarms the tracker keeps as one).
        """
        t = self._torrents.get(meta.digest)
        if t is None:
            self.path(meta.digest).unlink(missing_ok=True)
            handle = self._add(self._params(meta))
            t = self._track(meta, handle, seeding=False)
        elif not t.finished.is_set():
            # Again after `peers_stalled`: keep the pieces, judge the peers afresh,
            # and ask the tracker for the peers it names now.
            t.last_progress = trio.current_time()
            t.handle.force_reannounce()
        if self._reports is not None:
            t.stalls = self._reports.watch(report_as or meta.digest)
        slow = SlowPeers(str(meta.digest), self._metrics)
        while not t.finished.is_set():
            if t.error is not None:
                raise t.error
            if t.hash_failures > max_hash_failures:
                raise SwarmError("hash_failures", f"{t.hash_failures} pieces failed their hash")
            if trio.current_time() - t.last_progress > stall_s:
                raise SwarmError("stalled", f"no progress from peers for {stall_s:.0f} s")
            slow.sample(t.handle, peers := t.handle.get_peer_info(), trio.current_time())
            if t.stalls is not None and t.announced.is_set():
                # (before its first tracker reply nobody could have served it)
                assert self._reports is not None  # t.stalls comes from it
                self._reports.sample(t.stalls, peers)
                if (verdict := self._reports.verdict(t.stalls)) is not None:
                    raise verdict
                if t.stalls.watch.lonely(trio.current_time()):
                    log.info("swarm: no peer of %s has pieces we want: asking for others",
                             meta.digest)  # fmt: skip
                    t.handle.force_reannounce()
            with trio.move_on_after(STATUS_INTERVAL_S):
                await t.finished.wait()
        if t.error is not None:
            raise t.error
        return self.path(meta.digest)

    def last_seeder_of_live_swarm(self, digest: Digest) -> bool:
        """We seed `digest` and, by the tracker's last counts, nobody else does
        while someone still downloads it: dropping it would strand them."""
        t = self._torrents.get(digest)
        if t is None or not t.seeding:
            return False
        status = t.handle.status()
        # Counts from the last tracker reply (or the relay's), -1 while unknown; we seed.
        return 0 <= int(status.num_complete) <= 1 and int(status.num_incomplete) > 0

    def reannounce_recent(self, within_s: float) -> int:
        """Announce now every download, and every torrent added or seeding for less than
        `within_s`: what a tracker that just went away may have taken with it."""
        since = trio.current_time() - within_s
        due = [t for t in self._torrents.values()
               if not t.finished.is_set() or t.changed_at >= since]  # fmt: skip
        for t in due:
            t.handle.force_reannounce()
        return len(due)

    def reannounce(self, digest: Digest) -> None:
        """Announce `digest`'s torrent now rather than at libtorrent's next retry."""
        t = self._torrents.get(digest)
        if t is not None:
            t.handle.force_reannounce()

    def reannounce_hash(self, info_hash: bytes) -> None:
        """Announce the torrent under `info_hash` (as `holds` names it) now."""
        _ = [t.handle.force_reannounce() for f, t in self._by_hash.items() if f[:20] == info_hash]

    def pause(self) -> int:
        """Pause every torrent (each announces `stopped`); how many had announced."""
        self._session.pause()
        return sum(t.announced.is_set() for t in self._torrents.values())

    def mark_seeding(self, digest: Digest) -> None:
        t = self._torrents.get(digest)
        if t is not None:
            t.seeding, t.changed_at = True, trio.current_time()
            self._metrics.blobs_seeded.set(len(self.seeding()))

    def remove(self, digest: Digest) -> None:
        """Stop the torrent and drop its file from the swarm directory."""
        t = self._torrents.pop(digest, None)
        if t is None:
            return
        self._by_hash = {h: v for h, v in self._by_hash.items() if v is not t}
        self._session.remove_torrent(t.handle)
        self.path(digest).unlink(missing_ok=True)
        self._metrics.blobs_seeded.set(len(self.seeding()))

    async def wait_announced(self, digest: Digest, timeout_s: float) -> bool:
        """Wait until the tracker has acknowledged an announce of this torrent."""
        t = self._torrents.get(digest)
        if t is None:
            return False
        with trio.move_on_after(timeout_s):
            await t.announced.wait()
        return t.announced.is_set()

    def peer_bytes(self, digest: Digest) -> int:
        t = self._torrents.get(digest)
        return t.from_peers_bytes if t is not None else 0

    def peers(self) -> int:
        """Peer connections over all torrents right now (for `p2preg status`)."""
        return sum(int(t.handle.status().num_peers) for t in self._torrents.values())

    # -- alerts ---------------------------------------------------------

    def _torrent_of(self, alert: Any) -> _Torrent | None:
        handle = getattr(alert, "handle", None)
        if handle is None or not handle.is_valid():
            return None
        try:
            key = handle.info_hashes().v2.to_bytes()
        except RuntimeError:
            return None
        return self._by_hash.get(key)

    def _on_alert(self, alert: Any) -> None:
        if isinstance(alert, lt.state_update_alert):
            for status in alert.status:
                t = self._by_hash.get(status.info_hashes.v2.to_bytes())
                if t is not None:
                    self._progress(t, status)
            return
        t = self._torrent_of(alert)
        if isinstance(alert, lt.torrent_finished_alert):
            if t is not None:
                self._progress(t, alert.handle.status())
                # Every piece passed its hash, but some may still sit in the
                # disk thread's queue: the file is complete once it is flushed.
                alert.handle.flush_cache()
        elif isinstance(alert, lt.cache_flushed_alert):
            if t is not None:
                t.finished.set()
        elif isinstance(alert, lt.tracker_reply_alert):
            if t is not None:
                t.announced.set()
        elif isinstance(alert, lt.tracker_error_alert | lt.tracker_warning_alert):
            # Other listen sockets than the relay's address cannot reach it (relay.py).
            quiet = alert.local_endpoint[0] != urlsplit(self._announce_url).hostname
            log.log(logging.DEBUG if quiet else logging.WARNING, "swarm: %s", _said(alert))
        elif isinstance(alert, lt.hash_failed_alert):
            self._metrics.hash_failures.inc()
            if t is not None:
                t.hash_failures += 1
        elif isinstance(alert, lt.peer_ban_alert | lt.peer_blocked_alert):
            self._metrics.peer_bans.inc()
            log.warning("swarm: %s", _said(alert))
        elif isinstance(alert, lt.torrent_error_alert | lt.file_error_alert):
            log.warning("swarm: %s", _said(alert))
            if t is not None and not t.finished.is_set():
                t.error = SwarmError("torrent_error", _said(alert))
                t.finished.set()
        elif isinstance(alert, lt.peer_disconnected_alert):
            if alert.op == lt.operation_t.connect and t is not None and t.stalls is not None:
                endpoint = (str(alert.endpoint[0]), int(alert.endpoint[1]))
                assert self._reports is not None
                self._reports.connect_failed(t.stalls, endpoint, alert.error.value())
        elif isinstance(alert, lt.peer_error_alert):
            if alert.op == lt.operation_t.ssl_handshake:
                # No certificate, another CA's, an expired one, or not TLS at all.
                self._metrics.peer_tls_refusals.inc()
                log.debug("swarm: %s", alert.message())
        elif isinstance(alert, lt.listen_failed_alert):
            log.error("swarm: %s", _said(alert))

    def _progress(self, t: _Torrent, status: Any) -> None:
        done = int(status.total_wanted_done)
        if done > t.done_bytes:
            t.done_bytes = done
            t.last_progress = trio.current_time()
        payload = int(status.total_payload_download)
        if payload > t.from_peers_bytes:
            self._metrics.peer_bytes.inc(payload - t.from_peers_bytes)
            t.from_peers_bytes = payload
            if self._reports is not None:
                self._reports.reached()
        # Pieces that failed their hash are counted as such (hash_failures).
        wasted = int(status.total_redundant_bytes)
        if wasted > t.wasted_bytes:
            self._metrics.peer_redundant_bytes.inc(wasted - t.wasted_bytes)
            t.wasted_bytes = wasted

    async def _pump(self, read_fd: int) -> None:
        while True:
            alerts = self._session.pop_alerts()
            self._no_delay.after(alerts)
            for alert in alerts:
                self._on_alert(alert)
            await trio.lowlevel.wait_readable(read_fd)
            try:
                while os.read(read_fd, 4096):
                    pass
            except BlockingIOError:
                pass

    async def _watch_tls(self, tls: PeerTLS) -> None:
        """Set renewed certificate files on every torrent (new connections use them)."""
        seen = tls.generation
        while True:
            await trio.sleep(TLS_CHECK_INTERVAL_S)
            if tls.generation == seen:
                continue
            seen = tls.generation
            for t in list(self._torrents.values()):
                tls.apply(t.handle)
            log.info("swarm: renewed certificate set on %d torrents", len(self._torrents))

    async def _poll_status(self) -> None:
        while True:
            if any(not t.finished.is_set() for t in self._torrents.values()):
                self._session.post_torrent_updates()
            self._no_delay.sweep()  # listeners opened again, the node's HTTP connections
            await trio.sleep(STATUS_INTERVAL_S)


@asynccontextmanager
async def open_swarm(
    data_dir: Path,
    listen: str,
    announce_url: str,
    metrics: NodeMetrics,
    *,
    tls: PeerTLS | None = None,
    stall_reports: tuple[ReportStall, float] | None = None,
) -> AsyncIterator[Swarm]:
    """A session listening on `listen` (libtorrent's `listen_interfaces`), torrents
    announced to `announce_url` (the node's relay); with `tls`, SSL torrents only; with
    `stall_reports` (report call, seconds), peers that stall a download reported."""
    swarm_dir = data_dir / "swarm"
    # Whatever is here is a link to a store blob or an unverified partial
    # download from a previous run: neither may be served as is.
    shutil.rmtree(swarm_dir, ignore_errors=True)
    private_dir(swarm_dir)
    session = lt.session(session_settings(listen))
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    session.set_alert_fd(write_fd)
    swarm = Swarm(session, swarm_dir, announce_url, metrics, tls)
    try:
        async with trio.open_nursery() as nursery:
            if stall_reports is not None:
                swarm._reports = StallReports(*stall_reports, metrics, nursery)
            nursery.start_soon(swarm._pump, read_fd)
            nursery.start_soon(swarm._poll_status)
            if tls is not None:
                nursery.start_soon(swarm._watch_tls, tls)
            try:
                yield swarm
            finally:
                nursery.cancel_scope.cancel()
    finally:
        session.set_alert_fd(-1)
        session.pause()
        for handle in session.get_torrents():
            session.remove_torrent(handle)
        # The last reference (paused, the torrents have sent their `stopped`).
        swarm._session = None
        del session
        os.close(read_fd)
        os.close(write_fd)
