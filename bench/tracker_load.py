"""The cluster bench/tracker's announces come from: many identities, mostly seeders.

The tracker keeps one peer per identity per swarm (tracker/admission.py), so a
load from one address with random peer ids and no `node=` is one identity per
swarm: every announce replaces the last and no answer carries a peer. This
module models a cluster instead, the same for every generator (wrk's Lua, the
UDP loop, bench/tracker_mtls.py's workers) and every tracker:

- `nodes` nodes, `swarms` swarms of `per_swarm` members each; member j of
  swarm s is node (s * per_swarm + j) mod nodes, so a swarm's members are
  distinct nodes and each node is in about swarms * per_swarm / nodes swarms;
- a node's identity is its name `bench-node-NNNNN` (`node=` in plain HTTP and
  in BEP 15's URL data; its certificate under mutual TLS); its peer id and port
  are its own and stay the same across its announces (a running session);
- the first `leechers` members of a swarm download (`left` > 0), the others seed
  (`left=0`, and confirmed by `POST /v1/metainfo/<digest>/confirm`, as a node
  does after a verified download, so they count as seeders);
- an announce is a member chosen uniformly at random re-announcing, with no
  event, after a warm-up in which every member announced once.

Also: the published torrents (acquire the lease, publish, release, as a node
does), the confirmations, and counting the peers in an answer. Not a test: it
holds no assertions on speed; `check_answer` refuses a load whose answers carry
no peers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote_from_bytes

import httpx
import trio

from bench.keptalive import KeptAlive
from p2preg.core import wire
from p2preg.core.digest import Digest
from p2preg.core.metainfo import Metainfo
from tracker.client import TrackerClient
from tracker.metainfo import make_metainfo

NUMWANT = 50
# Peer ports start here; node i's is FIRST_PORT + i (so nodes ≤ 55,000).
FIRST_PORT = 10_000
# Seed confirmations under way at once. Each waits up to confirm_rides.HOLD_S for a
# lease request to ride (none goes here) before it is sent alone; under mutual TLS
# each is a node's own connection, so well below the tracker's 256 connections per
# address still in their handshake (max_preauth_connections_per_ip).
CONFIRM_CONCURRENCY = 128


@dataclass(frozen=True)
class Cluster:
    nodes: int = 10_000
    swarms: int = 1000
    per_swarm: int = 56  # numwant 50 + room: a leecher's answer is full
    leechers: int = 6  # of per_swarm: ~11 % of announces are downloads

    def __post_init__(self) -> None:
        if not 0 < self.per_swarm <= self.nodes <= 65535 - FIRST_PORT:
            raise ValueError(f"need 0 < per_swarm ≤ nodes ≤ {65535 - FIRST_PORT}")
        if not 0 <= self.leechers <= self.per_swarm:
            raise ValueError("leechers must be 0 to per_swarm")

    @property
    def members(self) -> int:
        return self.swarms * self.per_swarm

    def node(self, swarm: int, j: int) -> int:
        return (swarm * self.per_swarm + j) % self.nodes

    def seeders(self) -> Iterator[tuple[int, int]]:
        """(swarm, node) of every seeding member."""
        for s in range(self.swarms):
            for j in range(self.leechers, self.per_swarm):
                yield s, self.node(s, j)


def node_name(i: int) -> str:
    return f"bench-node-{i:05d}"


def peer_id(i: int) -> bytes:
    return f"-BN0001-{i:012d}".encode()


def left(j: int, cluster: Cluster) -> int:
    return 1 + j * 1000 if j < cluster.leechers else 0


def query(cluster: Cluster, ih: bytes, swarm: int, j: int, *, node: bool = True) -> str:
    """The announce query of member j of `swarm` (whose info-hash is `ih`)."""
    i = cluster.node(swarm, j)
    q = (
        f"info_hash={quote_from_bytes(ih, safe='')}&peer_id={peer_id(i).decode()}"
        f"&port={FIRST_PORT + i}&uploaded=0&downloaded=0&left={left(j, cluster)}"
        f"&compact=1&numwant={NUMWANT}"
    )
    return q + f"&node={node_name(i)}" if node else q


def count_peers(body: bytes) -> int:
    """IPv4 peers in a bencoded compact announce answer (-1 if it has none: a failure)."""
    at = body.find(b"5:peers")
    if at < 0:
        return -1
    at += 7
    colon = body.find(b":", at)
    if colon < 0 or not body[at:colon].isdigit():
        return -1
    return int(body[at:colon]) // 6


def make_torrents(workdir: Path, n: int, *, root: bytes | None = None) -> list[Metainfo]:
    """`n` small blobs' torrents (SSL torrents rooted at the CA `root`, if given)."""
    blobs = workdir / ("blobs" if root is None else "blobs-ssl")
    blobs.mkdir()
    metas = []
    for i in range(n):
        data = i.to_bytes(4, "big") + os.urandom(16 * 1024)
        path = blobs / str(i)
        path.write_bytes(data)
        metas.append(make_metainfo(path, Digest.of(data), len(data), root=root))
    return metas


async def publish_all(client: TrackerClient, metas: list[Metainfo]) -> None:
    """Publish every torrent as its lease holder would, releasing each lease after."""
    for meta in metas:
        reply = await client.acquire_lease(meta.digest, size=meta.size)
        await client.publish_metainfo(meta.digest, meta.size, meta.data)
        if reply.lease_id is not None:
            await client.release_lease(meta.digest, reply.lease_id)


async def confirm_seeders(
    clients: dict[int, TrackerClient], cluster: Cluster, metas: list[Metainfo]
) -> None:
    """Every seeding member confirms its swarm's torrent, through its node's client."""
    pending = list(cluster.seeders())
    limit = trio.CapacityLimiter(CONFIRM_CONCURRENCY)

    async def one(s: int, i: int) -> None:
        async with limit:
            await clients[i].confirm_seed(metas[s].digest, metas[s].info_hash_v2)

    async with trio.open_nursery() as nursery:
        for s, i in pending:
            nursery.start_soon(one, s, i)


def ask_seeded(client: KeptAlive, digest: str, i: int) -> tuple[int, int, int]:
    """Node i asks for the lease on a blob it lacks, naming its peer port:
    (1 if answered SEEDED, 1 if anything else, the answer's peers)."""
    ask = wire.LeaseRequest(node_name(i), port=FIRST_PORT + i)
    status, body = client.post(f"/v1/leases/{digest}", wire.encode(ask), "application/msgpack")
    if status != 200:
        return 0, 1, 0
    reply = wire.decode(wire.LeaseReply, body)
    seeded = reply.status is wire.LeaseStatus.SEEDED
    return int(seeded), int(not seeded), len(reply.peers or ()) if seeded else 0


def check_answer(url: str, cluster: Cluster, ih: bytes, *, token: str | None) -> tuple[int, int]:
    """Peers in the answers to swarm 0's first leecher and last seeder; refuse none."""
    got = []
    for j in (0, cluster.per_swarm - 1):
        q = query(cluster, ih, 0, j) + (f"&token={token}" if token else "")
        body = httpx.get(f"{url}/announce?{q}", timeout=10).content
        if count_peers(body) <= 0:
            raise RuntimeError(f"member {j} of swarm 0 got no peers: {body[:200]!r}")
        got.append(count_peers(body))
    return got[0], got[1]
