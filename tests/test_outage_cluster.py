"""During an outage the site serves what any node holds: real processes throughout.

docker-registry, the tracker, nodes and a fresh containerd for each pull (its
`hosts.toml` server is a closed port, so a pull that succeeds came through the
node). Node `a` pulls an image while the registry is up — one layer above
`p2p_min_bytes`, one below, and the config — and the registry is stopped. Node
`b`, started only then, never saw the image nor asked the registry anything:
it pulls it by digest and by tag, the tag from the cluster's last answer, the
manifest from the tracker, the blobs from `a`, each counted as an answer on
the cluster's word. The manifest is refused under a repository the cluster
never said holds it. Node `c`, started with `--no-cluster-fallback`, answers
the same requests with a clean OCI 503 that says upstream is unreachable.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from harness.containerd import Containerd, write_hosts_toml
from harness.images import PushedImage, build_image
from harness.node import NodeProcess, open_node
from harness.procs import wait_until
from harness.registry import open_registry
from harness.skopeo import push
from harness.tracker import TrackerProcess, open_tracker
from tests.fixtures.reliability import Tally

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEED_NS = "seed.test"
REPOSITORY = "edge/app"
KiB, MiB = 1024, 1024 * 1024
LAYERS = (200 * KiB, 2 * MiB)  # one below p2p_min_bytes (1 MiB), one above
PULL_TIMEOUT_S = 180.0
COMMAND = ".venv/bin/pytest -q tests/test_outage_cluster.py"
FALLBACK = "p2preg_cluster_fallback_answers_total"


@pytest.fixture
def tracker(tmp_path: Path) -> Iterator[TrackerProcess]:
    with open_tracker(tmp_path / "tracker") as t:
        yield t


@pytest.fixture
def tally() -> Iterator[Tally]:
    t = Tally("outage-cluster", COMMAND)
    yield t
    t.write()


class Site:
    """Nodes on one tracker, and the fresh containerd daemons that pull through them."""

    def __init__(
        self, tmp_path: Path, tracker: TrackerProcess,
        containerd_factory: Callable[..., Containerd], tally: Tally,
    ) -> None:
        self.tmp_path = tmp_path
        self.tracker = tracker
        self.containerd_factory = containerd_factory
        self.tally = tally
        self.pulls = 0

    def node(self, stack: ExitStack, name: str, registry_url: str, *extra: str) -> NodeProcess:
        args = ("--tracker", self.tracker.url, "--peer-host", "127.0.0.1", "--peer-port", "0",
                "--node-name", name, *extra)  # fmt: skip
        return stack.enter_context(open_node(
            self.tmp_path / name, [f"{SEED_NS}={registry_url}"], args=args, name=name
        ))

    def pull(self, node: NodeProcess, image: PushedImage, *, by: str, when: str) -> None:
        self.pulls += 1
        hosts = self.tmp_path / f"hosts-{self.pulls}"
        write_hosts_toml(hosts, SEED_NS, node.url)
        ref = f"{SEED_NS}/{image.repository}"
        ref += f":{image.tag}" if by == "tag" else f"@{image.digest}"
        daemon = self.containerd_factory()
        self.tally.pulls_attempted += 1
        start = time.monotonic()
        daemon.pull(ref, hosts, timeout_s=PULL_TIMEOUT_S)
        pull_s = self.tally.extra.setdefault("pull_s", {})
        assert isinstance(pull_s, dict)
        pull_s[f"{when}, by {by}"] = round(time.monotonic() - start, 2)
        assert daemon.is_unpacked(image.manifests[0]), (by, ref)
        self.tally.pulls_completed += 1
        self.tally.bytes_verified += sum(b.size for b in image.blobs)


def _get(node: NodeProcess, path: str) -> httpx.Response:
    return httpx.get(f"{node.url}/v2/{path}?ns={SEED_NS}", timeout=60,
                     headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})


def _refused_as_unreachable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    (error,) = response.json()["errors"]
    assert error["code"] == "UNAVAILABLE" and "unreachable" in error["message"], error


def test_a_node_that_never_saw_the_image_pulls_it_from_the_site_during_an_outage(
    tmp_path: Path, tracker: TrackerProcess,
    containerd_factory: Callable[..., Containerd], tally: Tally,
) -> None:
    site = Site(tmp_path, tracker, containerd_factory, tally)
    layout = build_image(tmp_path / "image", seed="outage-cluster", layer_sizes=LAYERS)
    with ExitStack() as stack:
        registry = stack.enter_context(open_registry(tmp_path / "registry"))
        image = push(layout, registry.host, REPOSITORY)
        a = site.node(stack, "a", registry.url)
        site.pull(a, image, by="tag", when="registry up, node a")
        # Every blob of the image is seeded by a (the small ones in the background).
        blobs = [str(b.digest) for b in image.blobs]
        wait_until(lambda: a.metric("p2preg_blobs_seeded") >= len(blobs), timeout_s=30,
                   what="node a seeding every blob of the image")  # fmt: skip

        registry.process.stop()
        tally.faults_injected["seed registry stopped"] += 1
        b = site.node(stack, "b", registry.url)
        c = site.node(stack, "c", registry.url, "--no-cluster-fallback")

        site.pull(b, image, by="digest", when="outage, node b never saw the image")
        assert b.metric(FALLBACK, kind="manifest") >= 1
        assert b.metric(FALLBACK, kind="blob") >= len(blobs)
        assert b.metric("p2preg_blob_fetches_total", source="peers") == len(blobs)
        site.pull(b, image, by="tag", when="outage, node b by tag")
        assert b.metric(FALLBACK, kind="tag") >= 1

        # The cluster said where the manifest is: under another repository it is refused.
        answered = b.metric(FALLBACK, kind="manifest")
        _refused_as_unreachable(_get(b, f"other/app/manifests/{image.digest}"))
        assert b.metric(FALLBACK, kind="manifest") == answered

        # Switched off: the same requests get the node's clean 503.
        _refused_as_unreachable(_get(c, f"{REPOSITORY}/manifests/{image.tag}"))
        _refused_as_unreachable(_get(c, f"{REPOSITORY}/manifests/{image.digest}"))
        _refused_as_unreachable(_get(c, f"{REPOSITORY}/blobs/{blobs[-1]}"))
        assert c.metric(FALLBACK, kind="tag") == 0 and c.metric(FALLBACK, kind="manifest") == 0
