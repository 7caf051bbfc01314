"""One simulated pull: N nodes pull one image at once, and what follows.

Owns the nodes' behaviour. A node's client asks for the image's layers in
order, `client_downloads` at a time (kubelet's containerd fetches 3; 0: all
at once, as `ctr images pull`), the next as soon as one is in. Each
(node, layer) asked for waits for its lease with the
node's real `LeaseWait` (p2preg/node/leasewait.py) over `SimTracker`'s
replies: SEEDED joins the swarm (announce, connect to the peers handed out,
re-announce every interval); GRANTED fetches the layer from upstream, renewing
the lease at once (the grant's acknowledgement) and then every third of
`lease_silence_s` with its progress until it releases it, reports the last
byte, then verifies, makes and files the torrent, announces as a seeder and releases the lease, as
p2preg/node/fetch.py does; a fall-back fetches from upstream without a lease.
A node that holds every chunk of a layer verifies it and announces `completed`
(and is handed downloaders). Failures: `fail_fraction` of the nodes die, at a
uniform time within the bound, `holder_failures` of them halfway through an
upstream fetch they hold a lease for; the dead stop everything and announce
nothing, so their leases expire and their peers age out per the tracker's own
rules. `simulate` returns a `Result`; this module must not format or file it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from functools import partial

from bench.simulate.control import Poll, SimTracker
from bench.simulate.engine import Engine, Flow, Node
from bench.simulate.params import Params
from bench.simulate.result import Result, collect
from bench.simulate.server import Costs, TrackerServers
from bench.simulate.stalls import Stalls
from bench.simulate.swarm import Swarms
from p2preg.core import wire
from p2preg.core.metainfo import piece_size_for
from p2preg.node.fetch import ACK_ATTEMPTS, SWARM_ATTEMPTS
from p2preg.node.leasewait import (
    Action,
    Ask,
    AskAgain,
    Blob,
    Due,
    FallBack,
    FetchAsHolder,
    JoinSwarm,
    LeaseWait,
    Replied,
)
from tracker.confirm_rides import HOLD_S
from tracker.leases import RateRule

# How often idle receivers look for a sender again (libtorrent's tick is 1 s).
TICK_S = 0.25


def chunk_sizes(size: int, chunk_bytes: int) -> list[int]:
    """The layer's transfer units: whole pieces of at least `chunk_bytes`."""
    piece = piece_size_for(size)
    unit = max(piece, -(-chunk_bytes // piece) * piece)
    full, rest = divmod(size, unit)
    return [unit] * full + ([rest] if rest else [])


class Cluster:
    def __init__(self, p: Params) -> None:
        self.p = p
        self.rng = random.Random(p.seed)
        self.engine = Engine(p.node_bytes_s, p.upstream_bytes_s)
        self.sizes = p.layer_sizes()
        self.digests = [f"sha256:layer{i:02d}" for i in range(p.layers)]
        self.nodes = [Node(i, p.layers) for i in range(p.nodes)]
        self.tracker = SimTracker(
            p.lease_ttl_s, p.lease_wait_max_s,
            RateRule(p.lease_min_rate_bytes_s, p.lease_rate_window_s),
            p.fetches_per_image, p.peer_ttl_s, p.numwant, p.policy,
            self.engine.clock, self.rng, self.engine.schedule, self._delivered,
            silence_s=p.lease_silence_s, grant_ack_s=p.lease_grant_ack_s,
            handoff_s=p.handoff_s, lag=lambda: self.servers.lag(),
            woken=lambda node, answered: self.servers.woken(node, answered),
        )
        # Every request to the tracker queues at its replicas (server.py); the
        # serving replica's queue delay is the tracker's lag, held as the real
        # tracker holds it (tracker/coordinator.py `lag_meter`).
        self.servers = TrackerServers(
            p.tracker_replicas, p.announces, Costs(), self.engine.clock, self.engine.schedule,
            hold_s=max(p.lease_silence_s, p.lease_grant_ack_s, 1.0), workers=p.control_fronts,
        )
        self.swarms = Swarms(
            self.engine, self.nodes, [chunk_sizes(s, p.chunk_bytes) for s in self.sizes],
            upload_slots=p.upload_slots, download_slots=p.download_slots,
            connections_limit=p.connections_limit, picker=p.picker, rng=self.rng,
            on_layer=self._layer_received,
        )
        self.stalls = Stalls(
            self.engine, self.swarms, p.stall_report_s,
            announce=lambda node, layer: self._announce(node, layer, seeder=False, periodic=True),
            call=self._call, stalled=self._swarm_stalled,
            report=lambda node, layer, peer: self.tracker.report_stall(
                node.id, self.digests[layer], peer),
        )
        self.engine.on_done = self._flow_done
        self.waits: dict[tuple[int, int], LeaseWait] = {}
        # Per node, the next layer its client asks for (client_downloads at a time).
        self._asked = [0] * p.nodes
        self.upstream_bytes = [0.0] * p.layers
        self.fallbacks: dict[str, int] = {}
        self.holder_deaths: list[int] = []  # layers whose holder is to die mid-fetch
        self.unfinished = p.nodes
        self.killed = 0
        self.granted_to_dead = 0
        # Grants passed on before their holder's acknowledgement reached the tracker.
        self.lost_acks = 0
        self._ack_tries: dict[tuple[int, int], int] = {}
        # (node, layer) → the lease id it fetches under.
        self._leases: dict[tuple[int, int], str] = {}
        # Leases whose holder fetched every byte; released (renewals stop).
        self._fetched: set[str] = set()
        self._released: set[str] = set()
        # Per (node, layer), which scheduled re-announce is the current one: an
        # answer that names another interval supersedes the one due before.
        self._next_announce: dict[tuple[int, int], int] = {}
        # Node → seed confirmations waiting to ride its next lease request.
        self._riding: dict[int, list[Callable[[], None]]] = {}

    # -- the run -----------------------------------------------------------------------

    def run(self) -> Result:
        started = time.perf_counter()
        p, e = self.p, self.engine
        self._plan_failures()
        for node in self.nodes:
            node.start_at = self.rng.uniform(0.0, p.start_spread_s) if p.start_spread_s else 0.0
            e.schedule(node.start_at, partial(self._start, node))
        self._every(5.0, self.tracker.sweep)
        if self.tracker.leases.check_every_s > 0:
            self._every(self.tracker.leases.check_every_s, self.tracker.wake_silent)
        self._every(TICK_S, self.swarms.tick)
        e.run(p.max_sim_s, lambda: self.unfinished == 0)
        return collect(self, time.perf_counter() - started)

    def _every(self, period: float, fn: Callable[[], None]) -> None:
        def tick() -> None:
            fn()
            self.engine.schedule(self.engine.now + period, tick)

        self.engine.schedule(self.engine.now + period, tick)

    def _plan_failures(self) -> None:
        p, failing = self.p, self.p.failing()
        holders = min(p.holder_failures, failing)
        # Holders of layers spread over the image die mid-fetch.
        self.holder_deaths = sorted({(i + 1) * p.layers // (holders + 1) for i in range(holders)})
        for node in self.rng.sample(self.nodes, failing - len(self.holder_deaths)):
            at = self.rng.uniform(0.0, p.bound_s)
            self.engine.schedule(at, partial(self._kill, node))

    def _kill(self, node: Node) -> None:
        if not node.alive:
            return
        for flow in [f for f in self.engine.upstream if f.dst is node]:
            self.upstream_bytes[flow.layer] += self.engine.abort(flow)
        touched = self.swarms.kill(node)
        self.killed += 1
        if node.finished_at is None:
            self.unfinished -= 1
        for other in touched:
            self.swarms.kick(other)

    # -- the lease wait (p2preg/node/fetch.py's _await_lease) ----------------------------

    def _start(self, node: Node) -> None:
        at_once = self.p.client_downloads or self.p.layers
        for _ in range(min(at_once, self.p.layers)):
            self._ask_next(node)

    def _ask_next(self, node: Node) -> None:
        """The client asks for the next layer of the image it has not asked for yet."""
        layer = self._asked[node.id]
        if layer >= self.p.layers or not node.alive:
            return
        self._asked[node.id] = layer + 1
        self._wait_for(node, layer)

    def _wait_for(self, node: Node, layer: int) -> None:
        """A new lease wait for `layer`, and its first ask."""
        wait = LeaseWait(
            self.p.node_wait_max_s, self.engine.clock,
            blob=Blob(self.digests[layer], self.sizes[layer]),
        )
        self.waits[node.id, layer] = wait
        self._act(node, layer, wait.step(Due()))

    def _act(self, node: Node, layer: int, action: Action) -> None:
        if not node.alive:
            return
        e, half = self.engine, self.p.rtt_s / 2
        wait = self.waits[node.id, layer]
        if isinstance(action, Ask):
            ask = action

            def send() -> None:
                riders, self._riding[node.id] = self._riding.get(node.id, []), []
                self.tracker.counts.riding += len(riders)

                def apply() -> None:
                    for confirm in riders:
                        confirm()
                    self.tracker.ask(
                        node.id, self.digests[layer], layer + 1, self.sizes[layer], ask.wait_s
                    )

                self.servers.control(node.id, apply, len(riders), ask=True)

            e.schedule(e.now + half, send)
        elif isinstance(action, AskAgain):
            e.schedule(e.now + action.after_s, lambda: self._act(node, layer, wait.step(Due())))
        elif isinstance(action, JoinSwarm):
            self._join(node, layer)
        else:  # upstream; a download its peers stalled leaves the swarm (fetch.py)
            if node.joined[layer]:
                self.swarms.leave(node, layer)
                self._next_announce[node.id, layer] += 1
            if isinstance(action, FetchAsHolder):
                self._fetch(node, layer, action.lease_id, action.renew_s)
            else:
                self.fallbacks[action.reason] = self.fallbacks.get(action.reason, 0) + 1
                self._fetch(node, layer, None, 0.0)

    def _delivered(self, poll: Poll, reply: wire.LeaseReply) -> None:
        node, layer = self.nodes[poll.node], poll.order - 1
        self.servers.answered(node.id)
        if not node.alive and reply.status is wire.LeaseStatus.GRANTED:
            # Its long poll outlived it: the lease runs out unused.
            self.granted_to_dead += 1
        wait = self.waits[node.id, layer]
        self.engine.schedule(
            self.engine.now + self.p.rtt_s / 2,
            lambda: self._act(node, layer, wait.step(Replied(reply))),
        )

    # -- the holder (fetch.py's _as_holder, _release_once_seeding) ------------------------

    def _fetch(self, node: Node, layer: int, lease_id: str | None, renew_s: float) -> None:
        e = self.engine
        flow = Flow(None, node, layer, -1, self.sizes[layer])

        def begin() -> None:
            if node.alive:
                e.start(flow)
                if lease_id is not None and layer in self.holder_deaths:
                    self.holder_deaths.remove(layer)
                    half = self.sizes[layer] / 2 / self.p.upstream_bytes_s
                    e.schedule(e.now + half, lambda: self._kill(node))

        if lease_id is None:
            e.schedule(e.now + self.p.upstream_start_s, begin)
            return
        lease, half = lease_id, self.p.rtt_s / 2

        def renew() -> None:  # from the grant until the release, as fetch.py's _renewing
            if not node.alive or lease in self._released:
                return
            if lease in self._fetched:
                done = flow.size
            elif flow in e.upstream and flow.rate:
                done = int(min(e.progress(flow), flow.size - 1))
            else:
                done = 0
            sent = e.now

            def apply() -> None:  # the next is due a renewal after this one, once answered
                kept = self.tracker.renew(self.digests[layer], lease, done, flow.size, node.id)
                self.servers.answered(node.id)
                if kept:
                    e.schedule(max(sent + renew_s, e.now), renew)

            self.servers.control(node.id, apply)

        def acknowledged() -> None:  # fetch.py's _lease_acknowledged: no byte before it
            kept = self.tracker.renew(self.digests[layer], lease, 0, flow.size, node.id)
            self.servers.answered(node.id)
            if not node.alive:
                return
            if not kept:  # passed on before the tracker heard us: wait for it again
                self.lost_acks += 1
                e.schedule(e.now + half, lambda: self._wait_again(node, layer))
                return
            self._leases[node.id, layer] = lease
            e.schedule(e.now + half + self.p.upstream_start_s, begin)
            e.schedule(e.now + half + renew_s, renew)

        e.schedule(e.now + half, lambda: self.servers.control(node.id, acknowledged))

    def _wait_again(self, node: Node, layer: int) -> None:
        """A grant lost before its acknowledgement: a new lease wait, at most
        fetch.ACK_ATTEMPTS in all, then upstream without a lease."""
        tries = self._ack_tries[node.id, layer] = self._ack_tries.get((node.id, layer), 1) + 1
        if tries > ACK_ATTEMPTS:
            self._act(node, layer, FallBack("tracker", "grants passed on"))
            return
        self._wait_for(node, layer)

    def _flow_done(self, flow: Flow) -> None:
        if flow.src is not None:
            self.swarms.chunk_done(flow)
            return
        node, layer = flow.dst, flow.layer
        self.upstream_bytes[layer] += flow.size
        digest, e, half = self.digests[layer], self.engine, self.p.rtt_s / 2
        lease = self._leases.pop((node.id, layer), None)
        if lease is not None:
            size = flow.size
            self._fetched.add(lease)

            def fetched() -> None:  # off the upstream link: the next blob may start
                if node.alive:
                    self._call(node, lambda: self.tracker.renew(digest, lease, size, size, node.id))

            e.schedule(e.now + half, fetched)
        was_complete = node.complete[layer]
        self._complete(node, layer)
        if was_complete:
            return
        # Verify is done while writing; the torrent is hashed again to be made.
        made = e.now + self.sizes[layer] / self.p.hash_bytes_s + half

        def publish() -> None:
            if not node.alive:
                return
            self.swarms.seed(node, layer)
            if lease is not None or digest in self.tracker.published:
                self._call(node, filed, then=published)

        def filed() -> None:  # the publish, which enters its sender where it stands for that
            self.tracker.publish(digest)
            if self._entered:
                self.tracker.announce(node.id, digest, True, entered=True)

        def published() -> None:  # filed: announce as a seeder, release once it is answered
            held = lease

            def release() -> None:
                if held is not None:
                    e.schedule(e.now + self.p.rtt_s, lambda: self._release(node, layer, held))

            if self._entered:  # its start answered with the record's interval: a seeder's
                release()
                self._reannounce_later(node, layer, self.p.seeder_announce_interval_s)
            else:
                self._announce(node, layer, seeder=True, periodic=True, then=release)

        e.schedule(made, publish)

    def _call(self, node: Node, apply: Callable[[], object],
              then: Callable[[], None] | None = None, riders: int = 0) -> None:
        """A control call from `node` through the tracker's queue, with `riders` seed
        confirmations (server.TrackerServers.control); `then` on its answer."""
        def done() -> None:
            apply()
            self.servers.answered(node.id)
            if then is not None:
                self.engine.schedule(self.engine.now + self.p.rtt_s / 2, then)

        self.servers.control(node.id, done, riders)

    def _release(self, node: Node, layer: int, lease: str) -> None:
        self._released.add(lease)
        if node.alive:
            self._call(node, lambda: self.tracker.release(self.digests[layer], lease, node.id))

    # -- the swarm ---------------------------------------------------------------------

    @property
    def _entered(self) -> bool:
        """Control calls stand for a node's start, completion and seeding announces."""
        return self.p.announces == "entered"

    def _join(self, node: Node, layer: int) -> None:
        node.joined[layer] = True
        self.stalls.watch(node, layer)
        if not self._entered:
            self._announce(node, layer, seeder=False, periodic=True)
            return
        # The SEEDED answer entered the node and named its peers (its cost was the
        # lease request's); libtorrent's `started` is answered by the node's relay.
        self._connect(node, layer, self.tracker.announce(
            node.id, self.digests[layer], False, entered=True))  # fmt: skip
        self._reannounce_later(node, layer)

    def _swarm_stalled(self, node: Node, layer: int, tries: int) -> None:
        """fetch.py's _from_swarm: every peer stalled the download's `tries`th try, and
        the tracker has the reports; the lease wait again, SWARM_ATTEMPTS tries in all."""
        if not node.alive or node.complete[layer]:
            return
        if tries >= SWARM_ATTEMPTS:
            self._act(node, layer, FallBack("peers_stalled", "every peer stalled us"))
        else:
            self._wait_for(node, layer)

    def _connect(self, node: Node, layer: int, peers: list[int]) -> None:
        for peer in peers if node.alive else ():
            other = self.nodes[peer]
            if self.swarms.connect(node, other, layer):
                self.swarms.pair(node, other, layer)
            else:
                self.stalls.unreachable(node, layer, other)

    def _reannounce_later(self, node: Node, layer: int, after_s: float = 0.0) -> None:
        """The periodic announce, next due `after_s` from now (default: the downloaders'
        interval), in place of any due before."""
        key = (node.id, layer)
        ticket = self._next_announce[key] = self._next_announce.get(key, 0) + 1

        def again() -> None:
            if self._next_announce[key] == ticket:
                self._announce(node, layer, seeder=node.complete[layer], periodic=True)

        self.engine.schedule(self.engine.now + (after_s or self.p.announce_interval_s), again)

    def _announce(
        self, node: Node, layer: int, *, seeder: bool, periodic: bool,
        then: Callable[[], None] | None = None,
    ) -> None:
        """`then` once the tracker applied it (fetch.py releases a lease only then)."""
        if not node.alive:
            return

        def apply() -> None:  # at the tracker; the peers handed out reach a live node
            self._connect(node, layer, self.tracker.announce(node.id, self.digests[layer], seeder))
            if then is not None and node.alive:
                then()

        self.servers.announce(node.id, apply)
        if periodic:
            self._reannounce_later(node, layer)

    def _layer_received(self, node: Node, layer: int) -> None:
        """Every chunk is in: verify the blob, then seed it as a completed peer."""
        e = self.engine

        def verified() -> None:  # peers.py, then seeding.keep's confirmation
            if not node.alive:
                return
            self._complete(node, layer)
            digest = self.digests[layer]
            if not self._entered:  # libtorrent's `completed`, then the confirmation
                self._announce(node, layer, seeder=True, periodic=False)
            else:  # the relay answered the completion with the seeders' interval
                self._reannounce_later(node, layer, self.p.seeder_announce_interval_s)
            self._confirm(node, lambda: self.tracker.confirm(node.id, digest, enter=self._entered))

        e.schedule(e.now + self.sizes[layer] / self.p.hash_bytes_s, verified)

    def _confirm(self, node: Node, confirm: Callable[[], None]) -> None:
        """A seed confirmation: a call of its own, or (`riding`) with the node's next lease
        request if one is sent within HOLD_S (tracker/confirm_rides.py), else in a call
        of its own that carries the node's other confirmations then waiting."""
        if self.p.confirms == "call":
            self._call(node, confirm)
            return
        waiting = self._riding.setdefault(node.id, [])
        waiting.append(confirm)

        def alone() -> None:  # with every other confirmation waiting for a ride
            if confirm in self._riding.get(node.id, ()):
                batch, self._riding[node.id] = self._riding[node.id], []
                self.tracker.counts.riding += len(batch) - 1
                self._call(node, lambda: [each() for each in batch], riders=len(batch) - 1)

        self.engine.schedule(self.engine.now + HOLD_S, alone)

    def _complete(self, node: Node, layer: int) -> None:
        if node.complete[layer]:
            return
        node.complete[layer] = True
        node.done_at[layer] = self.engine.now
        self.swarms.close_redundant(node, layer)
        if self.p.client_downloads:  # a download slot of the client is free
            self._ask_next(node)
        if all(node.complete):
            node.finished_at = self.engine.now
            self.unfinished -= 1


def simulate(p: Params) -> Result:
    """Run one pull; the module-level `random` (peers.py draws from it) is seeded and put back."""
    state = random.getstate()
    random.seed(p.seed)
    try:
        return Cluster(p).run()
    finally:
        random.setstate(state)

