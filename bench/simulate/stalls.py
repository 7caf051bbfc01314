"""A download's stall watch (p2preg/node/stallwatch.py, `lonely` and `every_peer_stalls`).

Owns, per download (node, layer), the peers the tracker handed out that could
not be reached because they died, and the watch that looks every half
`stall_s`: a download that has had no neighbour with a chunk it lacks for
`stall_s` either reports the unreachable peers and stops waiting for that
swarm (`peers_stalled`: cluster.py asks the tracker what next, as fetch.py's
`_from_swarm` does), or, with nobody to report, announces again for other
peers (`lonely`), once per `stall_s`. The node sends a call per report; the
model sends one call with them all. It must not decide what a stalled
download does next (cluster.py does), nor count reports at the tracker
(tracker/admission.py does, in control.py).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from bench.simulate.engine import Engine, Node
from bench.simulate.swarm import Swarms

# A control call from a node, and what to do once it is answered (cluster.py's _call).
Call = Callable[[Node, Callable[[], object], Callable[[], None]], None]


class Stalls:
    def __init__(
        self,
        engine: Engine,
        swarms: Swarms,
        stall_s: float,
        *,
        announce: Callable[[Node, int], None],
        call: Call,
        report: Callable[[Node, int, int], None],
        stalled: Callable[[Node, int, int], None],
    ) -> None:
        self._engine = engine
        self._swarms = swarms
        self._stall_s = stall_s
        self._announce = announce
        self._call = call
        self._report = report
        self._stalled = stalled
        self._unreachable: dict[tuple[int, int], set[int]] = {}
        # The current watch of each download: a stalled one that joins again starts anew.
        self._watch: dict[tuple[int, int], int] = {}
        self.lonely = 0  # announces of downloads alone for stall_s, nobody to report
        self.stalled = 0  # downloads that reported their peers and asked the tracker again
        self._tries: dict[tuple[int, int], int] = {}  # per download, the swarm tries stalled

    def unreachable(self, node: Node, layer: int, peer: Node) -> None:
        """`node` dialled `peer`, handed out for `layer`, and it did not answer: dead."""
        dialled = node.conns < self._swarms.limit and not node.complete[layer]
        if self._stall_s and dialled and not peer.alive:
            self._unreachable.setdefault((node.id, layer), set()).add(peer.id)

    def watch(self, node: Node, layer: int) -> None:
        """`node` joined `layer`'s swarm: watch the download until it completes or stalls."""
        if not self._stall_s:
            return
        key = (node.id, layer)
        ticket = self._watch[key] = self._watch.get(key, 0) + 1
        self._engine.schedule(self._engine.now + self._stall_s / 2,
                              partial(self._look, node, layer, None, ticket))  # fmt: skip

    def _look(self, node: Node, layer: int, since: float | None, ticket: int) -> None:
        key = (node.id, layer)
        if self._watch.get(key) != ticket or not node.alive or node.complete[layer]:
            return
        now = self._engine.now
        if self._swarms.has_source(node, layer):
            since = None
        elif since is None:
            since = now
        elif now - since >= self._stall_s:
            gone = self._unreachable.pop(key, None)
            if gone:
                self.stalled += 1
                del self._watch[key]
                tries = self._tries[key] = self._tries.get(key, 0) + 1

                def report() -> None:
                    for peer in sorted(gone):
                        self._report(node, layer, peer)

                self._call(node, report, partial(self._stalled, node, layer, tries))
                return
            self.lonely += 1
            self._announce(node, layer)
            since = now
        self._engine.schedule(now + self._stall_s / 2,
                              partial(self._look, node, layer, since, ticket))  # fmt: skip
