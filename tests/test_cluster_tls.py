"""A whole TLS cluster as real processes, and the members it refuses.

A docker-registry, the tracker under mutual TLS and two nodes with certificates
from the cluster CA share a blob through the swarm: the second node gets its
bytes from the first over the SSL peer port, and the blob crosses the upstream
link once. Then the outsiders, as processes or sessions of their own:

- a node with an expired certificate does not start, and says why in one line;
- a node with another CA's certificate naming itself `a` (trusting our CA too,
  as someone who copied ca.crt would) starts, but the tracker refuses it: it cannot announce,
  read metainfo or take a lease, the tracker counts it as `unknown_ca`, and its
  pulls still succeed from upstream, verified;
- a libtorrent session holding that certificate and the blob's metainfo
  (read by the test with a member's certificate) connects to a good node's SSL
  peer port: it gets no byte, and the node counts the refused handshake.

Nothing crashes: every process is still serving at the end.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import libtorrent as lt
import pytest
import trio

from harness.images import build_image
from harness.node import NodeProcess, metric_value, open_node
from harness.procs import clean_env, free_port, wait_until
from harness.registry import Registry
from harness.skopeo import push
from harness.tlscerts import ClusterCA, expired_tls_dir
from harness.tracker import TrackerProcess, open_tracker
from p2preg.core.digest import Digest
from p2preg.core.tls import ReloadingTLS
from p2preg.node.peertls import write_dh_params
from tracker.client import open_tracker_client
from tracker.tls_gate import REFUSAL_REASONS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEED_NS = "seed.test"
REPO = "team/tls-cluster"
MiB = 1 << 20
SIZE = 3 * MiB  # above the node's p2p threshold: the blob goes through lease and swarm


@dataclass(frozen=True)
class Cluster:
    ca: ClusterCA
    certs: Path
    tracker: TrackerProcess
    nodes: dict[str, NodeProcess]
    peer_ports: dict[str, int]
    registry: Registry
    digest: str
    size: int


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_image(tmp_path_factory.mktemp("tlscluster"), seed="tlscluster",
                       layer_sizes=(SIZE,))


def _node(
    stack: ExitStack, workdir: Path, name: str, registry: Registry, tracker: str,
    tls_dir: Path, peer_ssl_port: int = 0,
) -> NodeProcess:
    args = ("--tracker", tracker, "--peer-host", "127.0.0.1", "--peer-port", "0",
            "--peer-ssl-port", str(peer_ssl_port))
    return stack.enter_context(open_node(
        workdir / name, [f"{SEED_NS}={registry.url}"], args=args, name=name, tls_dir=tls_dir
    ))


@pytest.fixture
def cluster(tmp_path: Path, registry: Registry, layout: Any) -> Iterator[Cluster]:
    (blob,) = push(layout, registry.host, REPO).manifests[0].layers
    ca = ClusterCA.make("tlscluster")
    certs = tmp_path / "certs"
    with ExitStack() as stack:
        tracker = stack.enter_context(open_tracker(
            tmp_path / "tracker",
            tls_dir=ca.tls_dir(certs / "tracker", "tracker", "t", ips=["127.0.0.1"]),
        ))
        ports = {"a": free_port(), "b": free_port()}
        nodes = {
            name: _node(stack, tmp_path, name, registry, tracker.url,
                        ca.tls_dir(certs / name, "node", name), ports[name])
            for name in ("a", "b")
        }
        yield Cluster(ca, certs, tracker, nodes, ports, registry, blob.digest, blob.size)


def _pull_verified(node: NodeProcess, cluster: Cluster) -> None:
    url = f"{node.url}/v2/{REPO}/blobs/{cluster.digest}?ns={SEED_NS}"
    r = httpx.get(url, timeout=120)
    assert r.status_code == 200, r.text[:300]
    assert len(r.content) == cluster.size
    assert "sha256:" + hashlib.sha256(r.content).hexdigest() == cluster.digest


def _tracker_metric(tracker: TrackerProcess, name: str, **labels: str) -> float:
    assert tracker.metrics_url is not None
    text = httpx.get(f"{tracker.metrics_url}/metrics", timeout=10).text
    assert name.removesuffix("_total") in text, name
    return metric_value(text, name, **labels)


def _upstream_fetches(nodes: list[NodeProcess]) -> float:
    return sum(n.metric("p2preg_blob_fetches_total", source="upstream") for n in nodes)


def test_two_members_share_a_blob_through_the_ssl_swarm(cluster: Cluster) -> None:
    a, b = cluster.nodes["a"], cluster.nodes["b"]
    _pull_verified(a, cluster)
    _pull_verified(b, cluster)
    assert b.metric("p2preg_peer_blob_bytes_total") > 0
    assert b.metric("p2preg_blob_fetches_total", source="peers") == 1
    assert _upstream_fetches([a, b]) == 1  # the blob crossed the upstream link once
    assert _tracker_metric(cluster.tracker, "p2preg_tracker_lease_grants_total") == 1
    assert sum(_refusals(cluster.tracker).values()) == 0
    for node in (a, b):
        assert node.metric("p2preg_peer_tls_refusals_total") == 0


def _refusals(tracker: TrackerProcess) -> dict[str, float]:
    return {r: _tracker_metric(tracker, "p2preg_tracker_tls_refusals_total", reason=r)
            for r in REFUSAL_REASONS}


def test_a_node_with_an_expired_certificate_refuses_to_start_in_one_line(
    tmp_path: Path,
) -> None:
    expired = expired_tls_dir(ClusterCA.make("tlscluster"), tmp_path / "old", "node", "old")
    argv = [sys.executable, "-m", "p2preg", "node", "--tls-dir", str(expired),
            "--tracker", "https://127.0.0.1:9", "--data-dir", str(tmp_path / "data"),
            "--listen", f"127.0.0.1:{free_port()}", "--upstream", f"{SEED_NS}=http://127.0.0.1:9"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                          env=clean_env(drop_prefixes=["P2PREG_"]))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert f"{expired / 'tls.crt'}: certificate expired" in proc.stderr
    assert "PRIVATE" not in proc.stderr


def test_a_node_of_another_ca_gets_nothing_from_the_cluster_but_still_serves(
    cluster: Cluster, tmp_path: Path
) -> None:
    a, b = cluster.nodes["a"], cluster.nodes["b"]
    _pull_verified(a, cluster)  # a seeds it; the tracker has its metainfo
    grants = _tracker_metric(cluster.tracker, "p2preg_tracker_lease_grants_total")
    stranger_ca = ClusterCA.make("tlscluster")  # same cluster name, another key
    stranger_tls = stranger_ca.tls_dir(
        cluster.certs / "stranger", "node", "a", trust=stranger_ca.cert_pem + cluster.ca.cert_pem
    )
    with ExitStack() as stack:
        stranger = _node(stack, tmp_path, "stranger", cluster.registry, cluster.tracker.url,
                         stranger_tls)
        _pull_verified(stranger, cluster)
        # Upstream served it; no swarm byte, no lease, no announce reached the tracker.
        assert stranger.metric("p2preg_blob_fetches_total", source="upstream") == 1
        assert stranger.metric("p2preg_fallbacks_total", reason="tracker") >= 1
        assert stranger.metric("p2preg_peer_blob_bytes_total") == 0
        assert _tracker_metric(cluster.tracker, "p2preg_tracker_lease_grants_total") == grants
        assert _refusals(cluster.tracker)["unknown_ca"] >= 1
        assert _tracker_metric(cluster.tracker, "p2preg_tracker_peers") == 1  # a alone
        log = stranger.process.log_path.read_text()
        assert "falling back to upstream (tracker)" in log and "PRIVATE" not in log
        # Its certificate and the metainfo, straight at a member's SSL port.
        metainfo = trio.run(_metainfo, cluster, tmp_path)
        got = _bare_session_at(metainfo, stranger_tls, cluster.peer_ports["a"], a, tmp_path)
        assert got == 0
        assert a.metric("p2preg_peer_tls_refusals_total") >= 1
        # Nothing crashed: the members still serve, the stranger too.
        _pull_verified(b, cluster)
        assert b.metric("p2preg_peer_blob_bytes_total") > 0
        for process in (a.process, b.process, stranger.process, cluster.tracker.process):
            assert process.returncode is None, process.name
        assert httpx.get(f"{cluster.tracker.metrics_url}/healthz", timeout=10).status_code == 200


async def _metainfo(cluster: Cluster, tmp_path: Path) -> bytes:
    """What a member reads from the tracker (the test holds a member's certificate)."""
    tls = ReloadingTLS(cluster.ca.tls_dir(tmp_path / "reader", "node", "reader"), role="node")
    async with open_tracker_client(cluster.tracker.url, node="reader", tls=tls) as client:
        record = await client.lookup_metainfo(Digest.parse(cluster.digest))
    assert record is not None
    return record.metainfo


def _bare_session_at(
    metainfo: bytes, cert_dir: Path, port: int, target: NodeProcess, tmp_path: Path
) -> int:
    """Payload bytes a session with `cert_dir`'s certificate got from 127.0.0.1:`port`."""
    save = tmp_path / "outsider"
    save.mkdir()
    ses = lt.session({
        "listen_interfaces": "127.0.0.1:0s",
        "enable_dht": False, "enable_lsd": False, "enable_upnp": False, "enable_natpmp": False,
        "enable_outgoing_utp": False, "enable_incoming_utp": False,
        "allow_multiple_connections_per_ip": True,
    })
    atp = lt.add_torrent_params()
    atp.ti = lt.torrent_info(metainfo)
    atp.save_path = str(save)
    atp.flags &= ~(lt.torrent_flags.auto_managed | lt.torrent_flags.paused)
    handle = ses.add_torrent(atp)
    dh = write_dh_params(save)
    handle.set_ssl_certificate(str(cert_dir / "tls.crt"), str(cert_dir / "tls.key"), str(dh))
    before = target.metric("p2preg_peer_tls_refusals_total")
    handle.connect_peer(("127.0.0.1", port))
    wait_until(lambda: target.metric("p2preg_peer_tls_refusals_total") > before,
               timeout_s=30, what="the node to refuse the outsider's handshake",
               process=target.process)
    got = int(handle.status().total_payload_download)
    del ses
    return got
