"""The peer caps (p2preg/node/limits.py) on two real libtorrent sessions over loopback.

libtorrent exempts loopback and LAN peers from its session rate limits by
default; these tests hold the node's caps to an upper bound where that
exemption would show: two real `Swarm`s on 127.0.0.1 with a tracker served in
this process, the second node pulling a 3 MiB blob from the first through the
real pull path; and two TLS cluster swarms, whose peers speak BitTorrent over
TLS (SSL torrents). Each transfer runs at least 10 s if the cap holds (3 MiB at
256 KiB/s, less the protocol's share); the only assertion on time is that
upper bound on the rate (≤ 1.3 times the cap), never a lower one.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from harness.tlscerts import ClusterCA
from p2preg.core.digest import Digest
from p2preg.node.limits import Caps, NodeLimits, UpstreamThrottle
from p2preg.node.metrics import NodeMetrics
from tests.fakes import FakeUpstream, blob
from tests.test_swarm import REPO, fetches, real_node, running_tracker
from tests.test_swarm_tls import tls_swarm, tls_tracker
from tracker.metainfo import make_metainfo

pytestmark = pytest.mark.slow

CAP = 256 * 1024
SIZE = 3 << 20
BOUND = 1.3


async def test_peer_caps_hold_for_loopback_peers_and_change_at_runtime(tmp_path: Path) -> None:
    first, first_data = blob(size=SIZE, seed=1)
    second, second_data = blob(size=SIZE, seed=2)
    upstream = FakeUpstream({(REPO, first): first_data, (REPO, second): second_data})
    with trio.fail_after(120):
        async with (
            running_tracker(tmp_path) as url,
            real_node(tmp_path, url, "a") as (a, a_swarm, _),
            real_node(tmp_path, url, "b") as (b, b_swarm, _),
        ):
            a_limits = NodeLimits(
                Caps(peer_upload=CAP), a.metrics, UpstreamThrottle(0), a_swarm
            )
            b_limits = NodeLimits(Caps(), b.metrics, UpstreamThrottle(0), b_swarm)
            await a.blobs.ensure(upstream, REPO, first)
            await a.blobs.ensure(upstream, REPO, second)

            # a's upload cap, from its config
            started = trio.current_time()
            await b.blobs.ensure(upstream, REPO, first)
            took = trio.current_time() - started
            assert fetches(b, "peers") == 1 and fetches(b, "upstream") == 0
            assert SIZE / took <= BOUND * CAP, f"{SIZE / took / CAP:.2f} times the upload cap"

            # Changed at runtime: a's upload cap lifted, b's download cap set.
            a_limits.set(Caps())
            b_limits.set(Caps(peer_download=CAP))
            started = trio.current_time()
            await b.blobs.ensure(upstream, REPO, second)
            took = trio.current_time() - started
            assert fetches(b, "peers") == 2 and fetches(b, "upstream") == 0
            assert SIZE / took <= BOUND * CAP, f"{SIZE / took / CAP:.2f} times the download cap"

            sample = b.metrics.registry.get_sample_value
            labels = {"direction": "peer_download"}
            assert sample("p2preg_rate_limit_bytes_per_second", labels) == CAP
            assert sample("p2preg_rate_limit_bytes_per_second", {"direction": "peer_upload"}) == 0
            assert a.metrics.registry.get_sample_value(
                "p2preg_rate_limit_bytes_per_second", {"direction": "peer_upload"}
            ) == 0
            assert b_limits.doc()["caps"] == {
                "peer_upload": 0, "peer_download": CAP, "upstream_download": 0
            }
    assert upstream.gets == 2


async def test_the_peer_upload_cap_holds_over_ssl_torrents(tmp_path: Path) -> None:
    """A TLS cluster's peers speak BitTorrent over TLS on the `s` port: capped all the same."""
    ca = ClusterCA.make("limits")
    data = os.urandom(SIZE)
    path = tmp_path / "verified-blob"
    path.write_bytes(data)
    meta = make_metainfo(path, Digest.of(data), SIZE, root=ca.cert_pem)
    a_metrics = NodeMetrics()
    with trio.fail_after(60):
        async with (
            tls_tracker(tmp_path, ca, meta) as url,
            tls_swarm(tmp_path, ca, "a", url, a_metrics) as (a, _),
            tls_swarm(tmp_path, ca, "b", url, NodeMetrics()) as (b, _),
        ):
            NodeLimits(Caps(peer_upload=CAP), a_metrics, UpstreamThrottle(0), a)
            a.seed(meta, path)
            assert await a.wait_announced(meta.digest, 20)
            started = trio.current_time()
            got = await b.download(meta, stall_s=20, max_hash_failures=2)
            took = trio.current_time() - started
            assert got.read_bytes() == data and b.peer_bytes(meta.digest) >= SIZE
            assert SIZE / took <= BOUND * CAP, f"{SIZE / took / CAP:.2f} times the cap over TLS"
