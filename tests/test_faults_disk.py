"""A disk that fills up under a node, and a store that has to evict.

The node's data directory is a small tmpfs the test mounts (and unmounts, by
path). A blob larger than the disk is refused before it is downloaded; a disk
that fills up mid-download (a ballast file) gives a clean OCI error and leaves
nothing under the digest or in tmp/; the node keeps serving what it has, the
same blob comes through once the ballast is gone, and a blob that fits only
without the least recently used one evicts it. With a size budget instead of a full disk,
eviction drops the least recently used blob, never one a client is reading,
and a blob of which the node is the last seeder while someone still downloads
it only once nothing else frees enough.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.images import Blob, PushedImage, build_image
from harness.node import open_node
from harness.registry import Registry
from harness.skopeo import push
from harness.tracker import open_tracker
from p2preg.core.digest import Digest
from tests.fixtures.cluster import (
    Background,
    Cluster,
    blob_files_verified,
    publish_metainfo,
    swarm_counts,
    wait_for,
)
from tests.fixtures.faults import Action, FaultProxy, StuckLeecher
from tests.fixtures.reliability import Tally
from tracker.metainfo import make_metainfo

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MiB = 1024 * 1024
SEED_NS = "seed.test"
COMMAND = ".venv/bin/pytest -q tests/test_faults_disk.py"


@pytest.fixture(scope="module")
def tally() -> Iterator[Tally]:
    t = Tally("faults-disk", COMMAND)
    yield t
    t.write()


def _mount_tmpfs(stack: ExitStack, path: Path, size: str) -> None:
    if os.geteuid() != 0:
        # Never a silent skip: CI runs as root, and so must anyone who runs these.
        pytest.fail("mounting a tmpfs needs root (CI runs as root)")
    path.mkdir(parents=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True, timeout=30
    )
    stack.callback(subprocess.run, ["umount", str(path)], check=True, timeout=30)


def _get(http: httpx.Client, node_url: str, image: PushedImage, blob: Blob) -> httpx.Response:
    return http.get(f"{node_url}/v2/{image.repository}/blobs/{blob.digest}")


def _ok(http: httpx.Client, node_url: str, image: PushedImage, blob: Blob) -> int:
    r = _get(http, node_url, image, blob)
    assert r.status_code == 200, (blob.digest, r.status_code, r.text[:300])
    assert "sha256:" + hashlib.sha256(r.content).hexdigest() == blob.digest
    return len(r.content)


def _fill(path: Path) -> int:
    """Write `path` until the file system is full; returns the bytes written."""
    written = 0
    with path.open("wb", buffering=0) as f:
        try:
            while True:
                written += f.write(b"\0" * (64 * 1024))
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
    return written


def test_a_full_disk_gives_a_clean_error_keeps_serving_and_recovers(
    registry: Registry, tmp_path: Path, tally: Tally
) -> None:
    sizes = (2 * MiB, 3 * MiB, 4 * MiB, 9 * MiB)
    layout: Any = build_image(tmp_path / "layout", seed="full", layer_sizes=sizes)
    image = push(layout, registry.host, "disk/full")
    x, v, z, y = image.manifests[0].layers
    http = httpx.Client(trust_env=False, timeout=120)
    with ExitStack() as stack:
        stack.callback(http.close)
        proxy = stack.enter_context(FaultProxy(registry.url))
        data = tmp_path / "node" / "data"
        _mount_tmpfs(stack, data, "9m")
        node = stack.enter_context(open_node(tmp_path / "node", [f"{SEED_NS}={proxy.url}"]))
        tally.pulls_attempted += 1
        verified = _ok(http, node.url, image, image.manifests[0].config)
        verified += _ok(http, node.url, image, x)

        # A blob larger than the whole disk: refused before a byte is downloaded.
        r = _get(http, node.url, image, y)
        tally.faults_injected["blob larger than the disk"] += 1
        assert r.status_code == 507, (r.status_code, r.text[:300])
        assert json.loads(r.content)["errors"][0]["code"] == "UNAVAILABLE"
        assert not [e for e in proxy.log if e[1] == "GET" and e[2].endswith(y.digest)]

        # The disk fills up while a blob is being downloaded.
        proxy.script(
            lambda m, p: m == "GET" and p.endswith(v.digest),
            Action("throttle", bytes_per_s=512 * 1024),
        )
        pending = Background(lambda: _get(http, node.url, image, v)).start()
        wait_for(lambda: _tmp_bytes(data) >= 256 * 1024, 30, "the download to start")
        _fill(data / "ballast")
        tally.faults_injected["disk full mid-download"] += 1
        r = pending.result(60)
        assert r.status_code == 507, (r.status_code, r.text[:300])
        assert json.loads(r.content)["errors"][0]["code"] == "UNAVAILABLE"
        assert _tmp_bytes(data) == 0  # no half-written file left behind
        assert v.digest not in blob_files_verified(data)
        # What it has, it still serves; it is healthy.
        assert http.get(f"{node.url}/healthz").status_code == 200
        verified += _ok(http, node.url, image, x)

        # Space returns: the same blob comes through.
        (data / "ballast").unlink()
        verified += _ok(http, node.url, image, v)
        # Space demands it: the least recently used blob (x) goes to make room for z.
        verified += _ok(http, node.url, image, z)
        stored = blob_files_verified(data)
        assert x.digest not in stored and {v.digest, z.digest} <= stored.keys()
        # The blob too large for the disk stays refused, cleanly.
        assert _get(http, node.url, image, y).status_code == 507
        tally.pulls_completed += 1
        tally.bytes_verified += verified


def _tmp_bytes(data_dir: Path) -> int:
    tmp = data_dir / "tmp"
    return sum(p.stat().st_size for p in tmp.iterdir()) if tmp.is_dir() else 0


def test_eviction_drops_the_least_recently_used_blob_but_not_one_being_served(
    registry: Registry, tmp_path: Path, tally: Tally
) -> None:
    layers = (12 * MiB, 12 * MiB + 1, 12 * MiB + 2, 12 * MiB + 3)
    layout: Any = build_image(tmp_path / "layout", seed="evict", layer_sizes=layers)
    image = push(layout, registry.host, "disk/evict")
    a, b, c, d = image.manifests[0].layers
    cfg = tmp_path / "node.toml"
    cfg.write_text(f"store_max_bytes = {40 * MiB}\n")
    http = httpx.Client(trust_env=False, timeout=120)
    with open_node(
        tmp_path / "node", [f"{SEED_NS}={registry.url}"], args=("--config", str(cfg))
    ) as node:
        tally.pulls_attempted += 1
        verified = sum(_ok(http, node.url, image, x) for x in (image.manifests[0].config, a, b, c))
        verified += _ok(http, node.url, image, a)  # a is used again: b is now the oldest
        # A slow client is reading b when d needs room.
        url = f"{node.url}/v2/{image.repository}/blobs/{b.digest}"
        with http.stream("GET", url) as slow:
            assert slow.status_code == 200
            chunks = slow.iter_raw(64 * 1024)
            first = next(chunks)
            verified += _ok(http, node.url, image, d)
            tally.faults_injected["store over budget while serving"] += 1
            stored = blob_files_verified(node.data_dir)
            # c, the least recently used blob nobody reads, made the room.
            assert c.digest not in stored and {a.digest, b.digest, d.digest} <= stored.keys()
            h = hashlib.sha256(first)
            for chunk in chunks:
                h.update(chunk)
            assert "sha256:" + h.hexdigest() == b.digest
            verified += b.size
        assert sum(stored.values()) <= 40 * MiB
        assert node.metric("p2preg_store_bytes") <= 40 * MiB
        # The evicted blob is fetched again when asked.
        verified += _ok(http, node.url, image, c)
        tally.pulls_completed += 1
        tally.bytes_verified += verified
    http.close()


def test_eviction_spares_the_last_seeder_of_a_live_swarm_until_space_demands_it(
    registry: Registry, tmp_path: Path, tally: Tally
) -> None:
    # Three 4 MiB layers and a 7 MiB one against a 10 MiB budget: two fit, a
    # third evicts one, the 7 MiB one needs the room of two.
    sizes = (4 * MiB, 4 * MiB + 1, 4 * MiB + 2, 7 * MiB)
    layout: Any = build_image(tmp_path / "layout", seed="spare", layer_sizes=sizes)
    image = push(layout, registry.host, "disk/spare")
    a, b, c, d = image.manifests[0].layers
    budget = 10 * MiB
    http = httpx.Client(trust_env=False, timeout=120)
    with open_tracker(tmp_path / "tracker") as tracker, ExitStack() as stack:
        stack.callback(http.close)
        cluster = Cluster(
            stack, tmp_path, registry.url, tracker.url, config=f"store_max_bytes = {budget}\n"
        )
        node = cluster.node("s")
        # A downloader is in a's swarm before anyone seeds it: a libtorrent peer
        # that announces the whole blob as left and never asks for a piece. The
        # metainfo is the one every node makes from a's bytes.
        meta_a = make_metainfo(layout.blob_path(a.digest), Digest.parse(a.digest), a.size)
        publish_metainfo(tracker.url, meta_a)
        leecher = StuckLeecher(tmp_path / "leecher", tracker.url, meta_a)
        stack.callback(leecher.close)
        wait_for(lambda: swarm_counts(tracker.url, a.digest) == (0, 1), 30, "the leecher")
        tally.pulls_attempted += 1

        # The node fetches a (the lease: nobody seeds it), seeds it, and its
        # announce is answered with 1 seeder (itself) and 1 leecher: by the
        # tracker's counts it is the last seeder of a live swarm.
        verified = _ok(http, node.url, image, a)
        wait_for(lambda: swarm_counts(tracker.url, a.digest) == (1, 1), 30, "the node to seed a")
        # b comes later and nobody else wants it; a is now the least recently used.
        verified += _ok(http, node.url, image, b)
        wait_for(lambda: swarm_counts(tracker.url, b.digest) == (1, 0), 30, "the node to seed b")
        assert node.metric("p2preg_blobs_seeded") == 2

        # c needs the room of one blob. Least recently used is a, but a is spared:
        # b, the newer blob whose swarm nobody downloads from, goes.
        verified += _ok(http, node.url, image, c)
        tally.faults_injected["store over budget, last seeder of a live swarm"] += 1
        stored = blob_files_verified(node.data_dir)
        assert a.digest in stored and c.digest in stored, sorted(stored)
        assert b.digest not in stored, sorted(stored)
        assert node.metric("p2preg_store_evictions") == 1
        # The node stopped seeding what it evicted and still seeds a to the leecher.
        wait_for(lambda: swarm_counts(tracker.url, b.digest) == (0, 0), 30, "b's seeder to go")
        assert swarm_counts(tracker.url, a.digest) == (1, 1)
        assert leecher.downloaded() == 0  # the swarm is still live, not finished

        # d needs the room of two blobs: c is not enough, so a goes too, last.
        verified += _ok(http, node.url, image, d)
        tally.faults_injected["space demands the spared blob"] += 1
        stored = blob_files_verified(node.data_dir)
        assert set(stored) == {d.digest}, sorted(stored)
        assert sum(stored.values()) <= budget
        assert node.metric("p2preg_store_bytes") <= budget
        assert node.metric("p2preg_store_evictions") == 3
        wait_for(lambda: swarm_counts(tracker.url, a.digest) == (0, 1), 30, "a's seeder to go")
        tally.pulls_completed += 1
        tally.bytes_verified += verified
