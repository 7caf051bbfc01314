"""An edge site's seed registry goes away for longer than every TTL, and comes back.

Real processes throughout: docker-registry, the tracker, a node, and a fresh
containerd for each pull (its `hosts.toml` server is a closed port, so a pull
that succeeds came through the node). The outage outlasts the node's tag TTL,
and the node restarts in the middle of it (same data directory, same port):
pulls by tag and by digest keep working, from what the node kept. Then the
registry comes back on the same storage and port, a new image is pushed to
the same tag, and one TTL later the tag pulls the new image.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from harness.containerd import Containerd, write_hosts_toml
from harness.images import PushedImage, build_image
from harness.node import NodeProcess, open_node
from harness.registry import Registry, open_registry
from harness.skopeo import push
from harness.tracker import TrackerProcess, open_tracker
from tests.fixtures.reliability import Tally

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEED_NS = "seed.test"
REPOSITORY = "edge/app"
KiB, MiB = 1024, 1024 * 1024
# One layer above the node's p2p threshold (1 MiB), so the first pull goes
# through the tracker's lease, and a small one that comes straight from upstream.
LAYERS = (200 * KiB, 2 * MiB)
TTL_S = 2.0
PULL_TIMEOUT_S = 180.0
COMMAND = ".venv/bin/pytest -q tests/test_outage.py"


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("outage")
    return {
        name: build_image(base / name, seed=f"outage-{name}", layer_sizes=LAYERS)
        for name in ("before", "after")
    }


@pytest.fixture
def tracker(tmp_path: Path) -> Iterator[TrackerProcess]:
    with open_tracker(tmp_path / "tracker") as t:
        yield t


class Site:
    """One node and the fresh containerd daemons that pull through it."""

    def __init__(
        self, tmp_path: Path, tracker: TrackerProcess,
        containerd_factory: Callable[..., Containerd], tally: Tally,
    ) -> None:
        self.tmp_path = tmp_path
        self.tracker = tracker
        self.containerd_factory = containerd_factory
        self.tally = tally
        self.pulls = 0

    def node(self, stack: ExitStack, registry_url: str, port: int | None = None) -> NodeProcess:
        args = ("--tracker", self.tracker.url, "--peer-host", "127.0.0.1", "--peer-port", "0",
                "--node-name", "edge", "--tag-ttl-s", str(TTL_S))
        return stack.enter_context(open_node(
            self.tmp_path / "node", [f"{SEED_NS}={registry_url}"], args=args, port=port
        ))

    def pull(self, node: NodeProcess, image: PushedImage, *, by: str, when: str) -> None:
        """A fresh containerd pulls `image` through `node`, by tag or by digest.

        The time each pull took goes to the tally (reported, not asserted).
        """
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
        # The ChainID snapshot exists only if every layer matched the config's diff_ids.
        assert daemon.is_unpacked(image.manifests[0]), (by, ref)
        self.tally.pulls_completed += 1
        self.tally.bytes_verified += sum(b.size for b in image.blobs)


@pytest.fixture
def tally() -> Iterator[Tally]:
    t = Tally("outage", COMMAND)
    yield t
    t.write()


def _stale_answers(node: NodeProcess) -> float:
    return node.metric("p2preg_stale_tag_answers_total", registry=SEED_NS)


def test_an_outage_longer_than_every_ttl_with_a_node_restart_in_the_middle(
    tmp_path: Path, tracker: TrackerProcess, layouts: dict[str, Any],
    containerd_factory: Callable[..., Containerd], tally: Tally,
) -> None:
    site = Site(tmp_path, tracker, containerd_factory, tally)
    with ExitStack() as stack:
        registry: Registry = stack.enter_context(open_registry(tmp_path / "registry"))
        before = push(layouts["before"], registry.host, REPOSITORY)
        with ExitStack() as first_run:
            node = site.node(first_run, registry.url)
            port = int(node.host.rpartition(":")[2])
            site.pull(node, before, by="tag", when="registry up")

            registry.process.stop()
            tally.faults_injected["seed registry stopped"] += 1
            time.sleep(TTL_S + 1)  # every tag answer the node holds is past its TTL
            site.pull(node, before, by="tag", when="outage")
            site.pull(node, before, by="digest", when="outage")
            assert _stale_answers(node) >= 1

        tally.faults_injected["node restarted during the outage"] += 1
        node = site.node(stack, registry.url, port=port)  # same data directory and port
        site.pull(node, before, by="tag", when="outage, node restarted")
        site.pull(node, before, by="digest", when="outage, node restarted")
        assert _stale_answers(node) >= 1  # the tag map came through the restart

        # The registry comes back on its storage and port; the tag moves.
        registry = stack.enter_context(open_registry(
            tmp_path / "registry-again", storage_dir=registry.storage_dir, port=registry.port
        ))
        after = push(layouts["after"], registry.host, REPOSITORY, before.tag)
        assert after.digest != before.digest
        # The node last asked upstream (and failed) before the registry came
        # back: one TTL from now it asks again and hears of the move.
        time.sleep(TTL_S + 1)
        stale = _stale_answers(node)
        site.pull(node, after, by="tag", when="registry back, tag moved")
        assert _stale_answers(node) == stale
