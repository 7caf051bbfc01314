"""Who sends which chunk to whom: connections, unchoke slots and piece picking.

Owns the peer side of the model. Nodes connect to the peers the tracker hands
them, within `connections_limit` on both ends (a connection per layer, as
libtorrent has one per torrent): a full node dials nobody, and a full peer
takes a connection only for a layer it has fewer connections for than its
most crowded one, closing one of those (libtorrent's rule). A node uploads at
most `upload_slots` chunks at once and downloads at most `download_slots`, and
uploads only chunks it holds whole. A transfer starts whenever a sender has a
free slot, a connected receiver has one too and lacks a chunk the sender has:
each side looks for the other when one of its slots frees or it gains a chunk
(a window of `SCAN` neighbours; all of them for a node with nothing in
flight), and receivers that found nothing look again every tick. The
receiver's chunk is the rarest in the swarm (or a random one). Connections
between two nodes that both hold a layer are closed, as libtorrent's
`close_redundant_connections` does. It must not decide when a node joins a
swarm or what a finished layer means (cluster.py does).
"""

from __future__ import annotations

import random
from collections.abc import Callable

from bench.simulate.engine import Engine, Flow, Node

# Neighbours a node with transfers running looks at per layer for a new one.
SCAN = 32
LINK = 1024  # layers per image, at most (a connection's key: other * LINK + layer)


def _bits(mask: int) -> list[int]:
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out


class Swarms:
    def __init__(
        self,
        engine: Engine,
        nodes: list[Node],
        chunks: list[list[int]],
        *,
        upload_slots: int,
        download_slots: int,
        connections_limit: int,
        picker: str,
        rng: random.Random,
        on_layer: Callable[[Node, int], None],
    ) -> None:
        self.engine = engine
        self.nodes = nodes
        self.chunks = chunks  # per layer, each chunk's size
        self.full = [(1 << len(c)) - 1 for c in chunks]
        self.avail = [[0] * len(c) for c in chunks]  # live holders per chunk
        self.k = upload_slots
        self.d = download_slots
        self.limit = connections_limit
        self.rarest = picker == "rarest"
        self.rng = rng
        self.on_layer = on_layer  # a node now holds every chunk of a layer
        self.delivered = 0  # chunk bytes received from peers
        self.aborted = 0  # bytes of chunk transfers cut by a death or a closed connection
        self.refused = 0  # connections refused: a dead peer, or a full end
        self.displaced = 0  # connections a full end closed to take a new one
        self.idle: set[int] = set()  # receivers with nothing in flight that found no sender

    # -- connections -------------------------------------------------------------------

    def connect(self, a: Node, b: Node, layer: int) -> bool:
        """`a` dials `b` for `layer`: not when `a` is full; a full `b` makes room."""
        if a is b or b.id * LINK + layer in a.links:
            return False
        if a.complete[layer] and b.complete[layer]:
            return False
        if not b.alive or a.conns >= self.limit or (
            b.conns >= self.limit and not self._make_room(b, layer)
        ):
            self.refused += 1
            return False
        a.open[layer] += 1
        b.open[layer] += 1
        a.links.add(b.id * LINK + layer)
        b.links.add(a.id * LINK + layer)
        a.nbrs[layer].append(b.id)
        b.nbrs[layer].append(a.id)
        if not b.complete[layer]:
            a.needy[layer].append(b.id)
        if not a.complete[layer]:
            b.needy[layer].append(a.id)
        return True

    def _make_room(self, b: Node, layer: int) -> bool:
        """A full libtorrent end on a handshake (peer_connection.cpp): it drops one
        connection of its torrent with the most peers, if that torrent has more than
        the one this connection is for, the new one counted (it is attached before the
        check); the lowest-ranked peer goes (BEP 40's order, which follows addresses,
        so any one here). Else it refuses."""
        crowd = max(range(len(b.open)), key=b.open.__getitem__)
        if b.open[crowd] <= b.open[layer] + 1:
            return False
        linked = [x for x in b.nbrs[crowd] if x * LINK + crowd in b.links]
        other = self.nodes[linked[self.rng.randrange(len(linked))]]
        self.disconnect(b, other, crowd)
        self.displaced += 1
        self.kick(other)
        self.kick(b)
        return True

    def disconnect(self, a: Node, b: Node, layer: int) -> None:
        """Close the connection between `a` and `b` for `layer`, and its transfers."""
        for flow in [f for f in a.ups + a.downs if f.layer == layer and b in (f.src, f.dst)]:
            self._cut(flow)
        self._unlink(a, b, layer)
        self._unlink(b, a, layer)

    def leave(self, node: Node, layer: int) -> None:
        """`node` stops downloading `layer` from peers (its torrent removed)."""
        node.joined[layer] = False
        for other_id in [x for x in node.nbrs[layer] if x * LINK + layer in node.links]:
            other = self.nodes[other_id]
            self.disconnect(node, other, layer)
            self.kick(other)
        node.nbrs[layer] = []
        node.needy[layer] = []
        self.kick(node)

    def _cut(self, flow: Flow) -> None:
        """Stop `flow`; a chunk transfer's bytes so far are lost, its chunk wanted again."""
        moved = self.engine.abort(flow)
        if flow.src is not None:
            self.aborted += int(moved)
            flow.dst.pending[flow.layer] &= ~(1 << flow.chunk)

    @staticmethod
    def _unlink(node: Node, other: Node, layer: int) -> None:
        """`node` forgets its open connection to `other` for `layer`."""
        node.links.discard(other.id * LINK + layer)
        node.nbrs[layer].remove(other.id)
        if other.id in node.needy[layer]:
            node.needy[layer].remove(other.id)
        node.open[layer] -= 1

    def has_source(self, node: Node, layer: int) -> bool:
        """Whether a live neighbour `node` is connected to holds a chunk of `layer` it
        lacks (libtorrent's `interesting`)."""
        lacks = ~node.have[layer]
        for other_id in node.nbrs[layer]:
            other = self.nodes[other_id]
            if other.alive and other.have[layer] & lacks and other_id * LINK + layer in node.links:
                return True
        return False

    def close_redundant(self, node: Node, layer: int) -> None:
        """`node` holds `layer` now: close its connections to others that hold it.

        The other end's `nbrs` keeps the entry (it holds the layer, so never
        looks there again); `links` and the connection counts are exact."""
        keep = []
        for other_id in node.nbrs[layer]:
            other = self.nodes[other_id]
            if other.complete[layer]:
                if other_id * LINK + layer in node.links:
                    node.links.discard(other_id * LINK + layer)
                    other.links.discard(node.id * LINK + layer)
                    other.open[layer] -= 1
                    node.open[layer] -= 1
            else:
                keep.append(other_id)
        node.nbrs[layer] = keep
        node.needy[layer] = list(keep)

    def seed(self, node: Node, layer: int) -> None:
        """`node` has the whole layer (from upstream): it can upload every chunk."""
        for c in _bits(self.full[layer] & ~node.have[layer]):
            self.avail[layer][c] += 1
        node.have[layer] = self.full[layer]
        node.pending[layer] = 0

    def kill(self, node: Node) -> list[Node]:
        """`node` died: its transfers stop, its connections close. The peers touched."""
        touched: dict[int, Node] = {}
        for flow in [*node.ups, *node.downs]:
            self._cut(flow)
            other = flow.dst if flow.src is node else flow.src
            if other is not None:
                touched[other.id] = other
        for key in node.links:
            self._unlink(self.nodes[key // LINK], node, key % LINK)
        node.links.clear()
        for layer in range(len(node.nbrs)):
            node.nbrs[layer] = []
            node.needy[layer] = []
            for c in _bits(node.have[layer]):
                self.avail[layer][c] -= 1
        node.open = [0] * len(node.open)
        node.alive = False
        return list(touched.values())

    # -- transfers ---------------------------------------------------------------------

    def chunk_done(self, flow: Flow) -> None:
        node, layer, bit = flow.dst, flow.layer, 1 << flow.chunk
        node.pending[layer] &= ~bit
        node.have[layer] |= bit
        self.avail[layer][flow.chunk] += 1
        self.delivered += flow.size
        if node.have[layer] == self.full[layer]:
            self.on_layer(node, layer)
        assert flow.src is not None
        self.try_upload(flow.src)
        self.try_download(node)
        self.offer(node, layer)

    def kick(self, node: Node) -> None:
        """Something changed for `node` (new peers, a freed slot): look both ways."""
        self.try_download(node)
        self.try_upload(node)

    def pair(self, a: Node, b: Node, layer: int) -> None:
        """`a` and `b` just connected on `layer`: start what can flow between them."""
        for src, dst in ((a, b), (b, a)):
            if len(src.ups) < self.k and len(dst.downs) < self.d and dst.joined[layer]:
                want = src.have[layer] & ~(dst.have[layer] | dst.pending[layer])
                if want:
                    self._start(src, dst, layer, want)

    def _start(self, src: Node, dst: Node, layer: int, want: int) -> None:
        chunk = self._pick(layer, want)
        dst.pending[layer] |= 1 << chunk
        self.engine.start(Flow(src, dst, layer, chunk, self.chunks[layer][chunk]))

    def _pick(self, layer: int, want: int) -> int:
        options = _bits(want)
        if len(options) == 1:
            return options[0]
        if self.rarest:
            avail = self.avail[layer]
            least = min(avail[c] for c in options)
            options = [c for c in options if avail[c] == least]
        return options[self.rng.randrange(len(options))] if len(options) > 1 else options[0]

    def offer(self, u: Node, layer: int) -> None:
        """`u` gained a chunk of `layer`: offer it to `SCAN` needy neighbours (see tick)."""
        needy, nodes, d = u.needy[layer], self.nodes, self.d
        while u.alive and len(u.ups) < self.k and needy:
            u.rr += 1
            n = len(needy)
            start = (u.rr * SCAN) % n
            for j in range(min(n, SCAN)):
                r = nodes[needy[(start + j) % n]]
                if len(r.downs) >= d or r.complete[layer]:
                    continue
                want = u.have[layer] & ~(r.have[layer] | r.pending[layer])
                if want:
                    self._start(u, r, layer, want)
                    break
            else:
                return

    def tick(self) -> None:
        """Receivers that found nothing to fetch while fetching nothing look again.

        The windows of `offer` and `try_upload` can miss a receiver that is idle;
        this is what libtorrent's own timer does for a peer with nothing in flight."""
        idle, self.idle = self.idle, set()
        for node_id in sorted(idle):
            self.try_download(self.nodes[node_id])

    def try_upload(self, u: Node) -> None:
        """Fill `u`'s free upload slots with receivers that lack what it has.

        Looks at the neighbours that may still need a layer (those that hold it
        are dropped as they are met): `SCAN` of them from a window that moves on
        every call, all of them when `u` sends nothing. A node with a transfer
        running looks again when it ends, and one with none looks everywhere,
        so a possible transfer waits at most until one of its ends looks again."""
        nodes, layers, d = self.nodes, len(u.have), self.d
        while u.alive and len(u.ups) < self.k:
            u.rr += 1
            found = False
            for i in range(layers):
                layer = (u.rr + i) % layers
                have, needy = u.have[layer], u.needy[layer]
                if not have or not needy:
                    continue
                n = len(needy)
                start, stale = (u.rr * SCAN) % n, False
                for j in range(n if not u.ups else min(n, SCAN)):
                    r = nodes[needy[(start + j) % n]]
                    if r.complete[layer]:
                        stale = True
                        continue
                    if len(r.downs) >= d:
                        continue
                    want = have & ~(r.have[layer] | r.pending[layer])
                    if want:
                        self._start(u, r, layer, want)
                        found = True
                        break
                if stale:
                    u.needy[layer] = [x for x in needy if not nodes[x].complete[layer]]
                if found:
                    break
            if not found:
                return

    def try_download(self, r: Node) -> None:
        """Fill `r`'s free download slots from connected senders with a free upload slot.

        Looks at `SCAN` neighbours per layer from a moving window, all of them
        when nothing else is coming in (see try_upload)."""
        nodes, k = self.nodes, self.k
        while r.alive and len(r.downs) < self.d:
            r.rr += 1
            found = wanted = False
            for layer, nbrs in enumerate(r.nbrs):
                if not r.joined[layer] or not nbrs:
                    continue
                missing = self.full[layer] & ~(r.have[layer] | r.pending[layer])
                if not missing:
                    continue
                wanted = True
                n = len(nbrs)
                look = n if not r.downs else min(n, SCAN)
                for j in range(look):
                    u = nodes[nbrs[(r.rr * SCAN + j) % n]]
                    if len(u.ups) >= k:
                        continue
                    want = u.have[layer] & missing
                    if want:
                        self._start(u, r, layer, want)
                        found = True
                        break
                if found:
                    break
            if not found:
                if wanted and not r.downs:
                    self.idle.add(r.id)
                return
