"""podman pulls through a real node that mirrors two seed registries.

`p2preg registries-conf` writes the registries.conf; podman (no `?ns=`) names
the upstream in the mirror path. Each seed registry holds a different image
under the same repository and tag, so a pull served by the wrong upstream gets
the wrong digest; the registries' access logs show that only the node fetched.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from harness.images import PushedImage, build_image
from harness.node import NodeProcess
from harness.podman import open_podman
from harness.registry import Registry
from harness.skopeo import push
from p2preg.node.manifest import OCI_MANIFEST
from tests.conftest import MakeNode

pytestmark = pytest.mark.integration

NAMES = ("one.test", "two.test")  # resolve nowhere: a pull can only be served by the node
REPOSITORY, TAG = "app/web", "1"


def _two_seeds(
    tmp_path: Path, registry_factory: Callable[..., Registry], make_node: MakeNode
) -> tuple[NodeProcess, dict[str, Registry], dict[str, PushedImage]]:
    registries, images = {}, {}
    for name in NAMES:
        layout = build_image(tmp_path / f"layout-{name}", layer_sizes=(4096, 8192), seed=name)
        registries[name] = registry_factory()
        images[name] = push(layout, registries[name].host, REPOSITORY, TAG)
    one, two = ({b.digest for b in images[n].blobs} for n in NAMES)
    assert not one & two
    node = make_node(*(f"{n}={registries[n].url}" for n in NAMES))
    return node, registries, images


def _registries_conf(tmp_path: Path, node: NodeProcess, registries: dict[str, Registry]) -> Path:
    config = tmp_path / "node.toml"
    upstreams = ", ".join(f'"{n}={registries[n].url}"' for n in NAMES)
    config.write_text(f'listen = "{node.host}"\nupstream = [{upstreams}]\n')
    out = tmp_path / "registries.conf"
    argv = [sys.executable, "-m", "p2preg", "registries-conf", "--config", str(config)]
    subprocess.run([*argv, "--output", str(out)], check=True, timeout=60, capture_output=True)
    return out


def test_podman_pulls_each_upstream_through_the_node(
    tmp_path: Path, registry_factory: Callable[..., Registry], make_node: MakeNode
) -> None:
    node, registries, images = _two_seeds(tmp_path, registry_factory, make_node)
    conf = _registries_conf(tmp_path, node, registries)
    # The registry's own location is the fallback; point it at a closed port,
    # so that only the node can serve these pulls.
    for name in NAMES:
        text = conf.read_text()
        conf.write_text(text.replace(f'"{registries[name].host}"', '"127.0.0.1:9"'))
    with open_podman(tmp_path / "podman", conf) as podman:
        for name in NAMES:
            podman.pull(f"{name}/{REPOSITORY}:{TAG}")
            assert podman.manifest_digest(f"{name}/{REPOSITORY}:{TAG}") == images[name].digest
    for name in NAMES:
        served = registries[name].served_requests()
        blobs = {r.blob[1] for r in served if r.blob is not None and r.method == "GET"}
        assert blobs == {b.digest for b in images[name].blobs}, name
        assert all("containers/" not in r.user_agent for r in served), name
    assert node.metric("p2preg_http_requests_total", route="blob", status="200") >= 6


def test_the_path_prefix_picks_the_upstream_and_ns_keeps_priority(
    tmp_path: Path, registry_factory: Callable[..., Registry], make_node: MakeNode
) -> None:
    node, _, images = _two_seeds(tmp_path, registry_factory, make_node)
    digests = {name: images[name].digest for name in NAMES}
    accept = {"Accept": OCI_MANIFEST}
    with httpx.Client(base_url=node.url, trust_env=False, timeout=60, headers=accept) as http:

        def digest(path: str) -> str | int:
            r = http.get(path)
            return r.headers["Docker-Content-Digest"] if r.status_code == 200 else r.status_code

        assert digest(f"/v2/two.test/{REPOSITORY}/manifests/{TAG}") == digests["two.test"]
        assert digest(f"/v2/one.test/{REPOSITORY}/manifests/{TAG}") == digests["one.test"]
        # No name: the first upstream, as before.
        assert digest(f"/v2/{REPOSITORY}/manifests/{TAG}") == digests["one.test"]
        # ?ns= first: the path is then a repository `two.test/app/web` on one.test.
        assert digest(f"/v2/two.test/{REPOSITORY}/manifests/{TAG}?ns=one.test") == 404
        assert digest(f"/v2/{REPOSITORY}/manifests/{TAG}?ns=two.test") == digests["two.test"]
        # A layer proven for two.test's repository is not served through one.test's.
        layer = images["two.test"].manifests[0].layers[0].digest
        assert http.get(f"/v2/two.test/{REPOSITORY}/blobs/{layer}").status_code == 200
        assert http.get(f"/v2/one.test/{REPOSITORY}/blobs/{layer}").status_code == 404
        tags = http.get(f"/v2/two.test/{REPOSITORY}/tags/list").json()
        assert tags == {"name": f"two.test/{REPOSITORY}", "tags": [TAG]}
