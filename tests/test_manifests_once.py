"""Manifests cross upstream once per cluster: four nodes pulling one image at once.

Real processes: docker-registry (whose JSON log lists every request it served),
a tracker, four nodes, and a containerd per node whose `hosts.toml` server is a
closed port, so every pull came through its node. The four pull the same tag at
the same moment — a single-platform image of several layers, and an OCI index
over two platforms. The registry's log shows at most one manifest GET per
digest for the whole cluster and none by tag; HEADs (which Docker Hub does not
count as pulls) are counted apart and printed: only the tag's, since its answer
names the digest. The nodes' own counters agree:
one body came from upstream, the rest from the tracker's shelf. And the shelf
does not say which repository holds a manifest: asked in another repository,
a node answers 404.
"""

from __future__ import annotations

import collections
import concurrent.futures
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from harness.containerd import Containerd, write_hosts_toml
from harness.images import OciLayout, PushedImage, build_image, build_index
from harness.node import NodeProcess, open_node
from harness.registry import Registry
from harness.skopeo import push
from harness.tracker import TrackerProcess, open_tracker

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEED_NS = "seed.test"
KiB, MiB = 1024, 1024 * 1024
NODES = 4


@pytest.fixture
def nodes(tmp_path: Path, registry: Registry) -> Iterator[list[NodeProcess]]:
    with ExitStack() as stack:
        tracker: TrackerProcess = stack.enter_context(open_tracker(tmp_path / "tracker"))
        made = []
        for i in range(NODES):
            name = f"node{i}"
            args = ("--tracker", tracker.url, "--peer-host", "127.0.0.1", "--peer-port", "0",
                    "--node-name", name)  # fmt: skip
            made.append(stack.enter_context(
                open_node(tmp_path / name, [f"{SEED_NS}={registry.url}"], args=args, name=name)
            ))
        yield made


def _pull_at_once(
    tmp_path: Path, nodes: list[NodeProcess], make: Callable[..., Containerd], ref: str
) -> list[Containerd]:
    daemons = [make() for _ in nodes]
    hosts = [tmp_path / f"hosts-{i}" for i in range(len(nodes))]
    for node, h in zip(nodes, hosts, strict=True):
        write_hosts_toml(h, SEED_NS, node.url)
    with concurrent.futures.ThreadPoolExecutor(len(daemons)) as pool:
        pulls = [pool.submit(d.pull, ref, h) for d, h in zip(daemons, hosts, strict=True)]
        for pull in pulls:
            pull.result()
    return daemons


def _check_manifest_requests(registry: Registry, image: PushedImage, start: int) -> None:
    registry.settle()
    asked = [(r.method, r.manifest[1]) for r in registry.served_requests()[start:]
             if r.manifest is not None]  # fmt: skip
    gets = collections.Counter(ref for method, ref in asked if method == "GET")
    heads = collections.Counter(ref for method, ref in asked if method == "HEAD")
    print(f"\n{image.reference}: manifest GETs {dict(gets)}; HEADs {dict(heads)}")
    assert image.tag not in gets, asked  # never by tag
    assert gets and all(n == 1 for n in gets.values()), asked  # once per digest
    assert image.digest in gets, asked
    # A tag's HEAD names the digest: the repository holds it, no HEAD by digest needed.
    assert set(heads) == {image.tag}, asked


def _bodies(nodes: list[NodeProcess], source: str) -> float:
    return sum(n.metric("p2preg_manifest_bodies_total", source=source) for n in nodes)


def _run(
    tmp_path: Path, registry: Registry, nodes: list[NodeProcess],
    make: Callable[..., Containerd], layout: OciLayout, repository: str,
) -> PushedImage:  # fmt: skip
    image = push(layout, registry.host, repository)
    registry.settle()
    start = len(registry.served_requests())
    daemons = _pull_at_once(
        tmp_path, nodes, make, f"{SEED_NS}/{image.repository}:{image.tag}"
    )
    for daemon in daemons:
        assert daemon.is_unpacked(image.for_platform("linux/amd64"))
    _check_manifest_requests(registry, image, start)
    fetched = _bodies(nodes, "upstream_holder") + _bodies(nodes, "upstream")
    shared = _bodies(nodes, "cluster")
    print(f"node counters: {fetched:.0f} bodies from upstream, {shared:.0f} from the shelf")
    wanted = 2 if image.is_index else 1  # the index, then the platform's manifest
    assert fetched == wanted and shared == (NODES - 1) * wanted
    return image


def test_four_nodes_pulling_one_image_get_each_manifest_once(
    tmp_path: Path, registry: Registry, nodes: list[NodeProcess],
    containerd_factory: Callable[..., Containerd],
) -> None:  # fmt: skip
    layout = build_image(tmp_path / "image", seed="once",
                         layer_sizes=(2 * MiB, 256 * KiB, 64 * KiB))  # fmt: skip
    image = _run(tmp_path, registry, nodes, containerd_factory, layout, "team/once")
    # The shelf has the body, but whether a repository holds it is upstream's word:
    # asked in a repository that does not, a node answers 404 (after a HEAD).
    for node in nodes[:2]:
        r = httpx.get(
            f"{node.url}/v2/team/elsewhere/manifests/{image.digest}",
            params={"ns": SEED_NS}, headers={"Accept": image.media_type}, timeout=30.0,
        )
        assert r.status_code == 404, r.text


def test_four_nodes_pulling_one_index_get_each_manifest_once(
    tmp_path: Path, registry: Registry, nodes: list[NodeProcess],
    containerd_factory: Callable[..., Containerd],
) -> None:  # fmt: skip
    layout = build_index(tmp_path / "index", seed="once-index",
                         layer_sizes=(2 * MiB, 64 * KiB))  # fmt: skip
    _run(tmp_path, registry, nodes, containerd_factory, layout, "team/multi")
