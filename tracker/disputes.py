"""Who may define a digest's torrent, disputes over it settled by verification, quarantines.

Owns the rules of issue 13's first item, as pure functions and one small book
over a clock: the first torrent of a digest is defined only by the identity
holding its upstream lease (it fetched the bytes and checked them against the
digest); a report that the stored torrent is bad opens a `Dispute` (the stored
torrent and the reporter's side by side) instead of replacing it; the dispute
is settled by `settle`, from the torrent a third identity — neither the
publisher nor the reporter, holding the digest's lease, which the tracker
answered VERIFY — made from bytes it fetched from upstream; the author of a
torrent that lost is quarantined (`Quarantines`) for a while, then may define
torrents again. A torrent rooted at another CA than the verified one is not
evidence of anything (a CA rotation), so it quarantines nobody. This module does
no I/O and keeps no torrents (registry.py does) and no leases (leases.py does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from p2preg.core.errors import Forbidden
from p2preg.core.metainfo import Metainfo

# Labels of p2preg_tracker_disputes_total: a dispute opened, then settled one way.
OPENED = "opened"
UPHELD = "upheld"  # the stored torrent was right; the reporter's lost
OVERTURNED = "overturned"  # the reporter's torrent was right; the stored one lost
REPLACED = "replaced"  # neither was the verified one: the verifier's is stored
OUTCOMES = (OPENED, UPHELD, OVERTURNED, REPLACED)


@dataclass(frozen=True, slots=True)
class Dispute:
    """The stored torrent of a digest (by `published_by`) challenged by `challenger`."""

    challenger: Metainfo
    reported_by: str
    reason: str
    published_by: str
    opened_at_unix: float

    def party(self, identity: str) -> bool:
        """`identity` is a side of the dispute, so its fetch cannot settle it."""
        return identity in (self.published_by, self.reported_by)


@dataclass(frozen=True, slots=True)
class Settlement:
    """What a verified torrent decides: the torrent stored from now on, and who lost."""

    outcome: str
    winner: Metainfo
    author: str
    losers: tuple[str, ...]
    # The stored torrent changes (the old one's swarm and info-hashes go).
    changed: bool


def settle(stored: Metainfo, dispute: Dispute, verified: Metainfo, verifier: str) -> Settlement:
    """Settle `dispute` over `stored` with `verified`, made by `verifier` from upstream bytes.

    Every honest node makes the same torrent for the same blob and root, so a
    candidate differs from `verified` only if it is wrong — or rooted at
    another CA, which is a rotation, not a lie, and costs its author nothing.
    """

    def lost(candidate: Metainfo, author: str) -> tuple[str, ...]:
        wrong = candidate.info_hash_v2 != verified.info_hash_v2
        return (author,) if wrong and candidate.root_cert == verified.root_cert else ()

    challenger, reporter, publisher = dispute.challenger, dispute.reported_by, dispute.published_by
    if verified.info_hash_v2 == stored.info_hash_v2:
        return Settlement(UPHELD, stored, publisher, lost(challenger, reporter), False)
    if verified.info_hash_v2 == challenger.info_hash_v2:
        return Settlement(OVERTURNED, challenger, reporter, lost(stored, publisher), True)
    losers = lost(stored, publisher) + lost(challenger, reporter)
    return Settlement(REPLACED, verified, verifier, losers, True)


def check_definer(digest: str, identity: str, lease_holder: str | None) -> None:
    """Only the identity holding `digest`'s upstream lease defines its first torrent."""
    if lease_holder != identity:
        raise Forbidden(
            f"only the holder of the upstream lease on {digest} may publish its first "
            f"torrent, and {identity[:128]!r} does not hold it"
        )


def verifier_of(dispute: Dispute | None, identity: str, lease_holder: str | None) -> str | None:
    """`identity` if its publish settles `dispute`: it holds the lease and is no party."""
    if dispute is None or lease_holder != identity or dispute.party(identity):
        return None
    return identity


class Quarantines:
    """Identities whose torrent lost a dispute, until when (the injected clock's time)."""

    def __init__(self, period_s: float, clock: Callable[[], float]) -> None:
        self.period_s = period_s
        self._clock = clock
        self._until: dict[str, tuple[float, str]] = {}

    def __len__(self) -> int:
        return len(self._until)

    def until(self, identity: str) -> float | None:
        """When `identity`'s quarantine ends; None if it is not (or no longer) in one."""
        found = self._until.get(identity)
        if found is None:
            return None
        if found[0] <= self._clock():
            del self._until[identity]
            return None
        return found[0]

    def add(self, identity: str, digest: str, until: float | None = None) -> float:
        """Quarantine `identity` (for losing the dispute over `digest`); returns the end."""
        end = self._clock() + self.period_s if until is None else until
        self._until[identity] = (end, digest)
        return end

    def check(self, identity: str, doing: str) -> None:
        """Raise Forbidden while `identity` is quarantined."""
        end = self.until(identity)
        if end is not None:
            digest = self._until[identity][1]
            left = end - self._clock()
            raise Forbidden(
                f"{identity[:128]!r} may not {doing} for {left:.0f} s more: its torrent "
                f"for {digest} lost a dispute"
            )

    def expire(self) -> list[str]:
        """Drop every quarantine that has ended; return the identities."""
        now = self._clock()
        done = [who for who, (end, _) in self._until.items() if end <= now]
        for who in done:
            del self._until[who]
        return done
