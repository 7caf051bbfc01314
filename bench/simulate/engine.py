"""The discrete-event core: a clock, an event heap, and fluid transfers over shared links.

Owns `Node` (a host's link and what it holds of each layer), `Flow` (one
transfer: a chunk from a peer, or a whole layer from upstream) and `Engine`,
which keeps every flow's rate and finish time true as flows start and stop.
Rates are recomputed at events, never per byte. The upstream link U is shared
max-min fairly (water-filling) among the upstream fetches, each held to its
receiver's link; a peer transfer gets the smaller of its sender's uplink share
and its receiver's downlink share, each link split equally among its peer
flows after the receiver's upstream fetches took theirs (exact max-min where
U's share is below B's, the case of every profile here). Neither end's unused
share is passed on to the other's flows: that is where this is an
approximation of max-min fairness. A changed rate re-files the flow's finish event; a
stale one is recognised by its version and skipped. It knows nothing of
swarms, leases or trackers: a finished flow goes to the `on_done` callback.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

INF = float("inf")


class Node:
    __slots__ = (
        "alive", "complete", "done_at", "downs", "fetching", "finished_at", "have", "id",
        "joined", "links", "nbrs", "needy", "open", "pending", "reserved", "rr", "start_at", "ups",
    )

    def __init__(self, node_id: int, layers: int) -> None:
        self.id = node_id
        self.alive = True
        self.ups: list[Flow] = []
        self.downs: list[Flow] = []  # peer flows in
        self.fetching = 0  # upstream flows in
        self.reserved = 0.0  # the downlink those take
        # Per layer: chunks held / being fetched (bit masks), neighbours by id.
        self.have = [0] * layers
        self.pending = [0] * layers
        self.nbrs: list[list[int]] = [[] for _ in range(layers)]
        # Open connections, as other id * 1024 + layer: `nbrs` may keep a closed
        # one between two nodes that both hold the layer (neither uses it again).
        self.links: set[int] = set()
        # The neighbours that may still lack the layer (pruned lazily): whom to upload to.
        self.needy: list[list[int]] = [[] for _ in range(layers)]
        self.joined = [False] * layers
        self.complete = [False] * layers
        self.done_at: list[float | None] = [None] * layers
        self.open = [0] * layers  # open peer connections per layer (a torrent's peers)
        self.rr = 0  # round-robin start for picking among neighbours
        self.start_at = 0.0
        self.finished_at: float | None = None

    @property
    def conns(self) -> int:
        """Peer connections, all layers (libtorrent's connections_limit)."""
        return sum(self.open)


class Flow:
    __slots__ = ("at", "chunk", "dst", "layer", "left", "rate", "size", "src", "version")

    def __init__(self, src: Node | None, dst: Node, layer: int, chunk: int, size: int) -> None:
        self.src = src  # None: the upstream registry
        self.dst = dst
        self.layer = layer
        self.chunk = chunk
        self.size = size
        self.left = float(size)
        self.rate = 0.0
        self.at = 0.0
        self.version = 0

    @property
    def upstream(self) -> bool:
        return self.src is None


# A heap entry: (time, sequence, callback or None, flow or None, flow version).
_Entry = tuple[float, int, Callable[[], None] | None, Flow | None, int]


class Engine:
    def __init__(self, link_bytes_s: float, upstream_bytes_s: float) -> None:
        self.now = 0.0
        self._heap: list[_Entry] = []
        self._seq = 0
        self.link = link_bytes_s
        self.upstream_cap = upstream_bytes_s
        self.upstream: list[Flow] = []
        self.on_done: Callable[[Flow], None] = lambda flow: None
        self.events = 0
        self._stale = 0  # heap entries of flows re-rated or gone since they were filed

    def clock(self) -> float:
        return self.now

    def schedule(self, at: float, fn: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (max(at, self.now), self._seq, fn, None, 0))

    def run(self, until: float, done: Callable[[], bool]) -> None:
        """Process events in time order until `done()` or the clock passes `until`."""
        heap = self._heap
        while heap and not done():
            at, _, fn, flow, version = heapq.heappop(heap)
            if at > until:
                self.now = until
                return
            if flow is not None and flow.version != version:
                self._stale -= 1
                continue
            self.now = at
            self.events += 1
            if fn is not None:
                fn()
            elif flow is not None:
                self._finish(flow)

    # -- flows ----------------------------------------------------------------------

    def start(self, flow: Flow) -> None:
        flow.at = self.now
        if flow.src is not None:
            flow.src.ups.append(flow)
            flow.dst.downs.append(flow)
        else:
            self.upstream.append(flow)
            flow.dst.fetching += 1
        self._retime(flow)

    def progress(self, flow: Flow) -> float:
        """Bytes moved so far."""
        return flow.size - (flow.left - flow.rate * (self.now - flow.at))

    def abort(self, flow: Flow) -> float:
        """Stop `flow` before its end; the bytes it had moved."""
        moved = self.progress(flow)
        self._detach(flow)
        return moved

    def _finish(self, flow: Flow) -> None:
        self._detach(flow)
        self.on_done(flow)

    def _detach(self, flow: Flow) -> None:
        flow.version += 1
        self._stale += 1
        if flow.src is not None:
            flow.src.ups.remove(flow)
            flow.dst.downs.remove(flow)
        else:
            self.upstream.remove(flow)
            flow.dst.fetching -= 1
        self._retime(flow)

    def _retime(self, changed: Flow) -> None:
        """Re-rate the flows that share a link end with `changed` (which just came or went)."""
        if changed.src is None:
            changed.dst.reserved = 0.0
            touched = self._share_upstream(changed.dst)
            affected = [f for node in touched for f in node.downs]
        else:
            affected = [*changed.dst.downs, *changed.src.ups]
        link = self.link
        for flow in affected:
            src, dst = flow.src, flow.dst
            assert src is not None
            down = (link - dst.reserved) / len(dst.downs)
            up = link / len(src.ups)
            self._set_rate(flow, up if up < down else down)

    def _share_upstream(self, receiver: Node) -> list[Node]:
        """Water-fill U over the upstream fetches, each capped by its receiver's link.

        Returns the receivers, whose peer flows share what is left of their links."""
        link = self.link
        flows = sorted(self.upstream, key=lambda f: f.dst.fetching)
        left, n = self.upstream_cap, len(flows)
        touched: dict[int, Node] = {receiver.id: receiver}
        for i, flow in enumerate(flows):
            cap = link / flow.dst.fetching
            fair = left / (n - i)
            rate = cap if cap < fair else fair
            left -= rate
            self._set_rate(flow, rate)
            touched[flow.dst.id] = flow.dst
        for node in touched.values():
            node.reserved = 0.0
        for flow in flows:
            flow.dst.reserved += flow.rate
        return list(touched.values())

    def _set_rate(self, flow: Flow, rate: float) -> None:
        now = self.now
        if rate == flow.rate and flow.at == now:
            return
        flow.left -= flow.rate * (now - flow.at)
        flow.at = now
        if rate == flow.rate:
            return
        if flow.rate:
            self._stale += 1
        flow.rate = rate
        flow.version += 1
        self._seq += 1
        left = flow.left if flow.left > 0 else 0.0
        heapq.heappush(self._heap, (now + left / rate, self._seq, None, flow, flow.version))
        if self._stale > 1_000_000 and self._stale * 2 > len(self._heap):
            self._compact()

    def _compact(self) -> None:
        """Drop the stale entries (re-rated or finished flows) from the heap, in place."""
        heap = self._heap
        heap[:] = [e for e in heap if e[3] is None or e[3].version == e[4]]
        heapq.heapify(heap)
        self._stale = 0
