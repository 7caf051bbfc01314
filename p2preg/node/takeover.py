"""After the node's tracker moved, announce again what the one it left may have lost.

A tracker replica writes the peers that announce to it a moment later
(tracker/replica.py); one killed in between takes those announces with it,
and libtorrent announces a seeding torrent again only at its interval (up to
1980 s), a download only after backing off from the failed trackers. So when
the node's control client moves on to another tracker (`Moves.note`, its
failover callback), `reannounce_after_moves` announces every download and
every torrent added or seeding lately again, a few times over the next
seconds, as a takeover takes about a term (6 s by default): the swarms the
next replica hands out then hold this node again. Moves before a round
starts make that one round; moves during it, one more. This module owns only
that timing; the swarm announces (swarm.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

log = logging.getLogger(__name__)

# When to announce again after a move (a standby takes over within about a term).
REANNOUNCE_AFTER_S = (2.0, 5.0, 10.0)
# A torrent added or seeding this recently may be what the last tracker lost.
RECENT_S = 120.0


class Moves:
    """The tracker client's failover callback sets it; `reannounce_after_moves` waits on it."""

    def __init__(self) -> None:
        self.moved = trio.Event()

    def note(self) -> None:
        self.moved.set()


async def reannounce_after_moves(moves: Moves, reannounce: Callable[[float], int]) -> None:
    """For good: after each move (or burst of them), announce again at REANNOUNCE_AFTER_S."""
    while True:
        await moves.moved.wait()
        moves.moved = trio.Event()  # a move during this round starts the next one
        start = trio.current_time()
        for n, after in enumerate(REANNOUNCE_AFTER_S):
            await trio.sleep_until(start + after)
            count = reannounce(RECENT_S)
            if n == 0:
                log.info("tracker moved: announced %d torrents again (and at %s s)", count,
                         ", ".join(f"{a:g}" for a in REANNOUNCE_AFTER_S[1:]))  # fmt: skip
