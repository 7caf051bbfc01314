"""SIGTERM drains a node: no new connections, responses in flight finish, `stopped` is announced.

Real node processes, a real seed registry and tracker. A client holds a blob
response half-read while the node gets SIGTERM: new connections are refused
at once (so containerd moves on to its next host), the held response still
completes with the right bytes, and the node exits 0. A client that never
reads on is cut off after `shutdown_grace_s`. A node that seeds a blob leaves
the tracker's swarm as it stops, not a peer TTL later.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote_from_bytes

import httpx
import pytest

from harness.images import OciLayout, build_image
from harness.node import NodeProcess, open_node
from harness.procs import wait_until
from harness.registry import Registry
from harness.skopeo import push
from harness.tracker import TrackerProcess, open_tracker
from p2preg.core import wire
from tracker.announce import decode_scrape

pytestmark = pytest.mark.integration

MiB = 1 << 20
SEED_NS = "seed.test"
# What the node logs when its grace period ends with a response still open.
CUT_OFF = "still in flight after the grace period: cutting them off"


@pytest.fixture(scope="module")
def big_layout(tmp_path_factory: pytest.TempPathFactory) -> OciLayout:
    # Far larger than loopback socket buffers: a paused reader keeps it in flight.
    return build_image(tmp_path_factory.mktemp("big") / "layout", seed="drain",
                       layer_sizes=(24 * MiB,))


def _refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return False
    except ConnectionRefusedError:
        return True


def _exited(node: NodeProcess, timeout_s: float) -> int:
    wait_until(lambda: node.process.returncode is not None, timeout_s=timeout_s,
               what="the node to exit")
    code = node.process.returncode
    assert code is not None
    return code


@pytest.fixture
def layer_node(
    registry: Registry, big_layout: OciLayout, tmp_path: Path
) -> Iterator[tuple[NodeProcess, str, int]]:
    image = push(big_layout, registry.host, "team/big")
    (layer,) = image.manifests[0].layers
    with open_node(tmp_path / "node", [f"{SEED_NS}={registry.url}"],
                   env={"P2PREG_SHUTDOWN_GRACE_S": "3"}) as node:
        url = f"{node.url}/v2/{image.repository}/blobs/{layer.digest}"
        # In the store first: what is in flight below is the response itself.
        assert httpx.get(url, timeout=60).status_code == 200
        yield node, url, layer.size


def test_a_response_in_flight_finishes_while_new_connections_are_refused(
    layer_node: tuple[NodeProcess, str, int],
) -> None:
    node, url, size = layer_node
    port = int(node.host.rpartition(":")[2])
    digest = url.rpartition("/")[2]
    sha = hashlib.sha256()
    with httpx.Client(timeout=30) as http, http.stream("GET", url) as response:
        assert response.status_code == 200
        chunks = response.iter_raw(256 * 1024)
        sha.update(next(chunks))
        os.kill(node.process.pid, signal.SIGTERM)
        wait_until(lambda: _refused(port), timeout_s=5, what="new connections to be refused")
        assert node.process.returncode is None  # still there for the response in flight
        for chunk in chunks:
            sha.update(chunk)
        assert response.num_bytes_downloaded == size
    assert "sha256:" + sha.hexdigest() == digest
    assert _exited(node, timeout_s=30) == 0
    log = node.process.log_tail(20)
    assert "SIGTERM received" in log and "node: stopped" in log
    assert CUT_OFF not in log  # it finished within the grace period


def test_a_client_that_stops_reading_is_cut_off_after_the_grace_period(
    layer_node: tuple[NodeProcess, str, int],
) -> None:
    node, url, size = layer_node
    with httpx.Client(timeout=30) as http, http.stream("GET", url) as response:
        chunks = response.iter_raw(256 * 1024)
        next(chunks)
        os.kill(node.process.pid, signal.SIGTERM)
        # The client reads nothing more: the node waits out the grace period, then
        # leaves. Its log says so in order — no clock in this process measures it.
        code = _exited(node, timeout_s=60)
        with pytest.raises(httpx.HTTPError):
            for _ in chunks:
                pass
        assert response.num_bytes_downloaded < size
    assert code == 0
    log = node.process.log_tail(60)
    shutting, cut, stopped = (
        log.index(s) for s in ("node: shutting down", CUT_OFF, "node: stopped")
    )
    assert shutting < cut < stopped
    assert "1 blob response(s) still in flight after the grace period" in log


def _seeders(tracker: TrackerProcess, info_hash: bytes) -> int:
    url = f"{tracker.url}/scrape?info_hash={quote_from_bytes(info_hash, safe='')}"
    stats = decode_scrape(httpx.get(url, timeout=10).content)
    return stats[info_hash].complete if info_hash in stats else 0


def test_a_seeding_node_leaves_the_swarm_when_it_stops(
    registry: Registry, tmp_path: Path
) -> None:
    layout = build_image(tmp_path / "layout", seed="leave", layer_sizes=(3 * MiB,))
    image = push(layout, registry.host, "team/app")
    (layer,) = image.manifests[0].layers
    with open_tracker(tmp_path / "tracker") as tracker:
        args = ("--tracker", tracker.url, "--peer-host", "127.0.0.1", "--peer-port", "0")
        with open_node(tmp_path / "node", [f"{SEED_NS}={registry.url}"], args=args) as node:
            got = httpx.get(f"{node.url}/v2/{image.repository}/blobs/{layer.digest}", timeout=60)
            assert got.status_code == 200
            record = wire.decode(
                wire.MetainfoRecord,
                httpx.get(f"{tracker.url}/v1/metainfo/{layer.digest}", timeout=10).content,
            )
            info_hash = record.info_hashes[0]
            wait_until(lambda: _seeders(tracker, info_hash) == 1, timeout_s=20,
                       what="the node to announce itself as a seeder")
            os.kill(node.process.pid, signal.SIGTERM)
            assert _exited(node, timeout_s=20) == 0
            # Peers expire after 150 s of silence: only a `stopped` announce explains 0.
            assert _seeders(tracker, info_hash) == 0


def test_the_tracker_stops_at_once_on_sigterm(tmp_path: Path) -> None:
    # As PID 1 of a container, a process without a SIGTERM handler would ignore it.
    with open_tracker(tmp_path / "tracker") as tracker:
        os.kill(tracker.process.pid, signal.SIGTERM)
        wait_until(lambda: tracker.process.returncode is not None, timeout_s=30,
                   what="the tracker to exit")
        assert tracker.process.returncode == 0
        assert "SIGTERM received: stopping" in tracker.process.log_tail()
