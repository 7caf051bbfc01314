"""Which relayed announces are seeder refreshes the relay may answer itself (sans-IO).

In steady state a node's announces are its seeders' periodic re-announces, about
500 blobs / 1800 s = 0.28/s: forwarded one by one, each is a batch of one, the
costliest kind for the tracker (docs/TRACKER.md, "Announce relay"). A refresh —
`left=0`, no `event`, for a torrent whose last forwarded announce the tracker
answered as a seeder — changes nothing the node needs to hear back: a seeder
wants no peers, and the interval is the one the tracker gave last time. So the
relay answers it at once with that interval and no peers, and queues it; queued
refreshes go to the tracker together every REFRESH_S, or with the next ordinary
batch. Everything else goes through as before.

A refresh reaches the tracker at most REFRESH_S late; the tracker keeps a seeder
1.25 x its interval (2250 s for 1800 s ±10 %), so even the earliest jittered re-
announce lands well within the window. A tracker that gives a seeder an interval
under HOLD_MIN_INTERVALS x REFRESH_S (one configured for short intervals) may
drop it before a held refresh arrives: those go through at once. A refresh the
tracker could not take is retried with later batches, REFRESH_TRIES times in
all; then the torrent is no longer "known as a seeder", and the relay asks the
swarm to announce it now, which goes through as an ordinary announce: libtorrent
gets the tracker's answer or the failure, and its own retry takes over. A
refresh answered with a failure reason also drops the torrent, so its next
announce goes through too.

Owns that bookkeeping only; the relay does the sockets and the sending.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import unquote_to_bytes

import libtorrent as lt

# Queued refreshes go to the tracker at least this often ...
REFRESH_S = 30.0
# ... at most this many a request (the tracker takes up to 128 announces a batch) ...
REFRESH_MAX = 128
# ... and each is tried with this many batches before the relay gives up on it.
REFRESH_TRIES = 8
# Only refreshes whose interval is at least this many times REFRESH_S are held.
HOLD_MIN_INTERVALS = 3


@dataclass(frozen=True, slots=True)
class Fields:
    info_hash: bytes
    left: bytes | None
    event: bytes


def fields(query: bytes) -> Fields:
    """The parts of an announce query that say whether it is a refresh."""
    info_hash, left, event = b"", None, b""
    for part in query.split(b"&"):
        key, _, value = part.partition(b"=")
        if key == b"info_hash":
            info_hash = unquote_to_bytes(value)
        elif key == b"left":
            left = value
        elif key == b"event":
            event = value
    return Fields(info_hash, left, event)


def _seeding_interval(body: bytes) -> int | None:
    """The interval of a successful tracker answer, else None (a failure, unreadable)."""
    try:
        doc: Any = lt.bdecode(body)
    except RuntimeError:
        return None
    if not isinstance(doc, dict) or b"failure reason" in doc:
        return None
    interval = doc.get(b"interval")
    return interval if isinstance(interval, int) and interval > 0 else None


@dataclass(slots=True)
class Pending:
    info_hash: bytes
    query: bytes
    tries: int = 0


class Refreshes:
    """The torrents known as seeders (with their last interval) and the queued refreshes."""

    def __init__(self, tries: int = REFRESH_TRIES, refresh_s: float = REFRESH_S) -> None:
        self._tries = tries
        self._min_interval = HOLD_MIN_INTERVALS * refresh_s
        self._seeding: dict[bytes, int] = {}
        self._pending: dict[bytes, Pending] = {}  # one per torrent: the newest

    def __len__(self) -> int:
        return len(self._pending)

    def hold(self, query: bytes) -> bytes | None:
        """The relay's own answer to a refresh it queues, or None: forward it."""
        f = fields(query)
        interval = self._seeding.get(f.info_hash)
        if interval is None or interval < self._min_interval or f.left != b"0" or f.event:
            return None
        old = self._pending.get(f.info_hash)
        self._pending[f.info_hash] = Pending(f.info_hash, query, old.tries if old else 0)
        return lt.bencode(cast(Any, {b"interval": interval, b"peers": b""}))

    def forwarding(self, query: bytes) -> bytes:
        """An ordinary announce goes through: it stands for the torrent's queued refresh,
        which must not reach the tracker after it (a refresh after `stopped`). Its
        torrent's info-hash."""
        info_hash = fields(query).info_hash
        self._pending.pop(info_hash, None)
        return info_hash

    def learn(self, query: bytes, body: bytes) -> None:
        """What the tracker's answer to a forwarded announce says about its torrent."""
        f = fields(query)
        interval = _seeding_interval(body)
        if interval is None or f.left != b"0" or f.event == b"stopped":
            self._seeding.pop(f.info_hash, None)
            self._pending.pop(f.info_hash, None)  # a newer announce went through
        else:
            self._seeding[f.info_hash] = interval

    def take(self, n: int) -> list[Pending]:
        """Up to `n` queued refreshes, oldest first, off the queue."""
        taken = [self._pending[h] for h in list(self._pending)[: max(n, 0)]]
        for p in taken:
            del self._pending[p.info_hash]
        return taken

    def settled(self, p: Pending, body: bytes) -> None:
        """The tracker answered a queued refresh."""
        if p.info_hash in self._pending:
            return  # a newer refresh is queued; it will say the same
        self.learn(p.query, body)

    def failed(self, p: Pending) -> bool:
        """No tracker took a queued refresh: queue it again, or give it up (True)."""
        if p.info_hash in self._pending or p.info_hash not in self._seeding:
            return False  # superseded, or the torrent went through since
        if p.tries + 1 < self._tries:
            self._pending[p.info_hash] = Pending(p.info_hash, p.query, p.tries + 1)
            return False
        del self._seeding[p.info_hash]
        return True
