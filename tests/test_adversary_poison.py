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
right to define torrents, and the tracker answers throughout.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes

import httpx
import libtorrent as lt
import pytest

from harness.images import build_image
from harness.node import NodeProcess, metric_value, open_node
from harness.procs import free_port
from harness.registry import Registry
from harness.skopeo import push
from harness.tlscerts import ClusterCA
from harness.tracker import TrackerProcess, open_tracker
from p2preg.core import wire
from p2preg.core.digest import Digest
from p2preg.core.metainfo import Metainfo
from p2preg.core.tls import ReloadingTLS
from tracker.metainfo import make_metainfo

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEED_NS = "seed.test"
REPO = "team/poison"
MiB = 1 << 20
SIZE = 3 * MiB  # above the node's p2p threshold: the layer goes through lease and swarm


@dataclass
class World:
    ca: ClusterCA
    certs: Path
    tracker: TrackerProcess
    registry: Registry
    digest: str
    size: int
    stack: ExitStack
    workdir: Path
    config: Path

    def node(self, name: str) -> NodeProcess:
        args = ("--tracker", self.tracker.url, "--peer-host", "127.0.0.1", "--peer-port", "0",
                "--peer-ssl-port", str(free_port()), "--config", str(self.config))  # fmt: skip
        tls_dir = self.ca.tls_dir(self.certs / name, "node", name)
        return self.stack.enter_context(open_node(
            self.workdir / name, [f"{SEED_NS}={self.registry.url}"], args=args, name=name,
            tls_dir=tls_dir,
        ))  # fmt: skip

    def upstream_gets(self) -> int:
        """GETs of the layer the seed registry answered, so far."""
        self.registry.settle()
        return sum(
            1 for r in self.registry.served_requests()
            if r.method == "GET" and r.blob is not None and r.blob[1] == self.digest
        )  # fmt: skip

    def tracker_metric(self, name: str, **labels: str) -> float:
        assert self.tracker.metrics_url is not None
        text = httpx.get(f"{self.tracker.metrics_url}/metrics", timeout=10).text
        return metric_value(text, name, **labels)


class Adversary:
    """A member gone bad: a valid node certificate, and the control API as a node uses it."""

    def __init__(self, world: World, name: str = "evil") -> None:
        self.name = name
        self.url = world.tracker.url
        tls = ReloadingTLS(world.ca.tls_dir(world.certs / name, "node", name), role="node")
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
    return build_image(tmp_path_factory.mktemp("poison"), seed="poison", layer_sizes=(SIZE,))


@pytest.fixture
def world(tmp_path: Path, registry: Registry, layout: Any) -> Iterator[World]:
    (blob,) = push(layout, registry.host, REPO).manifests[0].layers
    ca = ClusterCA.make("poison")
    certs = tmp_path / "certs"
    config = tmp_path / "node.toml"
    # A swarm whose only seeder never answers is given up on after 3 s, not 30.
    config.write_text("swarm_stall_s = 3\n")
    with ExitStack() as stack:
        tracker = stack.enter_context(open_tracker(
            tmp_path / "tracker",
            tls_dir=ca.tls_dir(certs / "tracker", "tracker", "t", ips=["127.0.0.1"]),
        ))  # fmt: skip
        yield World(ca, certs, tracker, registry, blob.digest, blob.size, stack, tmp_path,
                    config)  # fmt: skip


def poison_for(world: World) -> Metainfo:
    """A torrent for the layer's digest and size by every cluster rule, made from garbage."""
    path = world.workdir / "garbage"
    path.write_bytes(os.urandom(world.size))
    return make_metainfo(path, Digest.parse(world.digest), world.size, root=world.ca.cert_pem)


def pull(node: NodeProcess, world: World) -> float:
    """Pull the layer through `node`, check every byte, return how long it took."""
    start = time.monotonic()
    r = httpx.get(f"{node.url}/v2/{REPO}/blobs/{world.digest}?ns={SEED_NS}", timeout=120)
    took = time.monotonic() - start
    assert r.status_code == 200, r.text[:300]
    assert "sha256:" + hashlib.sha256(r.content).hexdigest() == world.digest
    return took


def record(client: httpx.Client, world: World) -> wire.MetainfoRecord:
    r = client.get(f"{world.tracker.url}/v1/metainfo/{world.digest}")
    assert r.status_code == 200, r.content
    return wire.decode(wire.MetainfoRecord, r.content)


def lookup(client: httpx.Client, world: World) -> bytes:
    return record(client, world).metainfo


def assert_quarantined(evil: Adversary) -> None:
    """`evil` may not define a torrent now, for any digest: no lease, no report."""
    other = str(Digest.of(b"some other blob"))
    refused = evil.lease(other, 10)
    assert refused.status_code == 403, refused.content
    assert "lost a dispute" in wire.decode(wire.ErrorReply, refused.content).message


def test_poisoning_before_the_honest_publish(world: World) -> None:
    evil = Adversary(world)
    try:
        poison = poison_for(world)
        granted = wire.decode(wire.LeaseReply, evil.lease(world.digest, world.size).content)
        assert granted.status is wire.LeaseStatus.GRANTED  # first to ask: the holder
        assert evil.publish(poison).status_code == 201
        assert evil.announce_seeder(poison, free_port()).get(b"complete") == 1

        h1 = world.node("h1")
        took_h1 = pull(h1, world)  # the poisoned swarm stalls; h1 falls back and disputes
        assert h1.metric("p2preg_fallbacks_total", reason="stalled") == 1
        assert world.tracker_metric("p2preg_tracker_disputes_total", outcome="opened") == 1
        # Evidence, not a verdict: the poison is still what the tracker holds.
        assert lookup(evil.http, world) == poison.data
        assert evil.publish(poison).status_code == 200  # the same torrent: nothing defined

        h2 = world.node("h2")
        took_h2 = pull(h2, world)  # told VERIFY: fetches upstream, settles
        assert world.tracker_metric("p2preg_tracker_disputes_total", outcome="overturned") == 1
        assert lookup(evil.http, world) != poison.data
        assert_quarantined(evil)

        h3 = world.node("h3")
        took_h3 = pull(h3, world)
        assert h3.metric("p2preg_peer_blob_bytes_total") > 0  # P2P serves the digest again
        assert h3.metric("p2preg_blob_fetches_total", source="peers") == 1
        assert world.upstream_gets() == 2  # h1's fallback and h2's verification
        assert all(n.metric("p2preg_blob_fetches_total", source="upstream") == 1
                   for n in (h1, h2))  # fmt: skip
        print(f"\npoison before: h1 {took_h1:.2f} s, h2 {took_h2:.2f} s, h3 {took_h3:.2f} s")
    finally:
        evil.close()


def test_poisoning_after_the_honest_publish(world: World) -> None:
    evil = Adversary(world)
    try:
        h1 = world.node("h1")
        took_h1 = pull(h1, world)  # granted: defines the torrent
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

        h2 = world.node("h2")
        took_h2 = pull(h2, world)  # told VERIFY: fetches upstream, the honest torrent stays
        assert world.tracker_metric("p2preg_tracker_disputes_total", outcome="upheld") == 1
        assert lookup(evil.http, world) == honest
        assert_quarantined(evil)
        assert evil.report(stored_hash, poison).status_code == 403

        h3 = world.node("h3")
        took_h3 = pull(h3, world)
        assert h3.metric("p2preg_peer_blob_bytes_total") > 0
        assert world.upstream_gets() == 2  # h1's own fetch and h2's verification
        print(f"\npoison after: h1 {took_h1:.2f} s, h2 {took_h2:.2f} s, h3 {took_h3:.2f} s")
    finally:
        evil.close()

