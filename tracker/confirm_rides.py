"""Seed confirmations that ride the node's next lease request.

A node confirms each blob it took from peers and verified (`ConfirmSeed`), and
asks for a lease on each blob it needs: at 10,000 nodes pulling a 10-layer
image, 100,000 of each, and a confirmation costs the tracker's serving replica
as much as a lease request (docs/BENCHMARKS.md, "Confirmations riding lease
requests"). A client that pulls layers a few at a time (kubelet's three) asks
for its next one just after a layer is done, so the confirmation waits up to
`HOLD_S` for that request and goes in it (`LeaseRequest.confirm_digests` and
`confirm_hashes`); the tracker takes it before it looks at the lease, as it
would take the call, and the reply names it (`LeaseReply.confirmed`). A
confirmation no lease request took in time goes in a call of its own, and
every other confirmation waiting then rides that call (`ConfirmSeed`'s fields
of the same names; `SeedsConfirmed` names those taken): a pull's last layers
have no lease request left to ride, and finish within moments of each other.
One a reply does not name (an older tracker, a refusal) and one whose request
failed is sent alone, so `confirm` ends as the call did: the tracker took it,
or an error says why not. A tracker names the riders it took in every lease
reply, none or some; one whose replies name nothing (an older one) gets every
confirmation alone, at once.

Owns the confirmations waiting for a ride and their outcome; the client sends
them (tracker/client.py). It must not send anything itself but through the
`alone` call it was given.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from p2preg.core.digest import Digest

# How long a confirmation waits for a lease request to ride: a client asks for its
# next layer once it has read the last, which at LAN speed takes a fraction of this.
HOLD_S = 1.0


@dataclass(eq=False)
class Ride:
    digest: Digest
    info_hash: bytes
    boarded: trio.Event = field(default_factory=trio.Event)
    landed: trio.Event = field(default_factory=trio.Event)
    taken: bool = False


def riding(rides: list[Ride]) -> tuple[list[str] | None, list[bytes] | None]:
    """`rides` as a request carries them: its `confirm_digests` and `confirm_hashes`
    (None for none)."""
    return [str(r.digest) for r in rides] or None, [r.info_hash for r in rides] or None


# The call a confirmation makes without a lease request: it, with the riders it
# carries; the riders the tracker took (None: it names none, as an older one).
Alone = Callable[[Digest, bytes, list[Ride]], Awaitable[list[str] | None]]


class ConfirmRides:
    def __init__(self, alone: Alone, hold_s: float = HOLD_S) -> None:
        self._alone = alone
        self._hold_s = hold_s
        self._waiting: list[Ride] = []
        # Whether the tracker takes riders, from its last lease reply (None: none yet).
        self.taken_there: bool | None = None
        # Whether a confirmation alone carries the others waiting: not to a tracker
        # whose answer to one that did named none (an older one's empty 204).
        self._carry = True

    async def confirm(self, digest: Digest, info_hash: bytes) -> None:
        """Confirm with the next lease request if one goes within `hold_s`, else alone
        with every other confirmation waiting riding it; returns once the tracker took
        it (raises as the call alone would)."""
        if self.taken_there is False:  # an older tracker: nothing would take it
            await self._alone(digest, info_hash, [])
            return
        ride = Ride(digest, info_hash)
        self._waiting.append(ride)
        try:
            with trio.move_on_after(self._hold_s):
                await ride.boarded.wait()
        finally:
            if not ride.boarded.is_set():
                self._waiting.remove(ride)
        if ride.boarded.is_set():
            await ride.landed.wait()
            if ride.taken:
                return
            await self._alone(digest, info_hash, [])  # refused riding: learn why
            return
        riders, confirmed = self.board() if self._carry else [], None
        try:
            confirmed = await self._alone(digest, info_hash, riders)
            self._carry = confirmed is not None or not riders
        finally:
            self.land(riders, confirmed)

    def board(self) -> list[Ride]:
        """Every confirmation waiting, for the request about to go (a lease request, or
        a confirmation alone); none for an older tracker: they go alone as their hold
        ends."""
        if self.taken_there is False:
            return []
        rides, self._waiting = self._waiting, []
        for ride in rides:
            ride.boarded.set()
        return rides

    def replied(self, confirmed: list[str] | None) -> None:
        """A lease reply came: a tracker that names no riders (None) takes none."""
        self.taken_there = confirmed is not None

    @staticmethod
    def land(rides: list[Ride], confirmed: list[str] | None) -> None:
        """The request that carried `rides` is over: the tracker took those it names in
        `confirmed` (None: none, or no answer); the others go alone."""
        taken = set(confirmed or ())
        for ride in rides:
            ride.taken = str(ride.digest) in taken
            ride.landed.set()
