"""A slow peer that delivers costs a download little, and is not reported.

Real tracker, registry and node processes; the slow peer is `SlowSeeder`, an
honest libtorrent seeder of the layer limited to 64 KiB/s. Node b starts
downloading while it is the only source, long enough for b's libtorrent to
have asked it for pieces; then node a, which holds the layer, joins. b gets
the layer with the slow peer having sent a small share of it (its own
libtorrent counter): what it was asked for alone, and the rest came from a.
And since it delivered all along, b never reports it as stalling (the stall
reports are for peers that send no block: stallwatch.py).

A peer that was fast and then slows down holds the requests it was given at
its old rate, when it lets a node queue many (a node asks for at most what its
peer advertises; nodes advertise 32, p2preg/node/requestqueue.py, and this one
4,000, as nodes once did); the node takes them back (p2preg/node/slowpeers.py): in the
second test the slow seeder is fast while b has it alone, then at 64 KiB/s when
a is back (at 8 MiB/s, so that the layer takes seconds: on loopback without
Nagle the end game alone takes a slow peer's requests over in a moment,
peersockets.py); b closes its connection to it, a delivers the rest, and it is
neither reported nor banned: the tracker still hands it out as a seeder. Every
peer there is on 127.0.0.1, as nodes behind one NAT share an address: b closes
the slow peer's connection alone, and a's, from the same address, carries on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.images import build_image
from harness.node import NodeProcess, open_node
from harness.registry import Registry
from harness.skopeo import push
from harness.tracker import open_tracker
from p2preg.core.digest import Digest
from tests.fixtures.cluster import Background, swarm_counts, wait_for
from tests.fixtures.faults import SlowSeeder
from tracker.metainfo import make_metainfo

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEED_NS = "seed.test"
MiB = 1024 * 1024
KiB = 1024
LAYER = 24 * MiB  # 96 pieces of 256 KiB
SLOW_BYTES_PER_S = 64 * KiB
# b has the slow seeder alone until it has sent this much (3 s at its rate).
HEAD_START_BYTES = 192 * KiB
# The second test: its slow seeder sends this fast while b has it alone, then slows.
WAS_FAST_BYTES_PER_S = 4 * MiB
SLOWED_LAYER = 48 * MiB  # 96 pieces of 512 KiB
# What a sends b in the second test: 6 s for the layer, 128 times the slowed peer.
A_BYTES_PER_S = 8 * MiB


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    with ExitStack() as stack:

        def make(registry: Registry, tracker_url: str, name: str, *extra: str) -> NodeProcess:
            args = ("--tracker", tracker_url, "--peer-host", "127.0.0.1", "--peer-port", "0",
                    "--node-name", name, *extra)  # fmt: skip
            return stack.enter_context(
                open_node(tmp_path / name, [f"{SEED_NS}={registry.url}"], args=args, name=name)
            )

        yield make


def test_a_slow_peer_sends_a_sliver_and_is_not_reported(
    registry: Registry, tmp_path: Path, cluster: Callable[..., NodeProcess]
) -> None:
    layout: Any = build_image(tmp_path / "layout", seed="slowpeer", layer_sizes=(LAYER,))
    image = push(layout, registry.host, "team/slowpeer")
    (layer,) = image.manifests[0].layers
    digest = Digest.parse(layer.digest)
    with open_tracker(tmp_path / "tracker") as tracker, ExitStack() as stack:
        # a fetches the layer upstream and seeds it; the slow seeder joins; a leaves.
        a = cluster(registry, tracker.url, "a")
        url_a = f"{a.url}/v2/{image.repository}/blobs/{layer.digest}"
        assert httpx.get(url_a, timeout=60, trust_env=False).status_code == 200
        wait_for(lambda: swarm_counts(tracker.url, layer.digest) == (1, 0), 30, "a to seed")
        meta = make_metainfo(layout.blob_path(layer.digest), digest, layer.size)
        slow = SlowSeeder(tmp_path / "slow", tracker.url, layout.blob_path(layer.digest), meta,
                          SLOW_BYTES_PER_S)  # fmt: skip
        stack.callback(slow.close)
        slow.wait_seeding()
        wait_for(lambda: swarm_counts(tracker.url, layer.digest) == (2, 0), 30, "the slow seeder")
        a.process.stop()
        wait_for(lambda: swarm_counts(tracker.url, layer.digest) == (1, 0), 30, "a to leave")

        # b downloads from the slow seeder alone for a while, then a is back.
        b = cluster(registry, tracker.url, "b")
        url_b = f"{b.url}/v2/{image.repository}/blobs/{layer.digest}"
        pending = Background(lambda: httpx.get(url_b, timeout=120, trust_env=False)).start()
        wait_for(lambda: slow.uploaded() >= HEAD_START_BYTES, 60, "the slow seeder to send")
        alone = slow.uploaded()
        cluster(registry, tracker.url, "a")  # the same store: it seeds the layer again
        r = pending.result(150)
        assert r.status_code == 200
        assert "sha256:" + hashlib.sha256(r.content).hexdigest() == layer.digest
        uploaded = slow.uploaded()
        # The slow peer sent a small share; what it had been asked for came from a.
        assert uploaded < layer.size // 10, (alone, uploaded)
        assert b.metric("p2preg_peer_blob_bytes_total") >= layer.size
        assert b.metric("p2preg_upstream_blob_bytes_total") == 0
        # It delivered all along: not a stalling peer.
        assert b.metric("p2preg_peer_stalls_total") == 0
        assert b.metric("p2preg_blob_fetches_total", source="peers") == 1


def test_a_peer_that_slows_down_is_disconnected_not_reported(
    registry: Registry, tmp_path: Path, cluster: Callable[..., NodeProcess]
) -> None:
    layout: Any = build_image(tmp_path / "layout", seed="slowed", layer_sizes=(SLOWED_LAYER,))
    image = push(layout, registry.host, "team/slowed")
    (layer,) = image.manifests[0].layers
    digest = Digest.parse(layer.digest)
    with open_tracker(tmp_path / "tracker") as tracker, ExitStack() as stack:
        a = cluster(registry, tracker.url, "a")
        url_a = f"{a.url}/v2/{image.repository}/blobs/{layer.digest}"
        assert httpx.get(url_a, timeout=60, trust_env=False).status_code == 200
        wait_for(lambda: swarm_counts(tracker.url, layer.digest) == (1, 0), 30, "a to seed")
        meta = make_metainfo(layout.blob_path(layer.digest), digest, layer.size)
        # It advertises 4,000 requests, as nodes did before requestqueue.py: a node's
        # connection takes its peer's `reqq`, so only such a peer holds enough to drop.
        slow = SlowSeeder(tmp_path / "slow", tracker.url, layout.blob_path(layer.digest), meta,
                          WAS_FAST_BYTES_PER_S, reqq=4000)  # fmt: skip
        stack.callback(slow.close)
        slow.wait_seeding()
        wait_for(lambda: swarm_counts(tracker.url, layer.digest) == (2, 0), 30, "the slow seeder")
        a.process.stop()
        wait_for(lambda: swarm_counts(tracker.url, layer.digest) == (1, 0), 30, "a to leave")

        # b asks the seeder for pieces at its fast rate; then it slows and a is back.
        b = cluster(registry, tracker.url, "b")
        url_b = f"{b.url}/v2/{image.repository}/blobs/{layer.digest}"
        pending = Background(lambda: httpx.get(url_b, timeout=120, trust_env=False)).start()
        wait_for(lambda: slow.uploaded() >= 4 * MiB, 60, "the seeder to send at its fast rate")
        slow.set_rate(SLOW_BYTES_PER_S)
        # The same store: it seeds the layer again, at A_BYTES_PER_S, so that the
        # layer takes seconds and b's watch sees what the slow peer holds meanwhile.
        cluster(registry, tracker.url, "a", "--peer-upload-limit-bytes-s", str(A_BYTES_PER_S))
        r = pending.result(150)
        assert r.status_code == 200
        assert "sha256:" + hashlib.sha256(r.content).hexdigest() == layer.digest
        # b took its requests back, and a delivered what it had held.
        assert b.metric("p2preg_peer_slow_drops_total") >= 1
        assert "peer 127.0.0.1:" in b.process.log_tail(400)
        assert slow.uploaded() < layer.size // 2, slow.uploaded()
        assert b.metric("p2preg_peer_blob_bytes_total") >= layer.size
        assert b.metric("p2preg_upstream_blob_bytes_total") == 0
        assert b.metric("p2preg_blob_fetches_total", source="peers") == 1
        # It delivered: neither reported as stalling nor banned, and still a seeder.
        assert b.metric("p2preg_peer_stalls_total") == 0
        assert b.metric("p2preg_peer_bans_total") == 0
        wait_for(lambda: swarm_counts(tracker.url, layer.digest) == (3, 0), 30, "three seeders")
