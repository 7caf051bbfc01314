"""The simulated tracker: the real lease book, upstream queue, peer table and hand-out policy.

`SimTracker` does what tracker/lease_desk.py's `LeaseDesk` does for lease
requests and what tracker/swarms.py does for announces, step for step, but
over the simulator's clock and its event queue instead of trio: a lease
request is decided by `UpstreamQueue.check` and `LeaseBook.acquire`, its reply
made by tracker/lease_replies.py, and a request told to wait is held (a long
poll) until its deadline, its `wake_at`, or a notification of its digest
(a first seeder, a released, expired or silent lease, a freed slot of its
image); a woken request costs the serving replica its answer, or its return to
waiting, and is answered when that work is done (`woken`). Peers
live in the real `PeerTable`; answers come from `hand_out` (policy "real") or
a uniform pick (policy "random"). It counts what reaches the tracker. It does
not model disputes, quotas, admission or stall reports (every seeder is
counted at once), and must not touch nodes' transfers: replies go back through
the `deliver` callback.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from p2preg.core import wire
from p2preg.core.errors import LeaseLost
from tracker import lease_replies as replies
from tracker.admission import Admission
from tracker.config import TrackerConfig
from tracker.handout import hand_out
from tracker.leases import Granted, Lease, LeaseBook, RateRule
from tracker.peers import PeerTable
from tracker.upstream_queue import Place, UpstreamQueue

GROUP = "image"  # the one manifest every node pulls
SWEEP_S = 5.0  # coordinator.MAX_SWEEP_INTERVAL_S with the default TTLs

Schedule = Callable[[float, Callable[[], None]], None]


def compact(node: int) -> bytes:
    """A node's BEP 23 entry: 198.18.0.0/15 address plus port, unique per node."""
    return bytes([198, 18 + (node >> 16), (node >> 8) & 0xFF, node & 0xFF, 0x1A, 0xE1])


def node_of(entry: bytes) -> int:
    return ((entry[1] - 18) << 16) | (entry[2] << 8) | entry[3]


@dataclass(eq=False)
class Poll:
    """One lease request held open at the tracker."""

    node: int
    digest: str
    order: int
    size: int
    deadline: float
    queued: bool = False
    version: int = 0
    done: bool = False

    @property
    def place(self) -> Place:
        return Place(self.order, self.digest, str(self.node))


@dataclass
class Counts:
    """What reached the tracker, and when (whole seconds → count)."""

    announces: dict[int, int] = field(default_factory=dict)
    lease_asks: dict[int, int] = field(default_factory=dict)
    renewals: int = 0
    releases: int = 0
    publishes: int = 0
    wakeups: int = 0
    confirms: int = 0  # seed confirmations after a download from peers
    entered: int = 0  # peers a control call entered in a swarm, no announce
    riding: int = 0  # of `confirms`, those a lease request carried
    stall_reports: int = 0  # peers reported for stalling a download (dead ones)

    @staticmethod
    def tick(hist: dict[int, int], now: float) -> None:
        second = int(now)
        hist[second] = hist.get(second, 0) + 1


class SimTracker:
    def __init__(
        self,
        ttl_s: float,
        wait_max_s: float,
        rate: RateRule,
        fetches_per_image: int,
        peer_ttl_s: float,
        numwant: int,
        policy: str,
        clock: Callable[[], float],
        rng: random.Random,
        schedule: Schedule,
        deliver: Callable[[Poll, wire.LeaseReply], None],
        silence_s: float = 0.0,
        handoff_s: float = 0.0,
        grant_ack_s: float = 0.0,
        lag: Callable[[], float] = lambda: 0.0,
        woken: Callable[[int, bool], float] | None = None,
    ) -> None:
        ids = itertools.count()
        self.leases = LeaseBook(
            ttl_s, clock, lambda: f"lease-{next(ids)}", rate=rate, silence_s=silence_s,
            grant_ack_s=grant_ack_s, lag=lag,
        )
        self.queue = UpstreamQueue(fetches_per_image, clock, handoff_s=handoff_s)
        self.peers = PeerTable(max_peers_per_swarm=1 << 30, max_peers=1 << 40)
        defaults = TrackerConfig()
        self.admission = Admission(
            stall_window_s=defaults.stall_window_s, stall_cooloff_s=defaults.stall_cooloff_s,
            stall_reporters=defaults.stall_reporters, max_entries=1 << 40, clock=clock,
        )
        self._wait_max_s = wait_max_s
        self._peer_ttl_s = peer_ttl_s
        self._numwant = numwant
        self._policy = policy
        self._clock = clock
        self._rng = rng
        self._schedule = schedule
        self._deliver = deliver
        # The serving replica's work for a woken request, answered or sent back to
        # wait: when it is done (server.TrackerServers.woken; None: at once).
        self._woken = woken or (lambda node, answered: clock())
        self.published: set[str] = set()
        # Held requests per digest (a dict: ordered, and O(1) to drop one).
        self._polls: dict[str, dict[Poll, None]] = {}
        self.counts = Counts()

    # -- leases (lease_desk.LeaseDesk.acquire / _try_acquire) ---------------------

    def ask(self, node: int, digest: str, order: int, size: int, wait_s: float) -> None:
        now = self._clock()
        Counts.tick(self.counts.lease_asks, now)
        deadline = now + min(max(0.0, wait_s), self._wait_max_s)
        self._attempt(Poll(node, digest, order, size, deadline))

    def _attempt(self, poll: Poll, *, woken: bool = False) -> None:
        """Decide `poll` now; a `woken` one (by news or its own time) costs the
        serving replica its answer, or its return to waiting, on top of its arrival."""
        if poll.done:
            return
        now = self._clock()
        place = poll.place
        reply, wake_at, queued = self._decide(poll.digest, poll.size, place)
        if wake_at is None or now >= poll.deadline:
            self._finish(poll)
            if woken:
                self._schedule(self._woken(poll.node, True), lambda: self._deliver(poll, reply))
            else:
                self._deliver(poll, reply)
            return
        if woken:
            self._woken(poll.node, False)
        if queued != poll.queued:
            poll.queued = queued
            if queued:
                self.queue.enter(GROUP, place)
            else:
                self._leave_queue(place)
        self._polls.setdefault(poll.digest, {})[poll] = None
        poll.version += 1
        version = poll.version

        def wake() -> None:
            if poll.version == version:
                self._attempt(poll, woken=True)

        self._schedule(min(poll.deadline, wake_at), wake)

    def _decide(
        self, digest: str, size: int, place: Place
    ) -> tuple[wire.LeaseReply, float | None, bool]:
        now = self._clock()
        if digest in self.published:
            self.peers.expire_swarm(digest, now)
            if self._seeded_for(digest, place.node):
                return wire.LeaseReply(wire.LeaseStatus.SEEDED, metainfo=b"m"), None, False
        if self.leases.current(digest) is None:
            waiting = self.queue.check(GROUP, place, self.leases.fetching(GROUP))
            if waiting is not None:
                return replies.queued(self.leases, waiting, now), waiting.wake_at, True
        outcome = self.leases.acquire(digest, place.node, size, GROUP)
        if isinstance(outcome, Granted):
            self.queue.granted(GROUP, place.node)
            return replies.granted(self.leases, outcome.lease, outcome.replaced), None, False
        lease = outcome.lease
        return replies.held(self.leases, lease, now), lease.expires_at, False

    def _seeded_for(self, digest: str, node: str) -> bool:
        """lease_desk.LeaseDesk._seeded_for: a seeder `node` has not reported stalling it."""
        return any(not self.admission.reported(digest, seeder, node)
                   for seeder in self.peers.seeder_identities(digest))  # fmt: skip

    def _finish(self, poll: Poll) -> None:
        poll.done = True
        if poll.queued:
            self._leave_queue(poll.place)
        waiting = self._polls.get(poll.digest)
        if waiting is not None:
            waiting.pop(poll, None)

    def notify(self, digest: str) -> None:
        """Wake every request held for `digest`, in a random order (as trio might)."""
        waiting = list(self._polls.get(digest, ()))
        self._rng.shuffle(waiting)
        self.counts.wakeups += len(waiting)
        for poll in waiting:
            poll.version += 1
            self._attempt(poll, woken=True)

    def _leave_queue(self, place: Place) -> None:
        """LeaseDesk._leave_queue: the blob moved up looks again, once this poll is done."""
        if self.queue.leave(GROUP, place):
            self._schedule(self._clock(), lambda: self._wake_next(GROUP))

    def _free_slot(self, lease: Lease) -> None:
        self._wake_next(lease.group)

    def _wake_next(self, group: str | None) -> None:
        for digest in self.queue.next_up(group):
            self.notify(digest)

    def renew(self, digest: str, lease_id: str, done: int, size: int, node: int) -> bool:
        """The holder's progress; False if its lease is lost (it finishes anyway)."""
        self.counts.renewals += 1
        before = self.leases.current(digest)
        try:
            lease = self.leases.renew(digest, lease_id, done, size, holder=str(node))
        except LeaseLost:
            return False
        if self.queue.renewed(before, lease):
            self._free_slot(lease)
        if lease.slow and before is not None and not before.slow:
            self.notify(digest)
        return True

    def release(self, digest: str, lease_id: str, node: int) -> None:
        self.counts.releases += 1
        lease = self.leases.release(digest, lease_id, holder=str(node))
        if lease is not None:
            self.notify(digest)
            self._free_slot(lease)

    def wake_silent(self) -> None:
        """LeaseDesk.wake_silent: a silent holder's waiters and image queue move on."""
        for lease in self.leases.turned_silent():
            self.notify(lease.digest)
            self._free_slot(lease)

    def sweep(self) -> None:
        now = self._clock()
        swarms = self.peers.keys()  # a snapshot: expiry may drop swarms
        for key in swarms:
            self.peers.expire_swarm(key, now)
        for lease in self.leases.expire():
            self.notify(lease.digest)
            self._free_slot(lease)

    # -- metainfo and announces (swarms.announce) -----------------------------------

    def report_stall(self, node: int, digest: str, peer: int) -> None:
        """swarms.Swarms.report_stall: enough identities' reports delist the peer."""
        self.counts.stall_reports += 1
        if self.peers.peer(digest, str(peer)) is None:
            return  # gone from the swarm: the tracker's unknown_peer
        if self.admission.report_stall(digest, str(peer), str(node)).delisted:
            self.peers.remove(digest, str(peer))

    def publish(self, digest: str) -> None:
        self.counts.publishes += 1
        self.published.add(digest)

    def confirm(self, node: int, digest: str, *, enter: bool) -> None:
        """`node` verified what it downloaded; with `enter`, that enters it as a seeder."""
        self.counts.confirms += 1
        if enter:
            self.announce(node, digest, True, entered=True)

    def announce(self, node: int, digest: str, seeder: bool, *, entered: bool = False) -> list[int]:
        """`node` announces (left=0 when `seeder`); the peers it is handed. `entered`:
        a control call does what the announce would (Swarms.enter), and no announce
        reaches the tracker."""
        now = self._clock()
        if entered:
            self.counts.entered += 1
        else:
            Counts.tick(self.counts.announces, now)
        me = compact(node)
        if self.admission.cooling(digest, str(node)):  # delisted: answered, not entered
            cooling = self.peers.swarm(digest)
            if cooling is None:
                return []
            swarm = cooling
        else:
            swarm, _, _ = self.peers.update(
                digest, str(node), me, me, seeder=seeder, claims_seed=seeder,
                expires_at=now + self._peer_ttl_s,
            )
            if seeder and len(swarm.seeders) == 1:
                self.notify(digest)
        if self._policy == "real":
            picked = hand_out(
                swarm.seeder_addrs, swarm.leecher_addrs, self._numwant,
                asker=me, asker_is_seeder=seeder, rng=self._rng,
            )
        else:
            picked = self._uniform(swarm.seeder_addrs, swarm.leecher_addrs, me)
        return [node_of(p) for p in picked]

    def _uniform(self, seeders: list[bytes], leechers: list[bytes], me: bytes) -> list[bytes]:
        """Up to numwant peers drawn uniformly from the whole swarm, the asker left out."""
        n = len(seeders) + len(leechers)
        picks = self._rng.sample(range(n), min(self._numwant + 1, n))
        chosen = [seeders[i] if i < len(seeders) else leechers[i - len(seeders)] for i in picks]
        return [p for p in chosen if p != me][: self._numwant]
