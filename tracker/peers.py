"""In-memory swarms: which peers are in which blob's swarm, until they expire.

Owns peer records (address, seeder or not, when they expire), per-swarm
counters and capacity limits. Swarms are keyed by blob digest, not info-hash,
so a hybrid torrent's two info-hashes feed one swarm. Peers are never
persisted: after a tracker restart they come back with their next announce.
A swarm holds one peer per *identity* (admission.announce_identity): a new
announce of an identity with another peer id or port replaces its entry, so
one identity cannot fill a swarm with fake peers, and nobody can evict or move
another identity's peer by reusing its peer id or address. A peer's `left=0`
is a claim (`claims_seed`); whether it counts as a seeder is the caller's
decision (admission.py). This module is sans-IO and keeps time only as numbers
handed to it; it must not pick peers (handout.py does) or know info-hashes.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Iterator
from dataclasses import dataclass

from p2preg.core.errors import InvalidRequest, LimitReached


class Peer:
    __slots__ = (
        "announced_at", "claims_seed", "compact", "downloaded", "expires_at", "key", "peer_id",
        "pos", "seeder", "uploaded",
    )

    def __init__(
        self, key: str, peer_id: bytes, compact: bytes, seeder: bool, expires_at: float
    ) -> None:
        self.key = key  # the identity whose peer this is
        self.peer_id = peer_id
        self.compact = compact  # BEP 23/7 entry: packed address + port
        self.seeder = seeder  # counted and handed out as a seeder
        self.claims_seed = seeder  # announced left=0
        self.expires_at = expires_at
        self.pos = 0  # index in its swarm's seeders or leechers list
        # What its last announce said (the cluster page shows them; nothing decides on them):
        # when, and the client's own byte counters for this torrent.
        self.announced_at = 0.0
        self.uploaded = 0
        self.downloaded = 0


class Swarm:
    """Peers of one blob, seeders and leechers apart, each group in random order.

    `seeders`/`leechers` hold Peer records, `seeder_addrs`/`leecher_addrs` the
    same peers' compact entries at the same positions, so an answer is a slice
    and a join. Inserting at a random position (the newcomer swaps places with
    a random member) keeps every group a uniformly random permutation; removal
    moves the last member into the hole, which keeps it one. `earliest` is at or
    before every member's expiry, so that looking for expired peers costs nothing
    until one may be (a lease request looks on every ask, and a layer's swarm in a
    big cluster holds thousands).
    """

    __slots__ = (
        "by_key", "downloaded", "earliest", "leecher_addrs", "leechers", "seeder_addrs", "seeders",
    )

    def __init__(self) -> None:
        self.seeders: list[Peer] = []
        self.leechers: list[Peer] = []
        self.seeder_addrs: list[bytes] = []
        self.leecher_addrs: list[bytes] = []
        self.by_key: dict[str, Peer] = {}
        self.downloaded = 0  # event=completed seen since the tracker started
        self.earliest = float("inf")

    def add(self, peer: Peer) -> None:
        group, addrs = (
            (self.seeders, self.seeder_addrs)
            if peer.seeder
            else (self.leechers, self.leecher_addrs)
        )
        n = len(group)
        at = random.randrange(n + 1)
        if at == n:
            group.append(peer)
            addrs.append(peer.compact)
        else:
            other = group[at]
            other.pos = n
            group.append(other)
            addrs.append(addrs[at])
            group[at] = peer
            addrs[at] = peer.compact
        peer.pos = at
        self.by_key[peer.key] = peer
        self.earliest = min(self.earliest, peer.expires_at)

    def discard(self, peer: Peer) -> None:
        group, addrs = (
            (self.seeders, self.seeder_addrs)
            if peer.seeder
            else (self.leechers, self.leecher_addrs)
        )
        last = group.pop()
        last_addr = addrs.pop()
        if last is not peer:
            group[peer.pos] = last
            addrs[peer.pos] = last_addr
            last.pos = peer.pos
        del self.by_key[peer.key]


@dataclass(frozen=True, slots=True)
class Totals:
    swarms: int
    peers: int
    seeders: int


def compact_address(ip: str, port: int) -> bytes:
    """BEP 23 (IPv4, 6 bytes) or BEP 7 (IPv6, 18 bytes) entry for ip:port."""
    if ip.startswith("::ffff:") and "." in ip:
        ip = ip[7:]  # an IPv4 client on a dual-stack socket
    try:
        packed = socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)
    except OSError:
        raise InvalidRequest(f"not an IP address: {ip[:64]!r}") from None
    return packed + port.to_bytes(2, "big")


class PeerTable:
    def __init__(self, *, max_peers_per_swarm: int, max_peers: int) -> None:
        self._swarms: dict[str, Swarm] = {}
        self._max_per_swarm = max_peers_per_swarm
        self._max_peers = max_peers
        self._peers = 0
        # (swarm key, identity) of every peer added, changed or removed since the
        # owner last took them (a replica writes them to its store); None: untracked.
        self.journal: set[tuple[str, str]] | None = None

    def swarm(self, key: str) -> Swarm | None:
        return self._swarms.get(key)

    def update(
        self,
        key: str,
        identity: str,
        peer_id: bytes,
        compact: bytes,
        *,
        seeder: bool,
        claims_seed: bool,
        expires_at: float,
        announced: tuple[float, int, int] = (0.0, 0, 0),
    ) -> tuple[Swarm, Peer, bool]:
        """Record an announce of `identity`: (swarm, its peer, whether it replaced
        another peer id or port of the same identity). LimitReached if a new
        peer does not fit. `announced`: when, and its `uploaded` and `downloaded`.
        An empty `peer_id` (a control call standing for an announce) keeps the
        peer's own."""
        swarm = self._swarms.get(key)
        if swarm is None:
            swarm = self._swarms[key] = Swarm()
        peer = swarm.by_key.get(identity)
        if self.journal is not None:
            self.journal.add((key, identity))
        if peer is None:
            if len(swarm.by_key) >= self._max_per_swarm or self._peers >= self._max_peers:
                if not swarm.by_key:
                    del self._swarms[key]
                raise LimitReached("the tracker's peer limit is reached")
            peer = Peer(identity, peer_id, compact, seeder, expires_at)
            peer.claims_seed = claims_seed
            peer.announced_at, peer.uploaded, peer.downloaded = announced
            swarm.add(peer)
            self._peers += 1
            return swarm, peer, False
        known = bool(peer.peer_id and peer_id)
        replaced = (known and peer.peer_id != peer_id) or peer.compact != compact
        peer.expires_at = expires_at
        swarm.earliest = min(swarm.earliest, expires_at)
        peer.peer_id = peer_id or peer.peer_id
        peer.claims_seed = claims_seed
        peer.announced_at, peer.uploaded, peer.downloaded = announced
        if peer.compact != compact or peer.seeder != seeder:
            swarm.discard(peer)
            peer.compact, peer.seeder = compact, seeder
            swarm.add(peer)
        return swarm, peer, replaced

    def claims_seed(self, key: str, identity: str) -> bool:
        """`identity`'s peer is in the swarm and announced `left=0` last time."""
        swarm = self._swarms.get(key)
        peer = None if swarm is None else swarm.by_key.get(identity)
        return peer is not None and peer.claims_seed

    def promote(self, key: str, identity: str) -> bool:
        """`identity` became a counted seeder: move its peer if it claims to seed."""
        swarm = self._swarms.get(key)
        peer = None if swarm is None else swarm.by_key.get(identity)
        if swarm is None or peer is None or peer.seeder or not peer.claims_seed:
            return False
        if self.journal is not None:
            self.journal.add((key, identity))
        swarm.discard(peer)
        peer.seeder = True
        swarm.add(peer)
        return True

    def remove(self, key: str, identity: str, peer_id: bytes | None = None) -> None:
        """Drop `identity`'s peer; with `peer_id`, only if it is still that one (a
        late `stopped` of a replaced session leaves its successor alone; a peer a
        control call entered has none yet, and goes)."""
        swarm = self._swarms.get(key)
        if swarm is None:
            return
        peer = swarm.by_key.get(identity)
        if peer is not None and (peer_id is None or peer.peer_id in (peer_id, b"")):
            if self.journal is not None:
                self.journal.add((key, identity))
            swarm.discard(peer)
            self._peers -= 1
            if not swarm.by_key:
                del self._swarms[key]

    def holder_of(self, key: str, compact: bytes) -> str | None:
        """The identity whose peer is at `compact` in the swarm, if any (a scan:
        for stall reports, not announces)."""
        swarm = self._swarms.get(key)
        if swarm is None:
            return None
        return next((p.key for p in swarm.by_key.values() if p.compact == compact), None)

    def peer(self, key: str, identity: str) -> Peer | None:
        swarm = self._swarms.get(key)
        return None if swarm is None else swarm.by_key.get(identity)

    def drop_swarm(self, key: str) -> None:
        swarm = self._swarms.pop(key, None)
        if swarm is not None:
            self._peers -= len(swarm.by_key)
            if self.journal is not None:
                self.journal.update((key, identity) for identity in swarm.by_key)

    def expire_swarm(self, key: str, now: float) -> int:
        """Drop the swarm's peers whose time is up; return how many."""
        swarm = self._swarms.get(key)
        if swarm is None or now < swarm.earliest:
            return 0
        dead = [p for p in swarm.by_key.values() if p.expires_at <= now]
        for peer in dead:
            swarm.discard(peer)
        swarm.earliest = min((p.expires_at for p in swarm.by_key.values()), default=float("inf"))
        self._peers -= len(dead)
        if not swarm.by_key:
            del self._swarms[key]
        return len(dead)

    def keys(self) -> Iterator[str]:
        """Swarm keys, snapshotted so callers may expire while iterating."""
        return iter(list(self._swarms))

    def seeders(self, key: str) -> int:
        swarm = self._swarms.get(key)
        return 0 if swarm is None else len(swarm.seeders)

    def seeder_identities(self, key: str) -> Iterator[str]:
        """Lazily: a caller looking for one that qualifies mostly stops at the first."""
        swarm = self._swarms.get(key)
        return iter(()) if swarm is None else (p.key for p in swarm.seeders)

    def totals(self) -> Totals:
        seeders = sum(len(s.seeders) for s in self._swarms.values())
        return Totals(len(self._swarms), self._peers, seeders)
