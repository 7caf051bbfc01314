"""Manifest bodies through the cluster (p2preg/node/cluster_manifests.py), against a real tracker.

Four nodes that lack one body at once, each with its own `TrackerClient` to an
in-process tracker: upstream is asked once (by the lease holder), the other
three take the body from the shelf. A tracker that cannot be reached sends a
node upstream itself, and two asks on one node still make one upstream GET. A
shelf that hands out a body that does not match its digest (a lying tracker,
the one fake here) is not believed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from p2preg.core import errors as tracker_errors
from p2preg.core.digest import Digest
from p2preg.core.wire import LeaseReply, ManifestBody
from p2preg.node.cluster_manifests import ClusterManifests
from p2preg.node.metrics import NodeMetrics
from tests.tracker_helpers import running_tracker
from tracker.client import open_tracker_client

OCI = "application/vnd.oci.image.manifest.v1+json"
BODY = b'{"schemaVersion": 2, "mediaType": "' + OCI.encode() + b'"}'
DIGEST = Digest.of(BODY)


class CountingUpstream:
    """The seed registry's GET by digest, as the resolver hands it over: counted."""

    def __init__(self, body: bytes = BODY, delay_s: float = 0.2) -> None:
        self.calls = 0
        self.body = body
        self.delay_s = delay_s

    async def __call__(self) -> tuple[str, bytes]:
        self.calls += 1
        await trio.sleep(self.delay_s)  # the holder is busy while the others ask
        return OCI, self.body


def sources(metrics: NodeMetrics) -> dict[str, float]:
    return {
        s: metrics.manifest_bodies.labels(s)._value.get()
        for s in ("cluster", "upstream_holder", "upstream")
    }


@pytest.mark.parametrize("delay_s", [0.2, 4.0], ids=["quick", "slower-than-the-silence"])
async def test_four_nodes_make_one_upstream_get(tmp_path: Path, delay_s: float) -> None:
    """One GET, even when it outlasts `lease_silence_s` (2.5 s): the holder renews."""
    upstream = CountingUpstream(delay_s=delay_s)
    metrics = [NodeMetrics() for _ in range(4)]
    got: list[bytes] = []
    async with (
        running_tracker(tmp_path) as url,
        open_tracker_client(url, node="n0") as c0,
        open_tracker_client(url, node="n1") as c1,
        open_tracker_client(url, node="n2") as c2,
        open_tracker_client(url, node="n3") as c3,
    ):
        clients = (c0, c1, c2, c3)
        nodes = [ClusterManifests(c, m, 20.0) for c, m in zip(clients, metrics, strict=True)]

        async def pull(node: ClusterManifests) -> None:
            got.append(await node.body(DIGEST, "127.0.0.1:5000", "library/app", upstream))

        async with trio.open_nursery() as nursery:
            for node in nodes:
                nursery.start_soon(pull, node)
        shelved = await c0.get_manifest(DIGEST)
    assert got == [BODY] * 4 and upstream.calls == 1
    totals = [sources(m) for m in metrics]
    assert sum(t["upstream_holder"] for t in totals) == 1
    assert sum(t["cluster"] for t in totals) == 3
    assert sum(t["upstream"] for t in totals) == 0
    assert shelved == ManifestBody(OCI, BODY, ["127.0.0.1:5000/library/app"])


async def test_without_a_tracker_a_node_goes_upstream_once_for_all_its_asks() -> None:
    upstream = CountingUpstream()
    metrics = NodeMetrics()
    # A closed loopback port: the tracker cannot be reached.
    async with open_tracker_client("http://127.0.0.1:9", node="n0", timeout_s=2.0) as client:
        node = ClusterManifests(client, metrics, 20.0)
        got: list[bytes] = []

        async def pull() -> None:
            got.append(await node.body(DIGEST, "127.0.0.1:5000", "library/app", upstream))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pull)
            nursery.start_soon(pull)
    assert got == [BODY, BODY] and upstream.calls == 1
    assert sources(metrics) == {"cluster": 0, "upstream_holder": 0, "upstream": 1}


class LyingShelf:
    """A tracker whose shelf holds another body under the digest; its leases are away."""

    def __init__(self) -> None:
        self.puts: list[Digest] = []

    async def get_manifest(self, digest: Digest) -> ManifestBody | None:
        await trio.lowlevel.checkpoint()
        return ManifestBody(OCI, b'{"schemaVersion": 2, "evil": true}', [])

    async def put_manifest(
        self, digest: Digest, ns: str, repository: str, media_type: str, body: bytes
    ) -> None:
        await trio.lowlevel.checkpoint()
        self.puts.append(digest)

    async def acquire_lease(
        self,
        digest: Digest,
        *,
        size: int | None = None,
        wait_s: float = 0.0,
        group: str | None = None,
        order: int = 0,
        manifest: bool = False,
    ) -> LeaseReply:
        await trio.lowlevel.checkpoint()
        raise tracker_errors.TrackerUnavailable("tracker http://tracker.invalid: away")

    async def release_lease(self, digest: Digest, lease_id: str) -> None:
        await trio.lowlevel.checkpoint()


async def test_a_shelved_body_that_does_not_match_is_not_believed() -> None:
    upstream = CountingUpstream()
    metrics = NodeMetrics()
    shelf = LyingShelf()
    node = ClusterManifests(shelf, metrics, 20.0)
    assert await node.body(DIGEST, "127.0.0.1:5000", "library/app", upstream) == BODY
    assert upstream.calls == 1 and shelf.puts == [DIGEST]
    assert sources(metrics) == {"cluster": 0, "upstream_holder": 0, "upstream": 1}
