"""Poisoning a digest's torrent, before and after the honest publish, by a valid member.

A docker-registry, the tracker under mutual TLS and honest node processes with
certificates from the cluster CA; the adversary is a client holding a node
certificate of the same CA (`evil`), speaking the control API and announcing
as a node would. Its poison is a torrent that follows every cluster rule,
rooted at the cluster CA, made from garbage bytes of the layer's size.

- Before: `evil` takes the layer's upstream lease, defines the torrent with its
  poison and announces itself as its seeder. The first honest node joins that
  swarm, gets nothing, falls back to upstream and disputes the poison with its
  own torrent; the second, told VERIFY, fetches upstream and settles it; the
  third gets the layer from peers.
- After: the first honest node defines the torrent; `evil` reports it bad with
  its poison. Before issue 13 that replaced the torrent and blacklisted the
  honest one for good. Now the second node verifies, the honest torrent stays,
  and the third gets the layer from peers.

Each time: every pull returns the right bytes, the seed registry sends the
layer twice in all (one copy more than without the attack), `evil` loses its
right to define torrents, and the tracker answers throughout. The same three
nodes pull a twin layer of the same size, which nobody attacks, first: the
side-by-side numbers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes

import httpx
import libtorrent as lt
import pytest

from harness.images import build_image
from harness.node import NodeProcess
from harness.procs import free_port
from harness.registry import Registry
from p2preg.core import wire
from p2preg.core.digest import Digest
from p2preg.core.metainfo import Metainfo
from p2preg.core.tls import ReloadingTLS
from tests.adversary_cluster import Cluster, MiB, open_cluster, pull
from tests.fixtures.reliability import Attack, Tally
from tracker.metainfo import make_metainfo

pytestmark = [pytest.mark.integration, pytest.mark.slow]

COMMAND = ".venv/bin/pytest -q tests/test_adversary_poison.py"
REPO = "team/poison"
SIZE = 3 * MiB  # above the node's p2p threshold: the layer goes through lease and swarm


class Adversary:
    """A member gone bad: a valid node certificate, and the control API as a node uses it."""

    def __init__(self, world: Cluster, name: str = "evil") -> None:
        self.name = name
        self.url = world.tracker.url
        tls = ReloadingTLS(world.identity(name), role="node")
        self.http = httpx.Client(verify=tls.client_context(), trust_env=False, timeout=30)

    def close(self) -> None:
        self.http.close()

    def call(self, method: str, path: str, message: wire.Message) -> httpx.Response:
        return self.http.request(method, f"{self.url}{path}", content=wire.encode(message),
                                 headers={"Content-Type": wire.CONTENT_TYPE})  # fmt: skip

    def lease(self, digest: str, size: int) -> httpx.Response:
        return self.call("POST", f"/v1/leases/{digest}", wire.LeaseRequest(self.name, size))

    def publish(self, meta: Metainfo) -> httpx.Response:
        msg = wire.PublishMetainfo(self.name, meta.size, meta.data)
        return self.call("PUT", f"/v1/metainfo/{meta.digest}", msg)

    def report(self, stored: bytes, poison: Metainfo) -> httpx.Response:
        msg = wire.ReportBad(self.name, stored, "digest_mismatch", poison.size, poison.data)
        return self.call("POST", f"/v1/metainfo/{poison.digest}/bad", msg)

    def announce_seeder(self, meta: Metainfo, port: int) -> dict[bytes, Any]:
        """Announce as a seeder of `meta` at `port`, where nothing will ever answer."""
        query = (f"info_hash={quote_from_bytes(meta.swarm_keys[0], safe='')}"
                 f"&peer_id={quote_from_bytes(b'-EVIL-' + bytes(14), safe='')}"
                 f"&port={port}&uploaded=0&downloaded=0&left=0&compact=1")  # fmt: skip
        answer: dict[bytes, Any] = lt.bdecode(self.http.get(f"{self.url}/announce?{query}").content)
        return answer


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_image(tmp_path_factory.mktemp("poison"), seed="poison",
                       layer_sizes=(SIZE, SIZE))


@pytest.fixture(scope="module")
def tally() -> Iterator[Tally]:
    t = Tally("adversary-poison", COMMAND)
    yield t
    t.write()


@pytest.fixture
def world(tmp_path: Path, registry: Registry, layout: Any) -> Iterator[Cluster]:
    """The layer, then a twin of the same size nobody attacks; no node yet."""
    # A swarm whose only seeder never answers is given up on after 3 s, not 30.
    with open_cluster(tmp_path, registry, layout, REPO, node_config="swarm_stall_s = 3\n") as c:
        yield c


def control_pulls(world: Cluster, names: tuple[str, ...]) -> tuple[list[NodeProcess], float]:
    """Start the honest nodes; they pull the twin layer one after another: seconds."""
    nodes = [world.node(name) for name in names]
    return nodes, sum(pull(node, world.layers[1]) for node in nodes)


def poison_for(world: Cluster) -> Metainfo:
    """A torrent for the layer's digest and size by every cluster rule, made from garbage."""
    layer = world.layers[0]
    path = world.workdir / "garbage"
    path.write_bytes(os.urandom(layer.size))
    return make_metainfo(path, Digest.parse(layer.digest), layer.size, root=world.ca.cert_pem)


def record(client: httpx.Client, world: Cluster) -> wire.MetainfoRecord:
    r = client.get(f"{world.tracker.url}/v1/metainfo/{world.layers[0].digest}")
    assert r.status_code == 200, r.content
    return wire.decode(wire.MetainfoRecord, r.content)


def lookup(client: httpx.Client, world: Cluster) -> bytes:
    return record(client, world).metainfo


def assert_quarantined(evil: Adversary) -> None:
    """`evil` may not define a torrent now, for any digest: no lease, no report."""
    other = str(Digest.of(b"some other blob"))
    refused = evil.lease(other, 10)
    assert refused.status_code == 403, refused.content
    assert "lost a dispute" in wire.decode(wire.ErrorReply, refused.content).message


def test_poisoning_before_the_honest_publish(world: Cluster, tally: Tally) -> None:
    layer, twin = world.layers
    evil = Adversary(world)
    try:
        (h1, h2, h3), without_s = control_pulls(world, ("h1", "h2", "h3"))
        poison = poison_for(world)
        granted = wire.decode(wire.LeaseReply, evil.lease(layer.digest, layer.size).content)
        assert granted.status is wire.LeaseStatus.GRANTED  # first to ask: the holder
        assert evil.publish(poison).status_code == 201
        assert evil.announce_seeder(poison, free_port()).get(b"complete") == 1

        took_h1 = pull(h1, layer)  # the poisoned swarm stalls; h1 falls back and disputes
        assert h1.metric("p2preg_fallbacks_total", reason="stalled") == 1
        assert world.tracker_metric("p2preg_tracker_disputes_total", outcome="opened") == 1
        # Evidence, not a verdict: the poison is still what the tracker holds.
        assert lookup(evil.http, world) == poison.data
        assert evil.publish(poison).status_code == 200  # the same torrent: nothing defined

        took_h2 = pull(h2, layer)  # told VERIFY: fetches upstream, settles
        assert world.tracker_metric("p2preg_tracker_disputes_total", outcome="overturned") == 1
        assert lookup(evil.http, world) != poison.data
        assert_quarantined(evil)

        took_h3 = pull(h3, layer)
        assert h3.metric("p2preg_peer_blob_bytes_total") > 0  # P2P serves the digest again
        assert h3.metric("p2preg_blob_fetches_total", source="peers") == 2  # and the twin
        assert world.upstream_copies(layer) == 2  # h1's fallback and h2's verification
        assert world.upstream_copies(twin) == 1
        assert [n.metric("p2preg_blob_fetches_total", source="upstream")
                for n in (h1, h2)] == [2, 1]  # fmt: skip
        record_attack(tally, world, "poisoning before the honest publish", without_s,
                      (took_h1, took_h2, took_h3))  # fmt: skip
    finally:
        evil.close()


def test_poisoning_after_the_honest_publish(world: Cluster, tally: Tally) -> None:
    layer, twin = world.layers
    evil = Adversary(world)
    try:
        (h1, h2, h3), without_s = control_pulls(world, ("h1", "h2", "h3"))
        took_h1 = pull(h1, layer)  # granted: defines the torrent
        filed = record(evil.http, world)
        honest, stored_hash = filed.metainfo, filed.info_hashes[0]
        poison = poison_for(world)
        # Before issue 13 this replaced the honest torrent and blacklisted it.
        reported = evil.report(stored_hash, poison)
        assert reported.status_code == 200, reported.content
        assert lookup(evil.http, world) == honest
        assert world.tracker_metric("p2preg_tracker_disputes_total", outcome="opened") == 1
        assert evil.publish(poison).status_code == 409  # disputed: only verification settles
        again = evil.report(stored_hash, poison_for(world))
        assert again.status_code == 409  # one dispute per digest at a time

        took_h2 = pull(h2, layer)  # told VERIFY: fetches upstream, the honest torrent stays
        assert world.tracker_metric("p2preg_tracker_disputes_total", outcome="upheld") == 1
        assert lookup(evil.http, world) == honest
        assert_quarantined(evil)
        assert evil.report(stored_hash, poison).status_code == 403

        took_h3 = pull(h3, layer)
        assert h3.metric("p2preg_peer_blob_bytes_total") > 0
        assert world.upstream_copies(layer) == 2  # h1's own fetch and h2's verification
        assert world.upstream_copies(twin) == 1
        record_attack(tally, world, "poisoning after the honest publish", without_s,
                      (took_h1, took_h2, took_h3), settled_s=took_h2)  # fmt: skip
    finally:
        evil.close()


def record_attack(tally: Tally, world: Cluster, name: str, without_s: float,
                  took: tuple[float, float, float], settled_s: float | None = None) -> None:
    """One attack's numbers: P2P serves the digest again once h2 settled the dispute
    (`settled_s` after the attack began: by default h1's and h2's pulls)."""
    layer, twin = world.layers
    tally.pulls_attempted += 6
    tally.pulls_completed += 6
    tally.bytes_verified += 6 * layer.size
    tally.faults_injected[name] += 1
    tally.attacks.append(Attack(
        name, without_s, sum(took), world.upstream_copies(twin), world.upstream_copies(layer),
        p2p_again_s=took[0] + took[1] if settled_s is None else settled_s,
        note="h1, h2, h3 one after another; swarm_stall_s = 3 here (30 by default)",
    ))  # fmt: skip
