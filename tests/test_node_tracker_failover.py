"""A node given several trackers (replicas) fails over between them.

Real processes on loopback: the seed registry, two independent trackers (each
its own SQLite store, one cluster CA or one token), and nodes given both with
a repeated `--tracker`. What must hold: with the first tracker killed (SIGKILL
by pid) before a pull, the pull completes, the control API (lease, publish)
and libtorrent's announces (through the node's relay, on the control
connection, under mutual TLS; or carried by the control calls) reach the second tracker,
and a second node gets the blob from the first through it; with both alive, the second
gets no traffic at all (the relay's announces go where the control API goes: the first
tracker that answers); a
list mixing http and https, or https without a tls_dir, stops the node in one
line.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from harness.images import PushedImage, build_image
from harness.node import NodeProcess, metric_value, open_node
from harness.procs import clean_env, free_port, http_get
from harness.registry import Registry
from harness.skopeo import push
from harness.tlscerts import ClusterCA
from harness.tracker import TrackerProcess, open_tracker
from tests.fixtures.cluster import get_blob, kill9, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEED_NS = "seed.test"
MiB = 1024 * 1024
TOKEN = "failover-token"
LAYER = 3 * MiB  # above the node's p2p threshold: the swarm's


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_image(tmp_path_factory.mktemp("fo") / "layout", seed="fo", layer_sizes=(LAYER,))


def _tracker_metric(tracker: TrackerProcess, name: str) -> float:
    """Summed over every label set (`p2preg_tracker_announces_total` has several)."""
    text = http_get(f"{tracker.metrics_url or tracker.url}/metrics").text
    total = 0.0
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample == name or sample.startswith(name + "{"):
            total += float(value)
    return total


def _pull(node: NodeProcess, image: PushedImage) -> None:
    layer = image.manifests[0].layers[0]
    r = get_blob(f"{node.url}/v2/{image.repository}/blobs/{layer.digest}")
    assert r.status_code == 200, (r.status_code, r.text[:300])
    assert "sha256:" + hashlib.sha256(r.content).hexdigest() == layer.digest


def _layer_sent(registry: Registry, image: PushedImage) -> int:
    registry.settle()
    return registry.blob_bytes_sent().get(image.manifests[0].layers[0].digest, 0)


NodeFactory = Callable[[str, list[TrackerProcess]], NodeProcess]


@pytest.fixture
def tls_cluster(
    tmp_path: Path, registry: Registry
) -> Iterator[tuple[TrackerProcess, TrackerProcess, NodeFactory]]:
    """Two mutual-TLS trackers of one CA, and a maker of nodes of that CA."""
    ca = ClusterCA.make("fo")
    certs = tmp_path / "certs"
    with ExitStack() as stack:

        def tracker(name: str) -> TrackerProcess:
            tls_dir = ca.tls_dir(certs / name, "tracker", name, ips=["127.0.0.1"])
            return stack.enter_context(
                open_tracker(tmp_path / name, name=f"tracker-{name}", tls_dir=tls_dir)
            )

        def node(name: str, trackers: list[TrackerProcess]) -> NodeProcess:
            args = ["--peer-host", "127.0.0.1", "--peer-ssl-port", str(free_port())]
            for t in trackers:
                args += ["--tracker", t.url]
            return stack.enter_context(open_node(
                tmp_path / name, [f"{SEED_NS}={registry.url}"], args=args, name=name,
                tls_dir=ca.tls_dir(certs / name, "node", name),
            ))  # fmt: skip

        yield tracker("a"), tracker("b"), node


def test_with_the_first_tracker_dead_the_second_serves_leases_metainfo_and_announces(
    registry: Registry, layout: Any, tls_cluster: tuple[TrackerProcess, TrackerProcess, NodeFactory]
) -> None:
    a, b, node = tls_cluster
    image = push(layout, registry.host, "fo/dead-first")
    n1, n2 = node("n1", [a, b]), node("n2", [a, b])
    kill9(a.process)

    _pull(n1, image)
    # The lease and the metainfo came from b, after one move.
    assert n1.metric("p2preg_tracker_failovers_total", reason="unreachable") == 1
    assert _tracker_metric(b, "p2preg_tracker_lease_grants_total") == 1
    assert _tracker_metric(b, "p2preg_tracker_metainfo") == 1
    # n1's swarm news went on the control connection that moved to b (with the
    # node's certificate): its publish entered it, as its relayed start would
    # have: b counts n1 a seeder, and no announce of n1's found no tracker.
    wait_for(lambda: _tracker_metric(b, "p2preg_tracker_seeders") == 1, 30, "n1 seeding on b")
    assert _tracker_metric(b, "p2preg_tracker_peers_entered_total") > 0
    assert n1.metric("p2preg_relay_announces_total", result="no_tracker") == 0

    _pull(n2, image)
    assert n2.metric("p2preg_peer_blob_bytes_total") >= LAYER
    assert n2.metric("p2preg_upstream_blob_bytes_total") == 0
    assert _layer_sent(registry, image) <= 1.05 * image.manifests[0].layers[0].size
    assert n2.metric("p2preg_tracker_failovers_total", reason="unreachable") == 1


def test_with_both_alive_the_second_tracker_gets_no_traffic(
    registry: Registry, layout: Any, tmp_path: Path
) -> None:
    image = push(layout, registry.host, "fo/both-alive")
    with ExitStack() as stack:
        a, b = (
            stack.enter_context(open_tracker(tmp_path / n, token=TOKEN, name=f"tracker-{n}"))
            for n in ("a", "b")
        )

        def node(name: str) -> NodeProcess:
            args = ("--tracker", a.url, "--tracker", b.url, "--peer-host", "127.0.0.1",
                    "--peer-port", "0", "--node-name", name)  # fmt: skip
            env = {"P2PREG_TRACKER_TOKEN": TOKEN}
            upstreams = [f"{SEED_NS}={registry.url}"]
            return stack.enter_context(
                open_node(tmp_path / name, upstreams, name=name, args=args, env=env)
            )

        # The control API, and the announces relayed on it, start at the first tracker.
        nodes = [node("n1"), node("n2")]
        for n in nodes:
            _pull(n, image)
        assert nodes[1].metric("p2preg_peer_blob_bytes_total") >= LAYER
        assert _tracker_metric(a, "p2preg_tracker_lease_grants_total") == 1
        assert _tracker_metric(a, "p2preg_tracker_peers_entered_total") > 0
        for name in ("lease_grants_total", "metainfo", "announces_total", "peers_entered_total",
                     "seeders", "peers"):  # fmt: skip
            assert _tracker_metric(b, f"p2preg_tracker_{name}") == 0, name
        for n in nodes:
            assert metric_value(n.metrics(), "p2preg_tracker_failovers_total") == 0
            assert "p2preg_tracker_failovers_total{" not in n.metrics()


def _refused(tmp_path: Path, *args: str) -> str:
    argv = [sys.executable, "-m", "p2preg", "node", "--upstream", "http://127.0.0.1:9"]
    argv += ["--data-dir", str(tmp_path / "data"), "--peer-host", "127.0.0.1", *args]
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=60, env=clean_env(drop_prefixes=["P2PREG_"])
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("p2preg node: ")
    return proc.stderr


def test_trackers_of_mixed_schemes_stop_the_node_in_one_line(tmp_path: Path) -> None:
    mixed = _refused(
        tmp_path, "--tracker", "http://127.0.0.1:6969", "--tracker", "https://127.0.0.1:6970"
    )
    assert "mix http and https" in mixed
    toml = tmp_path / "node.toml"
    toml.write_text('trackers = ["https://127.0.0.1:6969", "http://127.0.0.1:6970"]\n')
    assert "mix http and https" in _refused(tmp_path, "--config", str(toml))
    twice = _refused(tmp_path, "--tracker", "http://127.0.0.1:1", "--tracker", "http://127.0.0.1:1")
    assert "given twice" in twice
