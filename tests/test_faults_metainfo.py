"""Poisoned metainfo on the tracker, and a seeder whose bytes match it.

The tracker holds, for a real layer's digest, metainfo that follows every
cluster rule but was made from other bytes of the same size; a libtorrent
session seeds those bytes, so every piece checks and only the whole-digest
check can tell. A node must still serve the right bytes (from upstream) and
dispute the metainfo with its own, made from the verified blob; the next node,
told VERIFY, fetches the blob upstream once more and settles the dispute for the
honest torrent, which the node after it then downloads from peers.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes

import httpx
import pytest

from harness.images import build_image
from harness.node import open_node
from harness.registry import Registry
from harness.skopeo import push
from harness.tracker import TrackerProcess, open_tracker
from p2preg.core import wire
from p2preg.core.digest import Digest
from tests.fixtures.faults import LiarSeeder, pull_through
from tests.fixtures.reliability import Tally
from tracker.announce import decode_scrape
from tracker.metainfo import make_metainfo

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MiB = 1024 * 1024
SEED_NS = "seed.test"
COMMAND = ".venv/bin/pytest -q tests/test_faults_metainfo.py"


@pytest.fixture
def tracker(tmp_path: Path) -> Iterator[TrackerProcess]:
    with open_tracker(tmp_path / "tracker") as t:
        yield t


def _seeders(http: httpx.Client, tracker: TrackerProcess, info_hash: bytes) -> int:
    r = http.get(f"{tracker.url}/scrape?info_hash={quote_from_bytes(info_hash, safe='')}")
    stats = decode_scrape(r.content).get(info_hash)
    return 0 if stats is None else stats.complete


def _take_lease(http: httpx.Client, tracker: TrackerProcess, digest: Digest, node: str) -> int:
    """Ask for the digest's upstream lease as `node`; the status code of the answer."""
    body = wire.encode(wire.LeaseRequest(node))
    return http.post(f"{tracker.url}/v1/leases/{digest}", content=body).status_code


def _lookup(http: httpx.Client, tracker: TrackerProcess, digest: str) -> wire.MetainfoRecord:
    r = http.get(f"{tracker.url}/v1/metainfo/{digest}")
    assert r.status_code == 200, r.content
    return wire.decode(wire.MetainfoRecord, r.content)


def test_poisoned_metainfo_is_caught_disputed_and_settled_by_verification(
    registry: Registry, tracker: TrackerProcess, tmp_path: Path
) -> None:
    tally = Tally("faults-metainfo", COMMAND)
    layout: Any = build_image(tmp_path / "layout", seed="poison", layer_sizes=(4 * MiB,))
    image = push(layout, registry.host, "team/poison")
    layer = image.manifests[0].layers[0]
    digest = Digest.parse(layer.digest)
    honest = make_metainfo(layout.blob_path(layer.digest), digest, layer.size)
    # Same size, other bytes: the metainfo passes every rule the tracker checks.
    fake = hashlib.shake_256(b"not the layer").digest(layer.size)
    liar = LiarSeeder(tmp_path / "liar", tracker.url, fake, digest)
    assert liar.meta.info_hash_v2 != honest.info_hash_v2
    http = httpx.Client(trust_env=False, timeout=120)
    try:
        # The liar holds the lease: only the lease holder defines a first torrent.
        assert _take_lease(http, tracker, digest, "liar") == 200
        r = http.put(
            f"{tracker.url}/v1/metainfo/{digest}",
            content=wire.encode(wire.PublishMetainfo(liar.node, layer.size, liar.meta.data)),
            headers={"Content-Type": wire.CONTENT_TYPE},
        )
        assert r.status_code in (200, 201), r.content
        tally.faults_injected["poisoned_metainfo"] += 1
        liar.start()
        liar.wait_seeding()
        tally.faults_injected["liar_seeder"] += 1
        deadline = time.monotonic() + 30
        while _seeders(http, tracker, liar.meta.swarm_keys[0]) < 1:
            assert time.monotonic() < deadline, "the tracker never counted the liar as a seeder"
            time.sleep(0.2)

        fast = tmp_path / "fast.toml"
        fast.write_text("swarm_stall_s = 5\nswarm_max_hash_failures = 2\n")
        args = (
            "--tracker",
            tracker.url,
            "--peer-host",
            "127.0.0.1",
            "--peer-port",
            "0",
            "--config",
            str(fast),
        )
        upstreams = [f"{SEED_NS}={registry.url}"]
        with ExitStack() as stack:
            victim = stack.enter_context(open_node(
                tmp_path / "victim", upstreams, args=(*args, "--node-name", "victim"),
                name="victim",
            ))  # fmt: skip
            tally.pulls_attempted += 1
            tally.bytes_verified += pull_through(http, victim.url, image)
            tally.pulls_completed += 1
            # The liar's bytes reached the node (every piece checked) and were refused whole.
            assert liar.uploaded() >= layer.size * 0.9
            assert victim.metric("p2preg_fallbacks_total", reason="digest_mismatch") == 1
            # A report is evidence, not a verdict: the poison stays until verified.
            assert _lookup(http, tracker, layer.digest).metainfo == liar.meta.data
            # The next node is no party: told VERIFY, it fetches the layer upstream
            # and its torrent settles the dispute for the honest one.
            nxt = stack.enter_context(open_node(
                tmp_path / "next", upstreams, args=(*args, "--node-name", "next"), name="next"
            ))  # fmt: skip
            tally.pulls_attempted += 1
            tally.bytes_verified += pull_through(http, nxt.url, image)
            tally.pulls_completed += 1
            record = _lookup(http, tracker, layer.digest)
            assert record.metainfo == honest.data, "the tracker still holds the poison"
            # The liar lost its right to define torrents (for a while).
            assert _take_lease(http, tracker, Digest.of(b"another blob"), "liar") == 403

            # The node after it gets the layer from the honest torrent's swarm.
            registry.settle()
            sent_before = registry.blob_bytes_sent().get(layer.digest, 0)
            with open_node(
                tmp_path / "later", upstreams, args=(*args, "--node-name", "later"), name="later"
            ) as later:
                tally.pulls_attempted += 1
                tally.bytes_verified += pull_through(http, later.url, image)
                tally.pulls_completed += 1
                assert later.metric("p2preg_peer_blob_bytes_total") >= layer.size
            registry.settle()
            assert registry.blob_bytes_sent().get(layer.digest, 0) == sent_before
            # The victim's fallback and the verifier's fetch: one copy more than none.
            assert sent_before <= 2.05 * layer.size
    finally:
        http.close()
        liar.close()
        tally.write()


def test_a_peer_serving_corrupt_pieces_is_banned_and_the_pull_completes(
    registry: Registry, tracker: TrackerProcess, tmp_path: Path
) -> None:
    tally = Tally(
        "faults-corrupt-peer", ".venv/bin/pytest -q tests/test_faults_metainfo.py -k corrupt"
    )
    layout: Any = build_image(tmp_path / "layout", seed="corrupt", layer_sizes=(4 * MiB,))
    image = push(layout, registry.host, "team/corrupt")
    layer = image.manifests[0].layers[0]
    digest = Digest.parse(layer.digest)
    path = layout.blob_path(layer.digest)
    bad = bytearray(path.read_bytes())
    for i in range(0, len(bad), 4096):
        bad[i] ^= 0xFF
    liar = LiarSeeder(tmp_path / "liar", tracker.url, bytes(bad), digest, honest=path)
    http = httpx.Client(trust_env=False, timeout=120)
    try:
        assert _take_lease(http, tracker, digest, liar.node) == 200
        r = http.put(
            f"{tracker.url}/v1/metainfo/{digest}",
            content=wire.encode(wire.PublishMetainfo(liar.node, layer.size, liar.meta.data)),
            headers={"Content-Type": wire.CONTENT_TYPE},
        )
        assert r.status_code in (200, 201), r.content
        liar.start()
        liar.wait_seeding()
        tally.faults_injected["corrupt peer"] += 1
        deadline = time.monotonic() + 30
        while _seeders(http, tracker, liar.meta.swarm_keys[0]) < 1:
            assert time.monotonic() < deadline, "the tracker never counted the liar as a seeder"
            time.sleep(0.2)
        fast = tmp_path / "fast.toml"
        fast.write_text("swarm_stall_s = 5\nswarm_max_hash_failures = 2\n")
        args = (
            "--tracker",
            tracker.url,
            "--peer-host",
            "127.0.0.1",
            "--peer-port",
            "0",
            "--config",
            str(fast),
            "--node-name",
            "victim",
        )
        with open_node(
            tmp_path / "victim", [f"{SEED_NS}={registry.url}"], args=args, name="victim"
        ) as victim:
            tally.pulls_attempted += 1
            tally.bytes_verified += pull_through(http, victim.url, image)
            tally.pulls_completed += 1
            assert victim.metric("p2preg_piece_hash_failures_total") > 0
            assert victim.metric("p2preg_peer_bans_total") >= 1
            # The honest metainfo stays: bad pieces are the peer's fault, not the torrent's.
            assert _lookup(http, tracker, layer.digest).metainfo == liar.meta.data
    finally:
        http.close()
        liar.close()
        tally.write()
