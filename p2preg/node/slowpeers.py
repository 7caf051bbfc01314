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
at least `FASTER` times as fast. A peer's current rate is what it sent since
the previous sample (at least `WINDOW_S` before; at most a block there, for one
that sent none since), libtorrent's running estimate only for a peer not
sampled before: that estimate lags by seconds (a peer that slowed from 4 MiB/s
to 64 KiB/s still showed 0.6 to 0.9 MB/s), longer than a fast swarm takes to
finish without it. At most `MAX_DROPS` per download,
`COOLDOWN_S` apart, so rates settle before the next judgement.

A peer that delivered and then sent nothing at all is judged on a block since
its last sample, so it is dropped too when another delivers; the new connection
`RECONNECT_S` later starts its count afresh, and a peer still silent there has
sent no block on that connection: never dropped again, it is the stall
reports' (stallwatch.py), reported within `peer_stall_report_s`.

The Python binding cannot close one connection, so peersockets.py shuts down its
socket, found by the pair of endpoints `peer_info` names: libtorrent's next read
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
from dataclasses import dataclass, field
from typing import Any

import libtorrent as lt

from p2preg.node.metrics import NodeMetrics
from p2preg.node.peersockets import Endpoint, shut_connection
from p2preg.node.peersockets import endpoint as as_endpoint
from p2preg.node.stallwatch import BLOCK_BYTES

log = logging.getLogger(__name__)

# A peer whose queued requests would take longer than this at its rate holds them.
HOLD_S = 3.0
# ... when another peer delivers at least this many times as fast.
FASTER = 4.0
# Connected at least this long: a new peer's rate estimate lags its growing queue.
SETTLE_S = 2.0
# A peer's rate is taken over at least this long (what it sent since an earlier sample).
WINDOW_S = 0.25
# Between two drops of one download, and how many one download may make.
COOLDOWN_S = 2.0
MAX_DROPS = 4
# A dropped peer we had dialled is connected again this long after.
RECONNECT_S = 2.0


@dataclass(frozen=True, slots=True)
class PeerRate:
    """One peer of one torrent, now, as libtorrent's `peer_info` shows it."""

    endpoint: Endpoint
    rate: int  # payload bytes per second it sends us, libtorrent's running estimate (lags)
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
    _mark: dict[Endpoint, tuple[float, int]] = field(default_factory=dict)  # (when, received)
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
        rates = self._rates(samples, now)
        if now < self._quiet_until or len(self.drops) >= self.max_drops:
            return None
        delivering = [
            s for s in samples if s.unchoked and s.received >= BLOCK_BYTES and rates[s.endpoint]
        ]
        worst: Drop | None = None
        for s in delivering:
            rate = rates[s.endpoint]
            hold_s = s.queued * BLOCK_BYTES / rate
            fastest = max((rates[o.endpoint] for o in delivering if o is not s), default=0)
            if (
                hold_s > self.hold_s
                and fastest >= FASTER * rate
                and now - self._since[s.endpoint] >= SETTLE_S
                and (worst is None or hold_s > worst.hold_s)
            ):
                worst = Drop(s.endpoint, hold_s, rate, fastest, s.local)
        if worst is None:
            return None
        self.drops.append(worst)
        self._quiet_until = now + COOLDOWN_S
        if next(s for s in samples if s.endpoint == worst.endpoint).ours:
            self._reconnect[worst.endpoint] = now + RECONNECT_S
        return worst

    def _rates(self, samples: list[PeerRate], now: float) -> dict[Endpoint, int]:
        """Each peer's rate now: what it sent since its mark, a sample at least
        `WINDOW_S` old, which then moves here (at least a block's worth: nothing
        sent is no measure of a rate); libtorrent's estimate for a peer without one
        (new, or its connection's count started again: a new connection)."""
        rates: dict[Endpoint, int] = {}
        marks: dict[Endpoint, tuple[float, int]] = {}
        for s in samples:
            mark = self._mark.get(s.endpoint)
            if mark is None or s.received < mark[1]:
                rates[s.endpoint], marks[s.endpoint] = s.rate, (now, s.received)
            elif now - mark[0] < WINDOW_S:
                rates[s.endpoint], marks[s.endpoint] = s.rate, mark
            else:
                # Less than a block since is at most a block: a peer that stopped
                # holds its requests for ever, and is judged on that bound.
                sent = max(s.received - mark[1], BLOCK_BYTES)
                rates[s.endpoint] = int(sent / (now - mark[0]))
                marks[s.endpoint] = (now, s.received)
        self._mark = marks
        return rates

    def undo(self, drop: Drop) -> None:
        """`drop` could not be made (its connection was gone by then): it counts for
        nothing, neither against MAX_DROPS nor as a cool-down or a reconnect."""
        self.drops.remove(drop)
        self._quiet_until = float("-inf")
        self._reconnect.pop(drop.endpoint, None)

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
            as_endpoint(p.ip),
            int(p.payload_down_speed),
            int(p.download_queue_length),
            int(p.total_download),
            unchoked=not p.flags & lt.peer_info.remote_choked,
            ours=bool(p.flags & lt.peer_info.local_connection),
            local=as_endpoint(p.local_endpoint()),
        )
        for p in peers
    ]


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
            self.watch.undo(drop)  # closed by now: its requests are back already
            log.debug("swarm: peer %s:%d of %s was gone before its drop", *drop.endpoint,
                      self._what)  # fmt: skip
            return None
        if self._metrics is not None:
            self._metrics.peer_slow_drops.inc()
        log.info(
            "swarm: peer %s:%d holds %.0f s of %s's requests at %d B/s (another sends %d B/s):"
            " disconnected to free them", *drop.endpoint, drop.hold_s, self._what, drop.rate,
            drop.fastest,
        )  # fmt: skip
        return drop
