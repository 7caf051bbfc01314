"""A CA rotation, end to end, with real processes: the swarm moves to the new CA's torrents.

A seed registry, an mTLS tracker and node A, all issued by the old CA; A pulls
a layer (from upstream: the first copy) and seeds it. Then the rotation, in
the order docs/OPERATIONS.md gives: every ca.crt becomes old + new; the
tracker is re-issued under the new CA; node A is re-issued — each a file
rewritten in place, picked up by ReloadingTLS without a restart. A re-makes
its torrent under the new root and publishes it again; the tracker, now on the
new CA, takes it in place of the old-root metainfo (not as a dispute: nothing
is reported bad). Node B, issued by the new CA only, pulls the layer: it comes
from A over the swarm, and the seed registry sent it once in all.
"""

from __future__ import annotations

import hashlib
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.images import build_image
from harness.node import NodeProcess, metric_value, open_node
from harness.procs import Process, http_get, wait_until
from harness.registry import Registry
from harness.skopeo import push
from harness.tlscerts import ClusterCA
from harness.tracker import TrackerProcess, open_tracker
from p2preg.core.tls import CA_FILE
from tracker.state import DB_NAME

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEED_NS = "seed.test"
REPO = "team/rotation"
MiB = 1 << 20
LOOPBACK_PEERS = ("--peer-host", "127.0.0.1", "--peer-port", "0", "--peer-ssl-port", "0")
# Seeders announce every 2 s too: the tracker loads renewed files at a handshake,
# and A's announces are this test's only connections to it.
TRACKER_ARGS = ("--announce-interval-s", "2", "--min-announce-interval-s", "1",
                "--seeder-announce-interval-s", "2")
# ReloadingTLS looks at the files every 5 s; a rotation step is seen well within this.
RELOAD_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Any:
    # Above the node's p2p threshold (1 MiB): the blob goes through the swarm path.
    return build_image(tmp_path_factory.mktemp("rotation"), seed="rotation", layer_sizes=(3 * MiB,))


def _pull(node: NodeProcess, digest: str, size: int) -> None:
    r = httpx.get(f"{node.url}/v2/{REPO}/blobs/{digest}?ns={SEED_NS}", timeout=120)
    assert r.status_code == 200, r.text
    assert len(r.content) == size
    assert "sha256:" + hashlib.sha256(r.content).hexdigest() == digest


def _reloads(process: Process) -> int:
    return process.log_path.read_text().count("tls: reloaded")


def _tracker_metric(tracker: TrackerProcess, name: str, **labels: str) -> float:
    assert tracker.metrics_url is not None
    return metric_value(http_get(f"{tracker.metrics_url}/metrics").text, name, **labels)


def _wait_reloaded(process: Process, count: int, what: str) -> None:
    wait_until(
        lambda: _reloads(process) >= count, timeout_s=RELOAD_TIMEOUT_S, what=what, process=process
    )


def test_a_rotation_moves_the_swarm_to_the_new_ca_and_upstream_sends_the_blob_once(
    tmp_path: Path, registry: Registry, layout: Any
) -> None:
    image = push(layout, registry.host, REPO)
    (blob,) = image.manifests[0].layers
    old, new = ClusterCA.make("rotation"), ClusterCA.make("rotation")
    both = old.cert_pem + new.cert_pem
    ip = ("127.0.0.1",)
    tracker_tls = old.tls_dir(tmp_path / "tracker-tls", "tracker", "t", ips=ip)
    a_tls = old.tls_dir(tmp_path / "a-tls", "node", "a")
    upstream = [f"{SEED_NS}={registry.url}"]
    with open_tracker(tmp_path / "tracker", tls_dir=tracker_tls, args=TRACKER_ARGS) as tracker:
        node_args = ("--tracker", tracker.url, *LOOPBACK_PEERS)
        with open_node(tmp_path / "a", upstream, args=node_args, tls_dir=a_tls, name="a") as a:
            _pull(a, blob.digest, blob.size)  # the one upstream copy; A seeds it
            wait_until(
                lambda: _tracker_metric(tracker, "p2preg_tracker_seeders") >= 1,
                timeout_s=30, what="A to announce as a seeder",
            )
            # 1. Both CAs trusted everywhere.
            for tls_dir in (tracker_tls, a_tls):
                (tls_dir / CA_FILE).write_bytes(both)
            _wait_reloaded(tracker.process, 1, "the tracker to trust both CAs")
            _wait_reloaded(a.process, 1, "node A to trust both CAs")
            # 2. The tracker re-issued under the new CA: its current root moves.
            new.tls_dir(tracker_tls, "tracker", "t", ips=ip, trust=both)
            _wait_reloaded(tracker.process, 2, "the tracker to load its new certificate")
            # 3. Node A re-issued: it moves its seeded blob to the new root.
            new.tls_dir(a_tls, "node", "a", trust=both)
            wait_until(
                lambda: _tracker_metric(tracker, "p2preg_tracker_metainfo_rerooted_total") == 1
                and _tracker_metric(tracker, "p2preg_tracker_seeders") >= 1,
                timeout_s=RELOAD_TIMEOUT_S, what="A's new-root torrent filed and announced",
                process=a.process,
            )
            # 4. Node B, issued by the new CA alone, pulls the layer.
            b_tls = new.tls_dir(tmp_path / "b-tls", "node", "b")
            with open_node(
                tmp_path / "b", upstream, args=node_args, tls_dir=b_tls, name="b"
            ) as b:
                _pull(b, blob.digest, blob.size)
                assert b.metric("p2preg_blob_fetches_total", source="peers") == 1
                assert b.metric("p2preg_blob_fetches_total", source="upstream") == 0
                assert b.metric("p2preg_peer_blob_bytes_total") >= blob.size
            # Taken as a rotation, not a dispute.
            conflicts = _tracker_metric(
                tracker, "p2preg_tracker_metainfo_rejected_total", code="metainfo_conflict"
            )
            assert conflicts == 0
    registry.settle()
    gets = [
        r for r in registry.served_requests()
        if r.method == "GET" and r.blob is not None and r.blob[1] == blob.digest
    ]
    assert len(gets) == 1 and gets[0].written == blob.size
    a_log = a.process.log_path.read_text()
    assert "1 seeded blobs moved to torrents rooted there" in a_log
    assert "reported poisoned" not in a_log
    assert _disputes(tracker) == 0


def test_a_node_of_the_other_ca_falls_back_and_does_not_report_the_swarms_torrent(
    tmp_path: Path, registry: Registry, layout: Any
) -> None:
    """Mid-rotation, the tracker still on the old CA: node B (new CA) cannot join the
    old-root swarm, so it goes upstream at once (`root_mismatch`, no stall), serves
    the verified blob, and does not report the old-root torrent as poisoned: it stays
    filed, and A still seeds it."""
    image = push(layout, registry.host, REPO)
    (blob,) = image.manifests[0].layers
    old, new = ClusterCA.make("rotation"), ClusterCA.make("rotation")
    both = old.cert_pem + new.cert_pem
    tracker_tls = old.tls_dir(
        tmp_path / "tracker-tls", "tracker", "t", ips=("127.0.0.1",), trust=both
    )
    a_tls = old.tls_dir(tmp_path / "a-tls", "node", "a", trust=both)
    b_tls = new.tls_dir(tmp_path / "b-tls", "node", "b", trust=both)
    upstream = [f"{SEED_NS}={registry.url}"]
    with open_tracker(tmp_path / "tracker", tls_dir=tracker_tls, args=TRACKER_ARGS) as tracker:
        node_args = ("--tracker", tracker.url, *LOOPBACK_PEERS)
        # A stall would take longer than the pull's own timeout: B must not try the swarm.
        slow = {"P2PREG_SWARM_STALL_S": "600"}
        with (
            open_node(tmp_path / "a", upstream, args=node_args, tls_dir=a_tls, name="a") as a,
            open_node(
                tmp_path / "b", upstream, args=node_args, tls_dir=b_tls, name="b", env=slow
            ) as b,
        ):
            _pull(a, blob.digest, blob.size)
            wait_until(
                lambda: _tracker_metric(tracker, "p2preg_tracker_seeders") >= 1,
                timeout_s=30, what="A to announce as a seeder",
            )
            _pull(b, blob.digest, blob.size)
            assert b.metric("p2preg_fallbacks_total", reason="root_mismatch") == 1
            assert b.metric("p2preg_blob_fetches_total", source="upstream") == 1
            # B's own new-root metainfo met the old-root record: refused, not reported.
            wait_until(
                lambda: "rooted at another CA (a CA rotation)" in b.process.log_path.read_text(),
                timeout_s=30, what="B to meet the old-root metainfo", process=b.process,
            )
            assert _tracker_metric(tracker, "p2preg_tracker_metainfo_rerooted_total") == 0
            assert _tracker_metric(tracker, "p2preg_tracker_seeders") >= 1
    assert "reported poisoned" not in b.process.log_path.read_text()
    assert _disputes(tracker) == 0


def _disputes(tracker: TrackerProcess) -> int:
    """Disputes the tracker stored (read once it has stopped)."""
    with closing(sqlite3.connect(tracker.data_dir / DB_NAME)) as db:
        (count,) = db.execute("SELECT count(*) FROM disputes").fetchone()
    return int(count)
