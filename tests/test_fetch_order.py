"""An image's layers cross the upstream link one at a time, in manifest order.

Real processes on loopback: the real docker-registry behind a `FaultProxy` that
trickles every blob body, a tracker and two nodes. Each node resolves the
image's manifest, then is asked for all its layers at once, last layer first,
as containerd asks. The tracker must let one layer at a time be fetched from
upstream (its `upstream_fetches_per_image` is 1), the earliest waiting one
next, and every layer must cross the link exactly once.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import itertools
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from harness.images import build_image
from harness.registry import Registry
from harness.skopeo import push
from harness.tracker import open_tracker
from tests.fixtures.cluster import Cluster
from tests.fixtures.faults import MANIFEST_ACCEPT, Action, FaultProxy

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MiB = 1024 * 1024
LAYER_BYTES = 3 * MiB // 2  # above p2p_min_bytes (1 MiB): fetched through the swarm path
TRICKLE = 3 * MiB  # bytes/s: each layer takes at least half a second upstream


def test_layers_cross_upstream_once_each_one_at_a_time_in_manifest_order(
    registry: Registry, tmp_path: Path
) -> None:
    layout = build_image(tmp_path / "layout", seed="order", layer_sizes=(LAYER_BYTES,) * 4)
    image = push(layout, registry.host, "order/app")
    layers = [blob.digest for blob in image.manifests[0].layers]
    with (
        FaultProxy(registry.url) as proxy,
        open_tracker(tmp_path / "tracker") as tracker,
        ExitStack() as stack,
        httpx.Client(timeout=120) as http,
    ):
        proxy.script(
            lambda m, p: m == "GET" and "/blobs/" in p,
            forever=Action("throttle", bytes_per_s=TRICKLE),
        )
        cluster = Cluster(stack, tmp_path, proxy.url, tracker.url)
        nodes = [cluster.node("n1"), cluster.node("n2")]
        for node in nodes:
            r = http.get(
                f"{node.url}/v2/{image.repository}/manifests/{image.tag}",
                headers={"Accept": MANIFEST_ACCEPT},
            )
            assert r.status_code == 200, r.text[:300]

        def fetch(node_url: str, digest: str) -> str:
            r = http.get(f"{node_url}/v2/{image.repository}/blobs/{digest}")
            assert r.status_code == 200, (digest, r.status_code, r.text[:300])
            return "sha256:" + hashlib.sha256(r.content).hexdigest()

        asks = [(node.url, digest) for digest in reversed(layers) for node in nodes]
        with concurrent.futures.ThreadPoolExecutor(len(asks)) as pool:
            got = list(pool.map(lambda a: fetch(*a), asks))
        assert got == [digest for _, digest in asks]

    fetched = [
        (at, next(d for d in layers if path.endswith(d)))
        for at, method, path, _kind, _range in proxy.log
        if method == "GET" and any(path.endswith(d) for d in layers)
    ]
    # Once each from upstream: the second node took every layer from the first.
    assert sorted(d for _, d in fetched) == sorted(layers)
    # The rest in manifest order after the first one granted (the tracker waits
    # a moment for the first layer's request, but a slow machine may miss that).
    order = [d for _, d in fetched]
    assert order[1:] == [d for d in layers if d != order[0]]
    # One at a time: each started only after the previous one's trickle ended.
    least = LAYER_BYTES / TRICKLE
    starts = [at for at, _ in fetched]
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    assert all(gap >= least for gap in gaps), (gaps, least)
