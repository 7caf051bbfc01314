"""Who gets whom: the peer hand-out policy, as a pure function.

Seeders first, then downloaders, random within each, never the asker itself;
a seeder gets downloaders only: it connects to them at once rather than
waiting for their next announce (a minute) to bring them to it. Randomness is cheap on
purpose (py-spy put `random.sample` at a quarter of an announce): the swarm
keeps each group in uniformly random order (peers.py inserts every newcomer at
a random position), so a window at a random offset is a random pick, taken
with one slice — as opentracker does. Owns nothing else: it does not know
addresses, expiry or limits, and must stay free of I/O so it is tested with
plain lists.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def window(group: Sequence[T], k: int, rng: random.Random | None = None) -> list[T]:
    """`k` consecutive members of `group` from a random offset, wrapping around."""
    n = len(group)
    if k <= 0 or n == 0:
        return []
    start = (rng or random).randrange(n)
    if k >= n:
        return [*group[start:], *group[:start]]
    end = start + k
    if end <= n:
        return list(group[start:end])
    return [*group[start:], *group[: end - n]]


def hand_out(
    seeders: Sequence[T],
    leechers: Sequence[T],
    numwant: int,
    *,
    asker: T | None = None,
    asker_is_seeder: bool = False,
    rng: random.Random | None = None,
) -> list[T]:
    """Up to `numwant` peers for `asker`, best sources first."""
    if numwant <= 0:
        return []
    picked = [] if asker_is_seeder else window(seeders, numwant, rng)
    wanted = numwant - len(picked)
    if wanted:
        # One extra so that dropping the asker still leaves `wanted` peers.
        others = window(leechers, wanted + 1, rng)
        if asker is not None and asker in others:
            others.remove(asker)
        picked.extend(others[:wanted])
    return picked
