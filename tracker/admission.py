"""Swarm admission: who counts as a seeder, and which peers are not handed out.

Owns three rules of issue 13 that keep one identity from faking or stalling a
swarm, as a sans-IO state machine over a clock:

- *who an announce is*: `announce_identity` — the client certificate's node
  under mutual TLS; else the node name the announce asserts (`node=`, token or
  insecure mode); else its address. PeerTable keeps one peer per identity.
- *confirmed seeders*: a `left=0` announce alone is a claim. An identity counts
  as a seeder of a digest only if it published the digest's current torrent or
  confirmed it (told the tracker it downloaded and verified the blob). A
  confirmation names the info-hash it confirms, so a replaced torrent (a bad
  report, a CA rotation) starts with nobody confirmed.
- *stall reports*: a downloader reports a peer that, unchoked and asked, sent
  no block for its stall time. A peer reported by at least
  `stall_reporters` distinct identities within `stall_window_s` cools off for
  `stall_cooloff_s`: it is not handed out and not counted as a seeder. Reports
  expire; nobody can delist a peer alone, nor report itself.

Everything it holds is bounded by `max_entries` (LimitReached past it) and
swept as time passes. It must not know peers' addresses (PeerTable does) or
requests, and holds no I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from p2preg.core.errors import LimitReached


def announce_identity(certificate: str | None, asserted: str | None, address: str) -> str:
    """Who an announce is: the certificate's node, else the asserted name, else the address."""
    if certificate is not None:
        return certificate  # under mutual TLS a `node=` claim is never read
    if asserted:
        return asserted
    return address


@dataclass
class _Reports:
    """Stall reports against one peer of one swarm: reporter → when."""

    by: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StallVerdict:
    """What one stall report did: counted (not a duplicate or a self-report), delisted."""

    counted: bool
    delisted: bool


class Admission:
    def __init__(
        self,
        *,
        stall_window_s: float,
        stall_cooloff_s: float,
        stall_reporters: int,
        max_entries: int,
        clock: Callable[[], float],
    ) -> None:
        if stall_reporters < 2:
            raise ValueError("stall_reporters must be at least 2: nobody delists a peer alone")
        self._window = stall_window_s
        self._cooloff = stall_cooloff_s
        self._reporters = stall_reporters
        self._max = max_entries
        self._clock = clock
        # digest → (info-hash confirmed, identities that confirmed it)
        self._confirmed: dict[str, tuple[bytes, set[str]]] = {}
        self._reports: dict[tuple[str, str], _Reports] = {}
        # (digest, identity) → when its cooling-off ends
        self._cooling: dict[tuple[str, str], float] = {}
        self._entries = 0
        self.delisted = 0

    @property
    def entries(self) -> int:
        """Confirmations and stall reports held: what counts against `max_entries`."""
        return self._entries

    # -- confirmed seeders -------------------------------------------------------

    def confirm(self, digest: str, info_hash: bytes, identity: str) -> bool:
        """Record that `identity` verified the blob of torrent `info_hash`; True if new."""
        held = self._confirmed.get(digest)
        if held is None or held[0] != info_hash:
            if held is not None:
                self._entries -= len(held[1])
            held = self._confirmed[digest] = (info_hash, set())
        if identity in held[1]:
            return False
        self._room()
        held[1].add(identity)
        self._entries += 1
        return True

    def is_seeder(self, digest: str, info_hash: bytes, identity: str, publisher: str) -> bool:
        """May `identity`'s `left=0` announce count as a seeder of `digest` now?"""
        if self.cooling(digest, identity):
            return False
        if identity == publisher:
            return True
        held = self._confirmed.get(digest)
        return held is not None and held[0] == info_hash and identity in held[1]

    def forget(self, digest: str) -> None:
        """The digest's torrent is gone or replaced: its confirmations and reports go too."""
        held = self._confirmed.pop(digest, None)
        if held is not None:
            self._entries -= len(held[1])
        for key in [k for k in self._reports if k[0] == digest]:
            self._entries -= len(self._reports.pop(key).by)

    # -- stall reports -----------------------------------------------------------

    def report_stall(self, digest: str, target: str, reporter: str) -> StallVerdict:
        """`reporter` says `target`'s peer stalled it in `digest`'s swarm."""
        if target == reporter or self.cooling(digest, target):
            return StallVerdict(False, False)
        now = self._clock()
        reports = self._reports.get((digest, target))
        if reports is None:
            reports = self._reports[(digest, target)] = _Reports()
        self._drop_old(reports, now)
        fresh = reporter not in reports.by
        if fresh:
            self._room()
            self._entries += 1
        reports.by[reporter] = now
        if len(reports.by) < self._reporters:
            return StallVerdict(fresh, False)
        self._entries -= len(self._reports.pop((digest, target)).by)
        self._cooling[(digest, target)] = now + self._cooloff
        self.delisted += 1
        return StallVerdict(fresh, True)

    def reported(self, digest: str, target: str, reporter: str) -> bool:
        """Whether `reporter` said, within the window, that `target` stalls it."""
        reports = self._reports.get((digest, target))
        at = None if reports is None else reports.by.get(reporter)
        return at is not None and self._clock() - at <= self._window

    def cooling(self, digest: str, identity: str) -> bool:
        until = self._cooling.get((digest, identity))
        if until is None:
            return False
        if until <= self._clock():
            del self._cooling[(digest, identity)]
            return False
        return True

    def cooling_count(self) -> int:
        return len(self._cooling)

    # -- housekeeping ------------------------------------------------------------

    def sweep(self) -> None:
        """Drop expired reports and finished cooling-off periods."""
        now = self._clock()
        for key, reports in list(self._reports.items()):
            self._drop_old(reports, now)
            if not reports.by:
                del self._reports[key]
        for key, until in list(self._cooling.items()):
            if until <= now:
                del self._cooling[key]

    def _drop_old(self, reports: _Reports, now: float) -> None:
        old = [who for who, at in reports.by.items() if now - at > self._window]
        for who in old:
            del reports.by[who]
        self._entries -= len(old)

    def _room(self) -> None:
        if self._entries >= self._max:
            self.sweep()
            if self._entries >= self._max:
                raise LimitReached("the tracker's admission records are full")
