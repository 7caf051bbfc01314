"""A download whose handed-out peers are all full asks the tracker for others.

A libtorrent peer at its connection limit accepts a connection and closes it at
once: no error to report as unreachable, no peer that stalls, and libtorrent
tries such a peer again only after `min_reconnect_time` (60 s). Before
`StallWatch.lonely`, a node handed only full peers waited until the download's
own stall (`swarm_stall_s`) and then fetched the blob from upstream: at 10,000
nodes, the first seeders' connections are full (docs/BENCHMARKS.md). Now,
alone for `peer_stall_report_s`, it announces again and takes the peers the
tracker names then.

Real tracker, registry and node processes; the full peer is a TCP listener that
closes every connection it accepts, announced to the tracker as a confirmed
seeder. Node a fetched the layer upstream and left; b is handed the full peer
alone; then a seeder joins that dials nobody (it asks the tracker for no
peers, so no new seeder's dial rescues b); b must get the layer from it,
nothing from upstream.
"""

from __future__ import annotations

import hashlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes

import httpx
import pytest

from harness.images import build_image
from harness.node import open_node
from harness.registry import Registry
from harness.skopeo import push
from harness.tracker import open_tracker
from p2preg.core.digest import Digest
from p2preg.core.metainfo import Metainfo
from tests.fixtures.cluster import Background, swarm_counts, wait_for
from tests.fixtures.faults import SlowSeeder, confirm_seed
from tracker.metainfo import make_metainfo

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEED_NS = "seed.test"
LAYER = 8 * 1024 * 1024
# Quick judgements, well before the download's own stall (swarm_stall_s, 30 s).
STALL_REPORT_S = 2
SWARM_STALL_S = 30


class FullPeer:
    """Accepts each connection on 127.0.0.1 and closes it at once, as a libtorrent
    peer at its connection limit does; counts them."""

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.closed = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            conn.close()
            self.closed += 1

    def announce(self, tracker_url: str, meta: Metainfo) -> None:
        """A confirmed seeder of `meta` at this port, to the tracker."""
        confirm_seed(tracker_url, meta, "full")
        q = (f"info_hash={quote_from_bytes(meta.info_hash_v2[:20])}&peer_id={'F' * 20}"
             f"&port={self.port}&uploaded=0&downloaded=0&left=0&event=started"
             "&node=full")  # fmt: skip
        r = httpx.get(f"{tracker_url}/announce?{q}", timeout=10, trust_env=False)
        assert r.status_code == 200 and b"failure" not in r.content, r.content

    def close(self) -> None:
        self._sock.close()


@pytest.fixture
def full_peer() -> Iterator[FullPeer]:
    peer = FullPeer()
    yield peer
    peer.close()


def _node(tmp_path: Path, registry: Registry, tracker_url: str, name: str) -> Any:
    args = ("--tracker", tracker_url, "--peer-host", "127.0.0.1", "--peer-port", "0",
            "--node-name", name, "--peer-stall-report-s", str(STALL_REPORT_S))  # fmt: skip
    return open_node(tmp_path / name, [f"{SEED_NS}={registry.url}"], args=args, name=name)


def test_a_node_handed_only_full_peers_asks_for_others_not_upstream(
    registry: Registry, tmp_path: Path, full_peer: FullPeer
) -> None:
    layout: Any = build_image(tmp_path / "layout", seed="fullpeer", layer_sizes=(LAYER,))
    image = push(layout, registry.host, "team/fullpeer")
    (layer,) = image.manifests[0].layers
    meta = make_metainfo(layout.blob_path(layer.digest), Digest.parse(layer.digest), layer.size)
    with open_tracker(tmp_path / "tracker") as tracker:
        url = tracker.url
        with _node(tmp_path, registry, url, "a") as a:
            blob_a = f"{a.url}/v2/{image.repository}/blobs/{layer.digest}"
            assert httpx.get(blob_a, timeout=60, trust_env=False).status_code == 200
            wait_for(lambda: swarm_counts(url, layer.digest) == (1, 0), 30, "a to seed")
            full_peer.announce(url, meta)
            wait_for(lambda: swarm_counts(url, layer.digest) == (2, 0), 30, "the full peer")
        wait_for(lambda: swarm_counts(url, layer.digest) == (1, 0), 30, "a to leave")

        with _node(tmp_path, registry, url, "b") as b:
            blob_b = f"{b.url}/v2/{image.repository}/blobs/{layer.digest}"
            pending = Background(lambda: httpx.get(blob_b, timeout=120, trust_env=False)).start()
            wait_for(lambda: full_peer.closed >= 1, 30, "b to dial the full peer")
            # A seeder that dials nobody (it asks the tracker for no peers): b has to
            # ask the tracker to learn of it.
            other = SlowSeeder(tmp_path / "other", url, layout.blob_path(layer.digest), meta, 0,
                               node="other", dials=False)  # fmt: skip
            try:
                other.wait_seeding()
                r = pending.result(SWARM_STALL_S + 30)
                uploaded = other.uploaded()
            finally:
                other.close()
            assert r.status_code == 200
            assert "sha256:" + hashlib.sha256(r.content).hexdigest() == layer.digest
            # From the other seeder, which b learned of by asking again; no upstream.
            assert uploaded >= layer.size
            assert b.metric("p2preg_blob_fetches_total", source="peers") == 1
            assert b.metric("p2preg_upstream_blob_bytes_total") == 0
            assert "asking for others" in b.process.log_tail(200)
