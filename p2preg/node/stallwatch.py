"""Which peer stalls a download: unchoked us, was asked, and sent no block for a set time.

Owns the node's side of issue 13's stall reports, as a sans-IO state machine
over samples of one torrent's peers (swarm.py takes them from libtorrent's
`peer_info` while a download runs): a peer is *stalling* while it has us
unchoked and holds requests of ours, and it has sent less than one block (16
KiB) since that began. A peer that stays stalling for `stall_s` is reported,
once per download. A slow peer that does deliver — a block per `stall_s` — is
never reported, nor one that chokes us (that is BitTorrent's normal flow
control). A peer the tracker named that refused or timed out our connection
(`unreachable`) is reported once no peer with pieces we want has been
connected for `stall_s`: a seeder that died without saying so stays handed
out until its announce expires. When every peer that has pieces we want is a
reported peer still stalling, or the unreachable ones were reported
(`every_peer_stalls`), or no peer has had any for `stall_s` (`alone_too_long`:
nobody to report), waiting
longer for that swarm
only delays the download's next step (asking the tracker again). Alone with no
peer to report (the ones handed out were full and closed our connections),
the download asks the tracker for other peers once per `stall_s` (`lonely`).
Memory is bounded by the peers of the samples: a peer missing from a sample is
forgotten. It must not talk to libtorrent or the tracker.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

# BitTorrent's request unit: less than this is not a delivered block.
BLOCK_BYTES = 16 * 1024


@dataclass(frozen=True, slots=True)
class PeerSample:
    """One peer of one torrent, now."""

    endpoint: tuple[str, int]
    # It has us unchoked and holds at least one request of ours.
    asked: bool
    # Payload bytes received from it over the connection's life.
    received: int
    # It has pieces we still want (we are interested in it); one that has not
    # cannot serve us, and neither stalls us nor keeps us company.
    wanted: bool = True
    # We opened the connection, so `endpoint` is where it listens, as the tracker
    # hands it out. A peer that dialled us shows a port of its own choosing: it
    # is never judged (nor reported), and counts as one that may still serve.
    ours: bool = True


@dataclass(slots=True)
class _Watched:
    since: float | None  # when it began stalling (None: not stalling)
    mark: int  # bytes received at `since`
    reported: bool = False
    # Reported, and has sent no block nor stopped being asked since.
    stalling: bool = False
    wanted: bool = True


# Endpoints that refused or timed out our connection, remembered per download.
MAX_UNREACHABLE = 256


class StallWatch:
    def __init__(self, stall_s: float) -> None:
        if stall_s <= 0:
            raise ValueError("stall_s must be > 0")
        self._stall_s = stall_s
        self._peers: dict[tuple[str, int], _Watched] = {}
        self._alone_since: float | None = None  # since when no peer was in the samples
        self._alone_for = 0.0
        self._asked_at: float | None = None  # when `lonely` last said to ask again
        # endpoint → reported yet: peers the tracker named that we could not reach
        self._unreachable: dict[tuple[str, int], bool] = {}

    def unreachable(self, endpoint: tuple[str, int]) -> None:
        """Our connection to `endpoint` was refused or timed out."""
        if endpoint not in self._unreachable and len(self._unreachable) < MAX_UNREACHABLE:
            self._unreachable[endpoint] = False

    def observe(self, samples: list[PeerSample], now: float) -> list[tuple[str, int]]:
        """Feed one sample of every peer; returns those to report now (each once)."""
        if any(s.wanted for s in samples):
            self._alone_since, self._alone_for, self._asked_at = None, 0.0, None
        else:
            self._alone_since = now if self._alone_since is None else self._alone_since
            self._alone_for = now - self._alone_since
        seen = {s.endpoint for s in samples}
        for gone in [e for e in self._peers if e not in seen]:
            del self._peers[gone]
        due = []
        for e in seen:
            self._unreachable.pop(e, None)  # connected after all
        if self.alone_too_long():
            # Nobody to download from for a report period: the peers we could not
            # reach are as good as silent ones.
            due += [e for e, reported in self._unreachable.items() if not reported]
            self._unreachable = dict.fromkeys(self._unreachable, True)
        for s in samples:
            w = self._peers.get(s.endpoint)
            if w is None:
                w = self._peers[s.endpoint] = _Watched(None, s.received)
            w.wanted = s.wanted
            if not (s.asked and s.ours):
                w.since, w.stalling = None, False
                continue
            if w.since is None or s.received - w.mark >= BLOCK_BYTES:
                w.since, w.mark = now, s.received  # started waiting, or a block came
                w.stalling = False
                continue
            if now - w.since >= self._stall_s:
                w.stalling = True
                if not w.reported:
                    w.reported = True
                    due.append(s.endpoint)
        return due

    def unreport(self, endpoint: tuple[str, int]) -> None:
        """The report of `endpoint` did not reach the tracker: judge it afresh."""
        if endpoint in self._unreachable:
            self._unreachable[endpoint] = False
        w = self._peers.get(endpoint)
        if w is not None:
            w.since, w.stalling, w.reported = None, False, False

    def every_peer_stalls(self) -> bool:
        """Whether the last sample had peers with pieces we want and each stalls us, or
        it had none for a report period and we reported the ones we could not reach."""
        if self.alone_too_long():
            return any(self._unreachable.values())
        wanted = [w for w in self._peers.values() if w.wanted]
        return bool(wanted) and all(w.stalling for w in wanted)

    def alone_too_long(self) -> bool:
        """Whether the samples have had no peer with pieces we want for `stall_s`."""
        return self._alone_since is not None and self._alone_for >= self._stall_s

    def lonely(self, now: float) -> bool:
        """Whether to ask the tracker for peers again now: alone for `stall_s` with no
        peer to report (those handed out took our connection and closed it, as a
        full peer does), once per `stall_s` of it. Waiting would only run into the
        download's stall and an upstream copy; the tracker names others."""
        if not self.alone_too_long() or any(self._unreachable.values()):
            return False
        if self._asked_at is not None and now - self._asked_at < self._stall_s:
            return False
        self._asked_at = now
        return True


def compact(endpoint: tuple[str, int]) -> bytes:
    """The BEP 23/7 compact entry for an endpoint, as the tracker hands it out."""
    ip, port = endpoint
    if ip.startswith("::ffff:") and "." in ip:
        ip = ip[7:]
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    return socket.inet_pton(family, ip) + port.to_bytes(2, "big")
