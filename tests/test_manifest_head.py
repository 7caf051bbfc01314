"""What a node asks the seed registry for a tag: HEADs, and one GET per manifest digest.

Real processes: docker-registry (whose JSON log lists every request it
served), a node, and a fresh containerd for each pull, whose `hosts.toml`
server is a closed port, so a pull that succeeds came through the node. A
client's HEAD of the tag costs upstream one HEAD; two pulls by tag, the second
after the tag's TTL, cost HEADs of the tag and exactly one GET of the manifest,
by digest, never by tag.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from harness.containerd import Containerd, write_hosts_toml
from harness.images import build_image
from harness.node import NodeProcess
from harness.registry import Registry, open_registry
from harness.skopeo import push

pytestmark = pytest.mark.integration

SEED_NS = "seed.test"
REPOSITORY = "edge/app"
TTL_S = 2.0
KiB = 1024


def _manifest_requests(registry: Registry, since: int) -> list[tuple[str, str]]:
    """(method, tag or digest) of each manifest request served after the first `since`."""
    registry.settle()
    served = registry.served_requests()[since:]
    return [(r.method, r.manifest[1]) for r in served if r.manifest is not None]


def test_a_tag_costs_upstream_heads_and_a_manifest_one_get_by_digest(
    tmp_path: Path, containerd_factory: Callable[..., Containerd],
    make_node: Callable[..., NodeProcess],
) -> None:
    layout = build_image(tmp_path / "image", seed="tag-head", layer_sizes=(64 * KiB,))
    with open_registry(tmp_path / "registry") as registry:
        image = push(layout, registry.host, REPOSITORY)
        (manifest,) = image.manifests
        node = make_node(f"{SEED_NS}={registry.url}", args=("--tag-ttl-s", str(TTL_S)))
        registry.settle()
        start = len(registry.served_requests())

        # A client's HEAD of the tag (curl, skopeo inspect): an upstream HEAD only.
        r = httpx.head(
            f"{node.url}/v2/{REPOSITORY}/manifests/{image.tag}",
            params={"ns": SEED_NS}, headers={"Accept": image.media_type}, timeout=30.0,
        )
        assert r.status_code == 200, r.text
        assert r.headers["Docker-Content-Digest"] == image.digest
        assert r.headers["Content-Length"] == str(manifest.size)
        assert r.headers["Content-Type"] == image.media_type
        assert _manifest_requests(registry, start) == [("HEAD", image.tag)]

        for pull in range(2):
            if pull:
                time.sleep(TTL_S + 1)  # the node's answer for the tag is past its TTL
            hosts = tmp_path / f"hosts-{pull}"
            write_hosts_toml(hosts, SEED_NS, node.url)
            daemon = containerd_factory()
            daemon.pull(f"{SEED_NS}/{REPOSITORY}:{image.tag}", hosts, timeout_s=180.0)
            assert daemon.is_unpacked(manifest)

        asked = _manifest_requests(registry, start)
        gets = [ref for method, ref in asked if method == "GET"]
        heads = [ref for method, ref in asked if method == "HEAD"]
        assert gets == [image.digest], asked  # once, by digest; never by tag
        # The HEAD above, then each pull's (the second past the TTL) at least.
        assert set(heads) == {image.tag} and len(heads) >= 3, asked
        assert {method for method, _ in asked} == {"HEAD", "GET"}
        assert node.metric("p2preg_manifest_head_fallbacks_total", registry=SEED_NS) == 0
