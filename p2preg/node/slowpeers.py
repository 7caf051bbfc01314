"""Slow peers: take a download's requests back from a peer that would hold them for seconds.

Owns, per download, the rule that frees the requests a slow peer holds so that
faster peers take them, and the libtorrent calls that do it. libtorrent gives a
peer its rate x `request_queue_time` of requests, up to what the peer advertises
(`reqq`; 32 for a node, requestqueue.py); one that advertises many, was fast
and slows down keeps them, and the end game lets the others ask for those busy
blocks one at a time, so one 64 KiB/s peer held a 200 MiB
download for ~11 s (docs/SWARM.md, "Slow peers"). No libtorrent time-out
applies to a peer that delivers, and a cancel is answered only once the slow
peer's own send buffer drained. Closing the connection frees them at once:
libtorrent hands every block of a closed peer back to its piece picker.

`SlowPeerWatch` decides, sans-IO, over samples of the torrent's peers: a peer is
*slow* when it has us unchoked, has sent at least a block on this connection
(one that sent nothing is the stall reports' matter, stallwatch.py, and never
dropped here), has been connected for `SETTLE_S`, its queued requests at its
current rate would take more than `HOLD_S`, and another peer that delivers is
at least `FASTER` times as fast. At most `MAX_DROPS` per download, `COOLDOWN_S`
apart, so rates settle before the next judgement.

The Python binding cannot close one connection, so `shut_connection` finds the
connection's socket among this process's descriptors (the pair of endpoints
`peer_info` names) and shuts it down through a duplicate: libtorrent's next read
on it ends, and libtorrent closes it as a peer that hung up. Only that
connection goes, whoever else shares the peer's address (nodes behind one NAT,
the nodes of a loopback test). `RECONNECT_S` later, a peer we had dialled is
connected again (`connect_peer`, while the download runs): a new connection,
whose queue libtorrent sizes to its new rate; the tracker keeps handing it out
meanwhile. It must not report peers to the tracker, ban them, or touch what is
verified: the blob is still hashed whole before it is served.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Any

import libtorrent as lt

from p2preg.node.metrics import NodeMetrics
from p2preg.node.stallwatch import BLOCK_BYTES

log = logging.getLogger(__name__)

Endpoint = tuple[str, int]

# A peer whose queued requests would take longer than this at its rate holds them.
HOLD_S = 3.0
# ... when another peer delivers at least this many times as fast.
FASTER = 4.0
# Connected at least this long: a new peer's rate estimate lags its growing queue.
SETTLE_S = 2.0
# Between two drops of one download, and how many one download may make.
COOLDOWN_S = 2.0
MAX_DROPS = 4
# A dropped peer we had dialled is connected again this long after.
RECONNECT_S = 2.0
# Where this process's descriptors are listed (Linux).
OWN_FDS = "/proc/self/fd"


@dataclass(frozen=True, slots=True)
class PeerRate:
    """One peer of one torrent, now, as libtorrent's `peer_info` shows it."""

    endpoint: Endpoint
    rate: int  # payload bytes per second it sends us, libtorrent's running estimate
    queued: int  # blocks we asked it for and did not get yet
    received: int  # payload bytes over this connection's life
    unchoked: bool = True  # it has us unchoked
    ours: bool = True  # we dialled it: `endpoint` is where it listens
    local: Endpoint = ("", 0)  # our end of the connection


@dataclass(frozen=True, slots=True)
class Drop:
    """The peer to disconnect now, and why (for the log and the benchmark)."""

    endpoint: Endpoint
    hold_s: float
    rate: int
    fastest: int
    local: Endpoint = ("", 0)  # our end: with `endpoint`, the one connection to close


@dataclass(slots=True)
class SlowPeerWatch:
    hold_s: float = HOLD_S
    max_drops: int = MAX_DROPS
    drops: list[Drop] = field(default_factory=list)
    _since: dict[Endpoint, float] = field(default_factory=dict)  # first sample it was in
    _quiet_until: float = float("-inf")
    _reconnect: dict[Endpoint, float] = field(default_factory=dict)  # endpoint -> when

    def __post_init__(self) -> None:
        if self.hold_s <= 0 or self.max_drops < 0:
            raise ValueError("hold_s must be > 0 and max_drops >= 0")

    def observe(self, samples: list[PeerRate], now: float) -> Drop | None:
        """Feed one sample of every peer; the peer to disconnect now, if any."""
        seen = {s.endpoint for s in samples}
        self._since = {e: t for e, t in self._since.items() if e in seen}
        for s in samples:
            self._since.setdefault(s.endpoint, now)
        if now < self._quiet_until or len(self.drops) >= self.max_drops:
            return None
        delivering = [s for s in samples if s.unchoked and s.received >= BLOCK_BYTES and s.rate]
        worst: Drop | None = None
        for s in delivering:
            hold_s = s.queued * BLOCK_BYTES / s.rate
            fastest = max((o.rate for o in delivering if o is not s), default=0)
            if (
                hold_s > self.hold_s
                and fastest >= FASTER * s.rate
                and now - self._since[s.endpoint] >= SETTLE_S
                and (worst is None or hold_s > worst.hold_s)
            ):
                worst = Drop(s.endpoint, hold_s, s.rate, fastest, s.local)
        if worst is None:
            return None
        self.drops.append(worst)
        self._quiet_until = now + COOLDOWN_S
        if next(s for s in samples if s.endpoint == worst.endpoint).ours:
            self._reconnect[worst.endpoint] = now + RECONNECT_S
        return worst

    def reconnect_due(self, now: float) -> list[Endpoint]:
        """Dropped peers we had dialled whose time to be connected again has come."""
        due = [e for e, at in self._reconnect.items() if at <= now]
        for e in due:
            del self._reconnect[e]
        return due


def peer_rates(peers: list[Any]) -> list[PeerRate]:
    """libtorrent `peer_info` records as samples."""
    return [
        PeerRate(
            (str(p.ip[0]), int(p.ip[1])),
            int(p.payload_down_speed),
            int(p.download_queue_length),
            int(p.total_download),
            unchoked=not p.flags & lt.peer_info.remote_choked,
            ours=bool(p.flags & lt.peer_info.local_connection),
            local=_endpoint(p.local_endpoint()),
        )
        for p in peers
    ]


def _endpoint(address: Any) -> Endpoint:
    """(host, port) as libtorrent or a socket gives it; an IPv4 address mapped into IPv6
    as the IPv4 address."""
    host = str(address[0]).removeprefix("::ffff:")
    return (host, int(address[1]))


def shut_connection(local: Endpoint, remote: Endpoint) -> bool:
    """Shut down this process's TCP connection from `local` to `remote`; False if there is
    none. Each socket descriptor is looked at through a duplicate, and the match shut
    through it: a descriptor its owner closed or reused meanwhile names another socket
    (or none), which the endpoints then do not match, and is never touched."""
    wanted = (_endpoint(local), _endpoint(remote))
    try:
        names = os.listdir(OWN_FDS)
    except OSError:
        return False
    for name in names:
        try:
            if not os.readlink(f"{OWN_FDS}/{name}").startswith("socket:"):
                continue
            dup = os.dup(int(name))
        except OSError:
            continue  # closed meanwhile, or the listing's own descriptor
        with socket.socket(fileno=dup) as sock:
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            try:
                if (_endpoint(sock.getsockname()), _endpoint(sock.getpeername())) != wanted:
                    continue
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                continue  # not connected (a listener), or reset meanwhile
            return True
    return False


class SlowPeers:
    """One download's watch, acting on its torrent's connections."""

    def __init__(self, what: str, metrics: NodeMetrics | None = None) -> None:
        self._what = what
        self._metrics = metrics
        self.watch = SlowPeerWatch()

    def sample(self, handle: Any, peers: list[Any], now: float) -> Drop | None:
        """Judge the torrent's `peer_info` list; disconnect the slow peer it names."""
        for endpoint in self.watch.reconnect_due(now):
            handle.connect_peer(endpoint)
        drop = self.watch.observe(peer_rates(peers), now)
        if drop is None:
            return None
        if not shut_connection(drop.local, drop.endpoint):
            return None  # closed by now: its requests are back already
        if self._metrics is not None:
            self._metrics.peer_slow_drops.inc()
        log.info(
            "swarm: peer %s:%d holds %.0f s of %s's requests at %d B/s (another sends %d B/s):"
            " disconnected to free them", *drop.endpoint, drop.hold_s, self._what, drop.rate,
            drop.fastest,
        )  # fmt: skip
        return drop
