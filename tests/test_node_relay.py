"""The node's announce relay (p2preg/node/relay.py) with real processes under mutual TLS.

Real processes on loopback: the seed registry, one tracker under mutual TLS,
two nodes of its CA. Each node's libtorrent announces only to its relay; what
must hold: the tracker takes them under the node's certificate identity (the
first node's publish enters it as a seeder, its relay answers its start, and
the tracker hands it out, by its SSL port, to the second, which gets the blob
from it and nothing from upstream); announces
through a relay grow the tracker's count while its TLS handshakes stay at the
control connection's (one handshake, not one per announce); a seeder's
relayed announce gets the long seeder interval and a leecher's the short one;
and the relay's guard answers an announce for a torrent the node does not
hold, or for another port, with a bencoded failure that reaches no tracker.
With short tracker intervals, a node seeding several blobs sends its seeders'
periodic refreshes in batches of more than one, on the connection it has, and
the tracker keeps counting it a seeder of every one.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes

import httpx
import libtorrent as lt
import pytest
import trio

from harness.images import PushedImage, build_image
from harness.node import NodeProcess, open_node
from harness.procs import free_port, http_get
from harness.registry import Registry
from harness.skopeo import push
from harness.tlscerts import ClusterCA
from harness.tracker import TrackerProcess, open_tracker
from p2preg.core.digest import Digest
from p2preg.core.tls import ReloadingTLS
from tests.fixtures.cluster import get_blob, wait_for
from tracker.client import open_tracker_client

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEED_NS = "seed.test"
MiB = 1024 * 1024
LAYER = 3 * MiB  # above the node's p2p threshold: the swarm's
# The tracker's seeder interval is 1800 s ±10 %; a leecher's is far shorter.
SEEDER_INTERVAL_MIN = 1620
_RELAY_LOG = re.compile(r"relay: libtorrent announces to (http://127\.0\.0\.1:\d+/announce)")


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_image(tmp_path_factory.mktemp("relay"), seed="relay", layer_sizes=(LAYER,))


@dataclass(frozen=True)
class Cluster:
    tracker: TrackerProcess
    nodes: dict[str, NodeProcess]
    ports: dict[str, int]  # each node's SSL peer port
    image: PushedImage
    info_hash: bytes  # the layer's, as libtorrent announces it


def _tracker_metric(tracker: TrackerProcess, name: str, **labels: str) -> float:
    """Summed over the label sets that match `labels`."""
    text = http_get(f"{tracker.metrics_url or tracker.url}/metrics").text
    total = 0.0
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample != name and not sample.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in sample for k, v in labels.items()):
            total += float(value)
    return total


def _pull(node: NodeProcess, image: PushedImage) -> None:
    layer = image.manifests[0].layers[0]
    r = get_blob(f"{node.url}/v2/{image.repository}/blobs/{layer.digest}")
    assert r.status_code == 200, (r.status_code, r.text[:300])
    assert "sha256:" + hashlib.sha256(r.content).hexdigest() == layer.digest


def _info_hash(tracker: TrackerProcess, ca: ClusterCA, certs: Path, digest: str) -> bytes:
    async def read() -> bytes:
        tls = ReloadingTLS(ca.tls_dir(certs / "reader", "node", "reader"), role="node")
        async with open_tracker_client(tracker.url, node="reader", tls=tls) as client:
            record = await client.lookup_metainfo(Digest.parse(digest))
        assert record is not None
        return record.metainfo

    info = lt.torrent_info(trio.run(read))
    return bytes(info.info_hashes().v2.to_bytes())[:20]


@pytest.fixture
def cluster(tmp_path: Path, registry: Registry, layout: Any) -> Iterator[Cluster]:
    image = push(layout, registry.host, "relay/app")
    ca = ClusterCA.make("relay")
    certs = tmp_path / "certs"
    with ExitStack() as stack:
        tracker = stack.enter_context(open_tracker(
            tmp_path / "tracker",
            tls_dir=ca.tls_dir(certs / "tracker", "tracker", "t", ips=["127.0.0.1"]),
        ))  # fmt: skip
        ports = {"n1": free_port(), "n2": free_port()}
        nodes = {}
        for name, port in ports.items():
            args = ("--tracker", tracker.url, "--peer-host", "127.0.0.1",
                    "--peer-ssl-port", str(port), "--node-name", name)  # fmt: skip
            nodes[name] = stack.enter_context(open_node(
                tmp_path / name, [f"{SEED_NS}={registry.url}"], args=args, name=name,
                tls_dir=ca.tls_dir(certs / name, "node", name),
            ))  # fmt: skip
        _pull(nodes["n1"], image)
        wait_for(lambda: _tracker_metric(tracker, "p2preg_tracker_seeders") == 1, 30, "n1 seeds")
        digest = image.manifests[0].layers[0].digest
        yield Cluster(tracker, nodes, ports, image, _info_hash(tracker, ca, certs, digest))


def _relay_url(node: NodeProcess) -> str:
    found = _RELAY_LOG.search(node.process.log_path.read_text())
    assert found is not None, "the node logs where its relay listens"
    return found.group(1)


def _announce(
    node: NodeProcess, info_hash: bytes, port: int, *, left: int, event: str = ""
) -> dict[bytes, Any]:
    """What libtorrent would get for one announce to `node`'s relay."""
    query = (f"info_hash={quote_from_bytes(info_hash)}&peer_id=-TS0001-{'x' * 12}"
             f"&port={port}&uploaded=0&downloaded=0&left={left}&compact=1{event}")  # fmt: skip
    r = httpx.get(f"{_relay_url(node)}?{query}", timeout=30, trust_env=False)
    assert r.status_code == 200
    body: Any = lt.bdecode(r.content)
    assert isinstance(body, dict)
    return body


def test_relayed_announces_carry_the_node_s_identity_without_a_handshake_each(
    cluster: Cluster,
) -> None:
    t, n1, n2 = cluster.tracker, cluster.nodes["n1"], cluster.nodes["n2"]
    # n1 became a seeder by its publish, which named its port (its relay answered
    # its libtorrent's start itself) ...
    assert _tracker_metric(t, "p2preg_tracker_peers_entered_total", by="publish") == 1
    assert n1.metric("p2preg_relay_announces_total", result="local") >= 1
    # ... and the tracker hands it out, as n1, to n2: the layer comes from n1.
    _pull(n2, cluster.image)
    assert n2.metric("p2preg_peer_blob_bytes_total") >= LAYER
    assert n2.metric("p2preg_upstream_blob_bytes_total") == 0

    handshakes = _tracker_metric(t, "p2preg_tracker_tls_handshakes_total")
    applied = _tracker_metric(t, "p2preg_tracker_relayed_total", result="applied")
    for _ in range(30):  # `started`: never answered by the relay itself
        seeder = _announce(n1, cluster.info_hash, cluster.ports["n1"], left=0,
                           event="&event=started")  # fmt: skip
        assert b"failure reason" not in seeder, seeder
        assert seeder[b"interval"] >= SEEDER_INTERVAL_MIN  # n1 is a confirmed seeder
    # A leecher's announce (n2 claiming left > 0) gets the short interval and n1's address.
    leecher = _announce(n2, cluster.info_hash, cluster.ports["n2"], left=1)
    assert b"failure reason" not in leecher and leecher[b"interval"] < SEEDER_INTERVAL_MIN
    peers = leecher[b"peers"]
    n1_peer = bytes([127, 0, 0, 1]) + cluster.ports["n1"].to_bytes(2, "big")
    assert n1_peer in [peers[i : i + 6] for i in range(0, len(peers), 6)]
    # 31 more announces applied; at most one new handshake (a connection the tracker
    # closed for idleness), where direct announces would have cost 31.
    after = _tracker_metric(t, "p2preg_tracker_relayed_total", result="applied")
    assert after - applied >= 31
    assert _tracker_metric(t, "p2preg_tracker_tls_handshakes_total") - handshakes <= 1


def test_the_guard_refuses_other_torrents_and_other_ports(cluster: Cluster) -> None:
    t, n1 = cluster.tracker, cluster.nodes["n1"]
    announces = _tracker_metric(t, "p2preg_tracker_announces_total")
    relayed = _tracker_metric(t, "p2preg_tracker_relayed_total")
    unknown = _announce(n1, bytes(range(20)), cluster.ports["n1"], left=0)
    assert b"unknown_torrent" in unknown[b"failure reason"]
    # n2's port, announced through n1's relay: n1 would hand out another's address.
    other = _announce(n1, cluster.info_hash, cluster.ports["n2"], left=0)
    assert b"other_port" in other[b"failure reason"]
    assert n1.metric("p2preg_relay_announces_total", result="unknown_torrent") == 1
    assert n1.metric("p2preg_relay_announces_total", result="other_port") == 1
    # Neither reached the tracker.
    assert _tracker_metric(t, "p2preg_tracker_relayed_total") == relayed
    assert _tracker_metric(t, "p2preg_tracker_announces_total") == announces


# Seeders re-announce every 20 s ±10 % and are kept 25 s; the relay sends its
# refreshes every 2.5 s, so the latest one lands 24.5 s after the last.
SHORT_TRACKER = ("--announce-interval-s", "6", "--min-announce-interval-s", "1",
                 "--peer-ttl-s", "30", "--seeder-announce-interval-s", "20")  # fmt: skip
LAYERS = 8


def test_seeder_refreshes_go_in_batches_on_the_open_connection(
    tmp_path: Path, registry: Registry, tmp_path_factory: pytest.TempPathFactory
) -> None:
    layout = build_image(tmp_path_factory.mktemp("refresh"), seed="refresh",
                         layer_sizes=(2 * MiB,) * LAYERS)  # fmt: skip
    image = push(layout, registry.host, "relay/refresh")
    ca = ClusterCA.make("refresh")
    certs = tmp_path / "certs"
    with ExitStack() as stack:
        t = stack.enter_context(open_tracker(
            tmp_path / "tracker", args=SHORT_TRACKER,
            tls_dir=ca.tls_dir(certs / "tracker", "tracker", "t", ips=["127.0.0.1"]),
        ))  # fmt: skip
        args = ("--tracker", t.url, "--peer-host", "127.0.0.1", "--peer-ssl-port",
                str(free_port()), "--node-name", "n1", "--relay-refresh-s", "2.5")  # fmt: skip
        n1 = stack.enter_context(open_node(
            tmp_path / "n1", [f"{SEED_NS}={registry.url}"], args=args, name="n1",
            tls_dir=ca.tls_dir(certs / "n1", "node", "n1"),
        ))  # fmt: skip
        for layer in image.manifests[0].layers:
            r = get_blob(f"{n1.url}/v2/{image.repository}/blobs/{layer.digest}")
            assert r.status_code == 200, (r.status_code, r.text[:300])
        wait_for(lambda: _tracker_metric(t, "p2preg_tracker_seeders") == LAYERS, 30, "seeds")
        # Past the first answers: every torrent's announces are now refreshes.
        wait_for(lambda: n1.metric("p2preg_relay_announces_total", result="held") >= LAYERS,
                 60, "refreshes the relay answered")  # fmt: skip
        applied = _tracker_metric(t, "p2preg_tracker_relayed_total", result="applied")
        batches = _tracker_metric(t, "p2preg_tracker_relayed_batches_total")
        handshakes = _tracker_metric(t, "p2preg_tracker_tls_handshakes_total")
        held = n1.metric("p2preg_relay_announces_total", result="held")
        # Two seeder intervals and more: each torrent refreshed at least twice.
        wait_for(lambda: n1.metric("p2preg_relay_announces_total", result="held")
                 >= held + 2 * LAYERS, 90, "two rounds of refreshes")  # fmt: skip
        sent = _tracker_metric(t, "p2preg_tracker_relayed_total", result="applied") - applied
        sent_in = _tracker_metric(t, "p2preg_tracker_relayed_batches_total") - batches
        assert sent >= LAYERS and sent > sent_in, (sent, sent_in)  # batches of more than one
        assert _tracker_metric(t, "p2preg_tracker_tls_handshakes_total") == handshakes
        assert _tracker_metric(t, "p2preg_tracker_seeders") == LAYERS  # none expired
