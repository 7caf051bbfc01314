"""Which peer stalls a download: unchoked us, was asked, and sent no block for a set time.

Owns the node's side of issue 13's stall reports, as a sans-IO state machine
over samples of one torrent's peers (swarm.py takes them from libtorrent's
`peer_info` while a download runs): a peer is *stalling* while it has us
unchoked and holds requests of ours, and it has sent less than one block
(16 KiB) since that began. A peer that stays stalling for `stall_s` is
reported, once per download. A slow peer that does deliver — a block per
`stall_s` — is never reported, nor one that chokes us (that is BitTorrent's
normal flow control). Memory is bounded by the peers of the samples: a peer
missing from a sample is forgotten. It must not talk to libtorrent or the
tracker.
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


@dataclass(slots=True)
class _Watched:
    since: float | None  # when it began stalling (None: not stalling)
    mark: int  # bytes received at `since`
    reported: bool = False


class StallWatch:
    def __init__(self, stall_s: float) -> None:
        if stall_s <= 0:
            raise ValueError("stall_s must be > 0")
        self._stall_s = stall_s
        self._peers: dict[tuple[str, int], _Watched] = {}

    def observe(self, samples: list[PeerSample], now: float) -> list[tuple[str, int]]:
        """Feed one sample of every peer; returns those to report now (each once)."""
        seen = {s.endpoint for s in samples}
        for gone in [e for e in self._peers if e not in seen]:
            del self._peers[gone]
        due = []
        for s in samples:
            w = self._peers.get(s.endpoint)
            if w is None:
                w = self._peers[s.endpoint] = _Watched(None, s.received)
            if not s.asked:
                w.since = None
                continue
            if w.since is None or s.received - w.mark >= BLOCK_BYTES:
                w.since, w.mark = now, s.received  # started waiting, or a block came
                continue
            if not w.reported and now - w.since >= self._stall_s:
                w.reported = True
                due.append(s.endpoint)
        return due


def compact(endpoint: tuple[str, int]) -> bytes:
    """The BEP 23/7 compact entry for an endpoint, as the tracker hands it out."""
    ip, port = endpoint
    if ip.startswith("::ffff:") and "." in ip:
        ip = ip[7:]
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    return socket.inet_pton(family, ip) + port.to_bytes(2, "big")
