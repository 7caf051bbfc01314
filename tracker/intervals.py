"""How soon a peer is told to announce again, and how long it is kept meanwhile (sans-IO).

Owns the choice between the two cadences of an announce answer. A seeder the
tracker already holds as one (its identity's entry claimed `left=0` before)
is told `seeder_announce_interval_s`, jittered by ±`JITTER` per answer, and is
kept `seeder_ttl_s`; everyone else — a leecher, a `completed` announce, a
seeder the tracker has not seen yet (new, or back after a tracker restart) —
is told `announce_interval_s` and kept `peer_ttl_s`, as before. Long-time
seeders are nearly all of a big cluster's announces (every node seeds every
blob it holds), and nothing they say changes between two announces; leechers
and new seeders are the swarm's news and keep the short cadence. `stopped` is
the caller's (it drops the peer at once). The jitter source is injected, so
tests pin it; this module must not know peers, swarms or transports.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from tracker.announce import Event

# Each long answer is the interval x (1 ± JITTER), uniformly: seeders that
# announced together (a rollout's, a restarted cluster's) drift apart instead of
# arriving as one burst every interval.
JITTER = 0.10
# A seeder told the long interval is kept this many nominal intervals: past the
# latest jittered announce (1.1x), with 0.15x (270 s at 1800 s) for an announce
# that is late, or retried after a failure (libtorrent retries after seconds,
# backing off). Longer would only hand out a vanished seeder for longer
# (docs/TRACKER.md, "Announce load").
SEEDER_TTL_FACTOR = 1.25


@dataclass(frozen=True, slots=True)
class Cadence:
    """What one answer tells the peer (`interval_s`) and how long it is kept (`ttl_s`)."""

    interval_s: int
    ttl_s: float


class AnnounceIntervals:
    def __init__(
        self,
        *,
        interval_s: int,
        seeder_interval_s: int,
        peer_ttl_s: float,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        """`jitter()` returns a uniform number in [0, 1) (random.random's contract)."""
        if not 1 <= interval_s <= seeder_interval_s:
            raise ValueError("need 1 ≤ interval_s ≤ seeder_interval_s")
        if peer_ttl_s <= interval_s:
            raise ValueError("peer_ttl_s must exceed interval_s")
        self.short = Cadence(interval_s, peer_ttl_s)
        self.seeder_interval_s = seeder_interval_s
        # Never shorter than a leecher's: a seeder is not dropped sooner.
        self.seeder_ttl_s = max(peer_ttl_s, SEEDER_TTL_FACTOR * seeder_interval_s)
        self._jitter = jitter

    def bounds(self) -> tuple[int, int]:
        """The shortest and longest interval a known seeder may be told."""
        if self.seeder_interval_s == self.short.interval_s:
            return self.short.interval_s, self.short.interval_s
        return self._jittered(0.0), self._jittered(1.0)

    def choose(self, *, seeding: bool, event: Event, known_seeder: bool) -> Cadence:
        """The cadence of an answer: `seeding` is the announce's `left=0`,
        `known_seeder` whether the identity's entry claimed it before this one."""
        if not seeding or event is Event.COMPLETED or not known_seeder:
            return self.short
        if self.seeder_interval_s == self.short.interval_s:
            return self.short  # one interval for everyone, as configured
        return Cadence(self._jittered(self._jitter()), self.seeder_ttl_s)

    def _jittered(self, u: float) -> int:
        spread = self.seeder_interval_s * JITTER * (2.0 * u - 1.0)
        # Whole seconds on the wire; never below the leechers' interval.
        return max(self.short.interval_s, round(self.seeder_interval_s + spread))
