"""A seed registry that answers 500, 429 with Retry-After, hangs, or cuts a blob short.

A `FaultProxy` stands between a node (a real process) and the real
docker-registry and breaks scripted requests. Pulls must complete with the
right bytes while any path still works; when every attempt fails, the client
gets a clean OCI error (a JSON `errors` body, 5xx), the node stays healthy,
and the same pull works once the seed registry does.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.images import PushedImage, build_image
from harness.node import NodeProcess, open_node
from harness.registry import Registry
from harness.skopeo import push
from tests.fixtures.faults import Action, FaultProxy, pull_through
from tests.fixtures.reliability import Tally

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KiB = 1024
SEED_NS = "seed.test"
COMMAND = ".venv/bin/pytest -q tests/test_faults_upstream.py"
# The node gives up on a silent upstream after this long (per read).
TIMEOUT_S = 2


@pytest.fixture
def proxy(registry: Registry) -> Iterator[FaultProxy]:
    with FaultProxy(registry.url) as p:
        yield p


@pytest.fixture
def node(proxy: FaultProxy, tmp_path: Path) -> Iterator[NodeProcess]:
    cfg = tmp_path / "node.toml"
    cfg.write_text(f"upstream_timeout_s = {TIMEOUT_S}\nupstream_retries = 4\n")
    with open_node(tmp_path / "node", [f"{SEED_NS}={proxy.url}"], args=("--config", str(cfg))) as n:
        yield n


@pytest.fixture(scope="module")
def tally() -> Iterator[Tally]:
    t = Tally("faults-upstream", COMMAND)
    yield t
    t.write()


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Any]:
    base = tmp_path_factory.mktemp("upstream-faults")

    def make(seed: str) -> Any:
        return build_image(base / seed, seed=seed, layer_sizes=(200 * KiB, 900 * KiB))

    return make


def _is_blob_get(digest: str) -> Callable[[str, str], bool]:
    return lambda method, path: method == "GET" and path.endswith(f"/blobs/{digest}")


def _is_manifest_get(repository: str, tag: str) -> Callable[[str, str], bool]:
    suffix = f"/{repository}/manifests/{tag}"
    return lambda method, path: method == "GET" and path.endswith(suffix)


def _is_blob(digest: str) -> Callable[[str, str], bool]:
    return lambda method, path: path.endswith(f"/blobs/{digest}")


def _pull(http: httpx.Client, node: NodeProcess, image: PushedImage, tally: Tally) -> None:
    tally.pulls_attempted += 1
    tally.bytes_verified += pull_through(http, node.url, image)
    tally.pulls_completed += 1


def test_transient_upstream_faults_are_retried_and_the_pull_completes(
    registry: Registry,
    proxy: FaultProxy,
    node: NodeProcess,
    layouts: Callable[[str], Any],
    tally: Tally,
) -> None:
    http = httpx.Client(trust_env=False, timeout=120)
    scenarios: dict[str, Action] = {
        "500": Action("status", status=500),
        "429-retry-after": Action("status", status=429, retry_after_s=1),
        "hang": Action("hang", hang_s=4 * TIMEOUT_S),
        "cut": Action("cut", cut_after=300 * KiB),
    }
    for name, fault in scenarios.items():
        image = push(layouts(name), registry.host, f"faults/{name}")
        layer = max(image.manifests[0].layers, key=lambda b: b.size)
        # Twice on the manifest and twice on the big layer: the retries must outlast both.
        before = len(proxy.log)
        proxy.script(_is_manifest_get(image.repository, image.tag), fault, fault)
        proxy.script(_is_blob_get(layer.digest), fault, fault)
        _pull(http, node, image, tally)
        tally.faults_injected[name] += sum(1 for e in proxy.log[before:] if e[3] != "pass")
        proxy.clear()
        gets = [e for e in proxy.log if e[1] == "GET" and e[2].endswith(layer.digest)]
        if name == "429-retry-after":
            # The node honoured Retry-After: no retry came sooner than it asked.
            assert gets[1][0] - gets[0][0] >= 0.9 and gets[2][0] - gets[1][0] >= 0.9
        if name == "cut":
            # A cut body is resumed where it stopped, not fetched again from byte 0.
            assert any(e[4].startswith("bytes=") and e[4] != "bytes=0-" for e in gets), gets
    node.process.check_running()
    assert http.get(f"{node.url}/healthz").status_code == 200
    http.close()


def test_when_every_attempt_fails_the_client_gets_a_clean_error_and_the_node_recovers(
    registry: Registry,
    proxy: FaultProxy,
    node: NodeProcess,
    layouts: Callable[[str], Any],
    tally: Tally,
) -> None:
    http = httpx.Client(trust_env=False, timeout=120)
    image = push(layouts("dead"), registry.host, "faults/dead")
    layer = max(image.manifests[0].layers, key=lambda b: b.size)
    url = f"{node.url}/v2/{image.repository}/blobs/{layer.digest}"
    cases = {
        "500-forever": Action("status", status=500),
        "429-forever": Action("status", status=429, retry_after_s=1),
        "hang-forever": Action("hang", hang_s=4 * TIMEOUT_S),
        "cut-forever": Action("cut", cut_after=100 * KiB),
    }
    for name, fault in cases.items():
        # HEAD too for the status faults: the node asks upstream whether the repository
        # holds the blob first; a cut HEAD has no body to cut.
        match = _is_blob_get(layer.digest) if fault.kind == "cut" else _is_blob(layer.digest)
        proxy.script(match, forever=fault)
        before = len(proxy.log)
        tally.pulls_attempted += 1
        r = http.get(url)
        tally.faults_injected[name] += len(proxy.log) - before
        assert 500 <= r.status_code < 600, (name, r.status_code)
        assert r.headers["Content-Type"].startswith("application/json"), name
        errors = json.loads(r.content)["errors"]
        assert errors and errors[0]["code"] == "UNAVAILABLE", (name, errors)
        assert http.get(f"{node.url}/healthz").status_code == 200
        # Nothing unverified stayed behind under the digest.
        assert not list(node.data_dir.rglob(layer.digest.split(":")[1])), name
        proxy.clear()
    # The seed registry works again: so does the same pull.
    _pull(http, node, image, tally)
    r = http.get(url)
    assert hashlib.sha256(r.content).hexdigest() == layer.digest.split(":")[1]
    http.close()
