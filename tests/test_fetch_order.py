"""An image's layers cross the upstream link one at a time, in manifest order.

Real processes on loopback: the real docker-registry behind a `FaultProxy` that
trickles every blob body, a tracker and two nodes. Each node resolves the
image's manifest, then is asked for all its layers at once, last layer first,
as containerd asks. The tracker must let one layer at a time be fetched from
upstream (its `upstream_fetches_per_image` is 1), the earliest waiting one
next — the next one starting at the hand-off, before the last one's last byte,
when the holder's renewals predict it — and every layer must cross the link
exactly once.
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
from harness.node import metric_value
from harness.registry import Registry
from harness.skopeo import push
from harness.tracker import open_tracker
from tests.fixtures.cluster import Cluster
from tests.fixtures.faults import MANIFEST_ACCEPT, Action, FaultProxy
from tracker.config import TrackerConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MiB = 1024 * 1024
LAYER_BYTES = 3 * MiB // 2  # above p2p_min_bytes (1 MiB): fetched through the swarm path
TRICKLE = 3 * MiB  # bytes/s: each layer takes at least half a second upstream
# Long enough for renewals (every third of lease_silence_s, 0.83 s) to predict the end.
LONG_LAYER_BYTES = 4 * MiB
LONG_TRICKLE = 2 * MiB  # at least 2 s each
DEFAULT_HANDOFF_S = TrackerConfig().upstream_handoff_s


def test_layers_cross_upstream_once_each_one_at_a_time_in_manifest_order(
    registry: Registry, tmp_path: Path
) -> None:
    layers, fetched, _ = _pull_all_at_once(registry, tmp_path, LAYER_BYTES, TRICKLE, ())
    _check_order(layers, fetched, LAYER_BYTES / TRICKLE - DEFAULT_HANDOFF_S)


def test_the_next_layer_starts_at_the_handoff_and_each_still_crosses_once(
    registry: Registry, tmp_path: Path
) -> None:
    """Layers long enough for the holder's renewals to predict their end: the
    tracker hands the slot on before the last byte (one early fetch at a time),
    and still every layer crosses the link once, in manifest order."""
    handoff_s = 1.0
    layers, fetched, metrics = _pull_all_at_once(
        registry, tmp_path, LONG_LAYER_BYTES, LONG_TRICKLE,
        ("--upstream-handoff-s", str(handoff_s)),
    )  # fmt: skip
    # A start is at most the hand-off ahead of the previous layer's last byte.
    _check_order(layers, fetched, LONG_LAYER_BYTES / LONG_TRICKLE - handoff_s)
    assert metric_value(metrics, "p2preg_tracker_upstream_handoffs_total") >= 1


def _pull_all_at_once(
    registry: Registry,
    tmp_path: Path,
    layer_bytes: int,
    trickle: int,
    tracker_args: tuple[str, ...],
) -> tuple[list[str], list[tuple[float, str]], str]:
    """Two nodes asked for every layer at once, last first; (layers, upstream GETs, the
    tracker's metrics)."""
    layout = build_image(tmp_path / "layout", seed="order", layer_sizes=(layer_bytes,) * 4)
    image = push(layout, registry.host, "order/app")
    layers = [blob.digest for blob in image.manifests[0].layers]
    with (
        FaultProxy(registry.url) as proxy,
        open_tracker(tmp_path / "tracker", args=tracker_args) as tracker,
        ExitStack() as stack,
        httpx.Client(timeout=120) as http,
    ):
        proxy.script(
            lambda m, p: m == "GET" and "/blobs/" in p,
            forever=Action("throttle", bytes_per_s=trickle),
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
        metrics = http.get(f"{tracker.url}/metrics").text

    fetched = [
        (at, next(d for d in layers if path.endswith(d)))
        for at, method, path, _kind, _range in proxy.log
        if method == "GET" and any(path.endswith(d) for d in layers)
    ]
    return layers, fetched, metrics


def _check_order(layers: list[str], fetched: list[tuple[float, str]], least_gap: float) -> None:
    # Once each from upstream: the second node took every layer from the first.
    assert sorted(d for _, d in fetched) == sorted(layers)
    # The rest in manifest order after the first one granted (the tracker waits
    # a moment for the first layer's request, but a slow machine may miss that).
    order = [d for _, d in fetched]
    assert order[1:] == [d for d in layers if d != order[0]]
    # One at a time: each started no earlier than the hand-off before the
    # previous one's trickle could end.
    starts = [at for at, _ in fetched]
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    assert all(gap >= least_gap for gap in gaps), (gaps, least_gap)
