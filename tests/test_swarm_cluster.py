"""A cluster pulls one image and the seed registry sends each layer once.

A real tracker, several nodes (processes, each with its own libtorrent
session) and one real containerd per node pull through `hosts.toml` mirrors
whose server is a closed port. Bytes the seed registry sent are counted from
its own log, not from our metrics.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import libtorrent as lt
import pytest

from harness.containerd import Containerd, write_hosts_toml
from harness.images import PushedImage, build_image
from harness.node import NodeProcess, metric_value, open_node
from harness.registry import Registry
from harness.skopeo import push
from harness.tracker import TrackerProcess, open_tracker
from p2preg.core.digest import Digest
from tests.fixtures.cluster import Background, swarm_counts, wait_for
from tests.fixtures.faults import SlowSeeder
from tracker.metainfo import make_metainfo

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEED_NS = "seed.test"
MiB = 1024 * 1024
# Layers above the node's p2p threshold (1 MiB) go through the swarm.
LAYERS = (3 * MiB, 6 * MiB, 12 * MiB)


@pytest.fixture(scope="module")
def big_layout(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_image(tmp_path_factory.mktemp("big") / "layout", seed="swarm", layer_sizes=LAYERS)


@pytest.fixture
def tracker(tmp_path: Path) -> Iterator[TrackerProcess]:
    with open_tracker(tmp_path / "tracker") as t:
        yield t


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    with ExitStack() as stack:

        def make(registry: Registry, tracker: TrackerProcess, name: str,
                 extra: tuple[str, ...] = ()) -> NodeProcess:
            args = ("--tracker", tracker.url, "--peer-host", "127.0.0.1", "--peer-port", "0",
                    "--node-name", name, *extra)
            return stack.enter_context(
                open_node(tmp_path / name, [f"{SEED_NS}={registry.url}"], args=args, name=name)
            )

        yield make


def _layer_bytes_sent(registry: Registry, image: PushedImage) -> dict[str, int]:
    registry.settle()
    sent = registry.blob_bytes_sent()
    return {b.digest: sent.get(b.digest, 0) for b in image.manifests[0].layers}


def _pull_all(daemons: list[Containerd], hosts: list[Path], ref: str) -> None:
    with concurrent.futures.ThreadPoolExecutor(len(daemons)) as pool:
        list(pool.map(lambda i: daemons[i].pull(ref, hosts[i]), range(len(daemons))))


def _tracker_metric(tracker: TrackerProcess, name: str, **labels: str) -> float:
    text = httpx.get(f"{tracker.url}/metrics", timeout=10, trust_env=False).text
    assert f"# HELP {name} " in text, name
    return metric_value(text, name, **labels)


def test_four_nodes_cost_the_seed_one_copy_and_survive_losing_the_first_seeder(
    registry: Registry, tracker: TrackerProcess, big_layout: Any, tmp_path: Path,
    cluster: Callable[..., NodeProcess], containerd_factory: Callable[..., Containerd],
) -> None:
    image = push(big_layout, registry.host, "team/app")
    ref = f"{SEED_NS}/{image.repository}:{image.tag}"
    nodes = [cluster(registry, tracker, f"node{i}") for i in range(4)]
    daemons = [containerd_factory() for _ in nodes]
    hosts = [tmp_path / f"hosts{i}" for i in range(len(nodes))]
    for node, h in zip(nodes, hosts, strict=True):
        write_hosts_toml(h, SEED_NS, node.url)

    _pull_all(daemons, hosts, ref)

    for daemon in daemons:
        assert daemon.is_unpacked(image.manifests[0])
    sent = _layer_bytes_sent(registry, image)
    for layer in image.manifests[0].layers:
        assert sent[layer.digest] <= 1.05 * layer.size, (layer, sent)
    from_peers = sum(n.metric("p2preg_peer_blob_bytes_total") for n in nodes)
    redundant = sum(n.metric("p2preg_peer_redundant_bytes_total") for n in nodes)
    upstream = sum(n.metric("p2preg_upstream_blob_bytes_total") for n in nodes)
    # Each node needed every layer once, from upstream or from peers; blocks
    # received twice are counted apart (no piece failed here).
    blobs = sum(b.size for b in image.manifests[0].blobs)
    assert from_peers - redundant + upstream == len(nodes) * blobs
    # The control calls stood for the announces: a SEEDED answer entered each
    # downloader, a confirmation or a publish each seeder, and the relays
    # answered those starts and completions themselves.
    entered = {by: _tracker_metric(tracker, "p2preg_tracker_peers_entered_total", by=by)
               for by in ("lease", "confirm", "publish")}  # fmt: skip
    local = sum(n.metric("p2preg_relay_announces_total", result="local") for n in nodes)
    print(f"peers entered by control calls {entered}; announces answered by relays {local}")
    completed = _tracker_metric(tracker, "p2preg_tracker_announces_total", transport="http",
                                event="completed")  # fmt: skip
    assert min(entered.values()) >= 1 and local >= entered["lease"] + entered["confirm"]
    assert completed == 0  # every completion was carried by its confirmation

    # Stop every node that fetched a layer from upstream (all fetched the small
    # config blob directly): the rest still seed every layer.
    holders = [n for n in nodes if n.metric("p2preg_upstream_blob_bytes_total") > MiB]
    assert holders and len(holders) < len(nodes)
    for n in holders:
        n.process.stop()
    late = cluster(registry, tracker, "late")
    late_ctrd = containerd_factory()
    write_hosts_toml(tmp_path / "hosts-late", SEED_NS, late.url)
    late_ctrd.pull(ref, tmp_path / "hosts-late")
    assert late_ctrd.is_unpacked(image.manifests[0])
    assert _layer_bytes_sent(registry, image) == sent
    assert late.metric("p2preg_peer_blob_bytes_total") >= sum(LAYERS)


def test_pulls_succeed_with_the_tracker_down(
    registry: Registry, big_layout: Any, tmp_path: Path, cluster: Callable[..., NodeProcess],
    containerd: Containerd,
) -> None:
    image = push(big_layout, registry.host, "team/app")
    with open_tracker(tmp_path / "gone") as tracker:
        node = cluster(registry, tracker, "lonely")
    # The tracker is stopped now: the node falls back to the seed registry.
    write_hosts_toml(tmp_path / "h", SEED_NS, node.url)
    containerd.pull(f"{SEED_NS}/{image.repository}:{image.tag}", tmp_path / "h")
    assert containerd.is_unpacked(image.manifests[0])
    assert node.metric("p2preg_fallbacks_total", reason="tracker") == len(LAYERS)


class CorruptSeeder:
    """A libtorrent session that claims a whole blob but serves flipped bytes."""

    def __init__(self, workdir: Path, tracker_url: str, blob: bytes, digest: Digest) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        good = workdir / "good"
        good.write_bytes(blob)
        meta = make_metainfo(good, digest, len(blob))
        bad = bytearray(blob)
        for i in range(0, len(bad), 4096):
            bad[i] ^= 0xFF
        (workdir / f"{digest.algorithm}-{digest.hex}").write_bytes(bytes(bad))
        self.session = lt.session({
            "listen_interfaces": "127.0.0.1:0", "enable_dht": False, "enable_lsd": False,
            "enable_upnp": False, "enable_natpmp": False, "enable_outgoing_utp": False,
            "enable_incoming_utp": False, "allow_multiple_connections_per_ip": True,
        })
        atp = lt.add_torrent_params()
        atp.ti = lt.torrent_info(meta.data)
        atp.save_path = str(workdir)
        # The publisher (see the test): its left=0 counts as a seeder.
        atp.trackers = [f"{tracker_url}/announce?node=test"]
        # Claim every piece without checking the file: a lying seeder.
        atp.have_pieces = [True] * atp.ti.num_pieces()
        atp.flags |= lt.torrent_flags.no_verify_files | lt.torrent_flags.disable_pex
        atp.flags &= ~(lt.torrent_flags.auto_managed | lt.torrent_flags.paused)
        self.handle = self.session.add_torrent(atp)
        self.meta = meta

    def wait_seeding(self, timeout_s: float = 20) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.handle.status().is_seeding:
            assert time.monotonic() < deadline, "corrupt seeder never started seeding"
            time.sleep(0.1)

    def close(self) -> None:
        self.session.remove_torrent(self.handle)
        del self.session


def test_a_peer_serving_corrupt_data_cannot_break_a_pull(
    registry: Registry, tracker: TrackerProcess, big_layout: Any, tmp_path: Path,
    cluster: Callable[..., NodeProcess],
) -> None:
    image = push(big_layout, registry.host, "team/app")
    layer = max(image.manifests[0].layers, key=lambda b: b.size)
    digest = Digest.parse(layer.digest)
    blob = big_layout.blob_path(layer.digest).read_bytes()
    meta = make_metainfo(big_layout.blob_path(layer.digest), digest, layer.size)
    # The tracker holds honest metainfo, but the only seeder in the swarm lies.
    with httpx.Client(trust_env=False) as http:
        from p2preg.core import wire

        lease = wire.encode(wire.LeaseRequest("test", layer.size))
        assert http.post(f"{tracker.url}/v1/leases/{digest}", content=lease).status_code == 200
        r = http.put(f"{tracker.url}/v1/metainfo/{digest}",
                     content=wire.encode(wire.PublishMetainfo("test", layer.size, meta.data)),
                     headers={"Content-Type": wire.CONTENT_TYPE})
        assert r.status_code in (200, 201), r.content
    liar = CorruptSeeder(tmp_path / "liar", tracker.url, blob, digest)
    try:
        liar.wait_seeding()
        fast = ("--config", str(_fast_fallback(tmp_path)))
        node = cluster(registry, tracker, "victim", extra=fast)
        url = f"{node.url}/v2/{image.repository}/blobs/{layer.digest}"
        got = httpx.get(url, timeout=120, trust_env=False)
        assert got.status_code == 200
        assert "sha256:" + hashlib.sha256(got.content).hexdigest() == layer.digest
        assert node.metric("p2preg_piece_hash_failures_total") > 0
    finally:
        liar.close()


def _fast_fallback(tmp_path: Path) -> Path:
    path = tmp_path / "fast.toml"
    path.write_text("swarm_stall_s = 5\nswarm_max_hash_failures = 2\n")
    return path


def test_a_restarted_node_seeds_its_store_without_downloading_again(
    registry: Registry, tracker: TrackerProcess, big_layout: Any,
    cluster: Callable[..., NodeProcess],
) -> None:
    image = push(big_layout, registry.host, "team/app")
    layers = image.manifests[0].layers
    first = cluster(registry, tracker, "first")
    with httpx.Client(trust_env=False, timeout=120) as http:
        for layer in layers:
            url = f"{first.url}/v2/{image.repository}/blobs/{layer.digest}"
            assert http.get(url).status_code == 200
        sent = _layer_bytes_sent(registry, image)
        first.process.stop()
        again = cluster(registry, tracker, "first")  # same data directory
        assert again.metric("p2preg_blobs_seeded") == len(layers)
        second = cluster(registry, tracker, "second")
        for layer in layers:
            got = http.get(f"{second.url}/v2/{image.repository}/blobs/{layer.digest}")
            assert "sha256:" + hashlib.sha256(got.content).hexdigest() == layer.digest
    assert _layer_bytes_sent(registry, image) == sent
    assert second.metric("p2preg_peer_blob_bytes_total") >= sum(LAYERS)
    assert again.metric("p2preg_upstream_blob_bytes_total") == 0


def test_a_seeder_that_joins_reaches_a_waiting_downloader_at_once(
    registry: Registry, tmp_path: Path, cluster: Callable[..., NodeProcess]
) -> None:
    """A node stuck downloading from a crawling peer is found by a new seeder.

    The tracker's announce interval is ten minutes, so the downloader will not
    announce again during the test: only the seeder, handed the downloader
    when it announces, can make the connection. The crawling seeder alone
    would need over twelve minutes for the layer.
    """
    layout: Any = build_image(tmp_path / "layout", seed="joins", layer_sizes=(12 * MiB,))
    image = push(layout, registry.host, "team/joins")
    (layer,) = image.manifests[0].layers
    digest = Digest.parse(layer.digest)
    slow_rate = 16 * 1024
    with (
        open_tracker(
            tmp_path / "tracker",
            args=("--announce-interval-s", "600", "--min-announce-interval-s", "600",
                  "--peer-ttl-s", "900"),
        ) as tracker,
        ExitStack() as stack,
    ):
        a = cluster(registry, tracker, "a")
        url_a = f"{a.url}/v2/{image.repository}/blobs/{layer.digest}"
        assert httpx.get(url_a, timeout=60, trust_env=False).status_code == 200
        wait_for(lambda: swarm_counts(tracker.url, layer.digest) == (1, 0), 30, "a to seed")
        meta = make_metainfo(layout.blob_path(layer.digest), digest, layer.size)
        slow = SlowSeeder(tmp_path / "slow", tracker.url, layout.blob_path(layer.digest), meta,
                          slow_rate)
        stack.callback(slow.close)
        slow.wait_seeding()
        wait_for(lambda: swarm_counts(tracker.url, layer.digest) == (2, 0), 30, "the slow seeder")
        a.process.stop()
        wait_for(lambda: swarm_counts(tracker.url, layer.digest) == (1, 0), 30, "a to leave")

        b = cluster(registry, tracker, "b")
        url_b = f"{b.url}/v2/{image.repository}/blobs/{layer.digest}"
        pending = Background(lambda: httpx.get(url_b, timeout=120, trust_env=False)).start()
        wait_for(lambda: swarm_counts(tracker.url, layer.digest) == (1, 1), 30, "b to join")
        cluster(registry, tracker, "a")  # the same store: it seeds the layer again
        r = pending.result(150)
        assert r.status_code == 200
        assert "sha256:" + hashlib.sha256(r.content).hexdigest() == layer.digest
        # b took the layer from a: the crawling seeder sent only a sliver of it.
        assert b.metric("p2preg_peer_blob_bytes_total") >= layer.size
        assert slow.uploaded() < layer.size // 4
        assert b.metric("p2preg_upstream_blob_bytes_total") == 0
