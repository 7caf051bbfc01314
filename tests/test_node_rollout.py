"""The rollout rule: a cluster is token or certificate; a node in the wrong mode still serves.

Real processes: a seed registry, a node, and a tracker of the other mode. A
node with a certificate pointed at a token tracker, and a token node pointed
at an HTTPS tracker that requires certificates, are both refused by the
tracker; each falls back to upstream (counted as `tracker`) and serves the
blob, verified. Neither leaks its credential to the other side.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.images import build_image
from harness.node import NodeProcess, metric_value, open_node
from harness.registry import Registry
from harness.skopeo import push
from harness.tlscerts import ClusterCA
from harness.tracker import TrackerProcess, open_tracker
from tracker.tls_gate import REFUSAL_REASONS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEED_NS = "seed.test"
REPO = "team/rollout"
TOKEN = "rollout-cluster-token"
MiB = 1 << 20
LOOPBACK_PEERS = ("--peer-host", "127.0.0.1", "--peer-port", "0", "--peer-ssl-port", "0")


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Any:
    # Above the node's p2p threshold (1 MiB): the blob goes through the lease path.
    return build_image(tmp_path_factory.mktemp("rollout"), seed="rollout", layer_sizes=(3 * MiB,))


@pytest.fixture
def layer(registry: Registry, layout: Any) -> tuple[str, int]:
    image = push(layout, registry.host, REPO)
    (blob,) = image.manifests[0].layers
    return blob.digest, blob.size


def _serves_verified(node: NodeProcess, digest: str, size: int) -> None:
    url = f"{node.url}/v2/{REPO}/blobs/{digest}?ns={SEED_NS}"
    response = httpx.get(url, timeout=120)
    assert response.status_code == 200
    assert len(response.content) == size
    assert "sha256:" + hashlib.sha256(response.content).hexdigest() == digest
    assert node.metric("p2preg_fallbacks_total", reason="tracker") >= 1
    assert node.metric("p2preg_blob_fetches_total", source="upstream") >= 1


@pytest.fixture
def ca() -> ClusterCA:
    return ClusterCA.make("rollout")


def test_a_certificate_node_at_a_token_tracker_falls_back_and_serves(
    tmp_path: Path, registry: Registry, layer: tuple[str, int], ca: ClusterCA
) -> None:
    tls_dir = ca.tls_dir(tmp_path / "node-tls", "node", "n1")
    with (
        open_tracker(tmp_path / "tracker", token=TOKEN) as tracker,
        open_node(
            tmp_path / "node",
            [f"{SEED_NS}={registry.url}"],
            args=("--tracker", tracker.url, *LOOPBACK_PEERS),
            tls_dir=tls_dir,
        ) as node,
    ):
        _serves_verified(node, *layer)
    log = node.process.log_path.read_text()
    assert "falling back to upstream (tracker)" in log
    assert "PRIVATE KEY" not in log and TOKEN not in log


def _tracker_metrics(tracker: TrackerProcess) -> str:
    assert tracker.metrics_url is not None
    return httpx.get(f"{tracker.metrics_url}/metrics", timeout=10).text


def test_a_token_node_at_a_certificate_tracker_falls_back_and_serves(
    tmp_path: Path, registry: Registry, layer: tuple[str, int], ca: ClusterCA
) -> None:
    tracker_tls = ca.tls_dir(tmp_path / "tracker-tls", "tracker", "t", ips=["127.0.0.1"])
    with open_tracker(tmp_path / "tracker", tls_dir=tracker_tls) as tracker:
        with open_node(
            tmp_path / "node",
            [f"{SEED_NS}={registry.url}"],
            args=("--tracker", tracker.url, *LOOPBACK_PEERS),
            env={"P2PREG_TRACKER_TOKEN": TOKEN},
        ) as node:
            _serves_verified(node, *layer)
        # The node did not trust the tracker's certificate (not from a public CA)
        # and the tracker wants one from the node: no request, and no token, ever
        # reached it. It counted the handshakes it refused.
        metrics = _tracker_metrics(tracker)
        assert "p2preg_tracker_metainfo 0.0" in metrics and "p2preg_tracker_peers 0.0" in metrics
        assert metric_value(metrics, "p2preg_tracker_metainfo") == 0
        assert metric_value(metrics, "p2preg_tracker_peers") == 0
        refused = sum(
            metric_value(metrics, "p2preg_tracker_tls_refusals_total", reason=r)
            for r in REFUSAL_REASONS
        )
        assert refused >= 1
        assert TOKEN not in tracker.process.log_path.read_text()
    log = node.process.log_path.read_text()
    assert "falling back to upstream (tracker)" in log and TOKEN not in log
