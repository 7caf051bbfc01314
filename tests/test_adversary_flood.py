"""A member floods the tracker with publishes, reports and lease requests (issue 13).

Real processes: a docker-registry, the tracker under mutual TLS, two honest
nodes with certificates from the cluster CA. The adversary is this test holding
a valid node certificate of its own (`mallory`): while the two nodes pull both
layers of an image at once, it sends as fast as it can, over several
keep-alive connections, metainfo publishes (garbage, some of a MiB, and valid
torrents for blobs nobody has), bad reports (against the honest layers, with
garbage as the replacement) and lease requests for made-up digests. A third
member (`watcher`) keeps asking the tracker for a lease and a lookup meanwhile.

What must hold: every honest pull completes with the right bytes; each layer
crosses the upstream link at most twice (the flood may cost one extra copy,
no more) — in practice once; the watcher's requests all succeed during the
flood; the honest nodes are never refused (no fallback because of the
tracker); and the flood was real: the tracker refused the adversary on every
kind (`p2preg_tracker_quota_refusals_total{kind}`).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from harness.images import build_image
from harness.node import NodeProcess
from harness.registry import Registry
from harness.tlscerts import client_ssl_context
from p2preg.core import wire
from p2preg.core.digest import Digest
from p2preg.core.tls import ReloadingTLS
from tests.adversary_cluster import Blob, Cluster, MiB, open_cluster, pull_all
from tests.fixtures.reliability import Attack, Tally
from tracker.client import open_tracker_client
from tracker.metainfo import make_metainfo

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = "team/flooded"
LAYERS = (3 * MiB, 4 * MiB)  # above the node's p2p threshold: lease and swarm
COMMAND = ".venv/bin/pytest -q tests/test_adversary_flood.py"
# Quotas low enough that the flood meets them within a second, far above what
# two nodes pulling two layers ask for.
QUOTAS = (
    "--quota-publish-per-s", "5", "--quota-publish-burst", "40",
    "--quota-report-per-s", "2", "--quota-report-burst", "20",
    "--quota-lease-per-s", "20", "--quota-lease-burst", "100",
)
FLOOD_CONNECTIONS = 6
# Requests sent before the honest pulls start: past every burst above.
SPEND_FIRST = 600
# Bounds: the flood stops after this many requests per connection even if the
# pulls have not finished (they finish long before, on this machine).
FLOOD_MAX_REQUESTS = 20_000


@dataclass(frozen=True)
class World:
    cluster: Cluster
    nodes: list[NodeProcess]
    layers: list[Blob]
    twins: list[Blob]  # layers of the same sizes, pulled before the flood


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_image(tmp_path_factory.mktemp("flood"), seed="flood",
                       layer_sizes=LAYERS + LAYERS)


@pytest.fixture
def world(tmp_path: Path, registry: Registry, layout: Any) -> Iterator[World]:
    with open_cluster(tmp_path, registry, layout, REPO, tracker_args=QUOTAS) as c:
        half = len(LAYERS)
        yield World(c, [c.node("a"), c.node("b")], c.layers[:half], c.layers[half:])


class Flood:
    """The adversary: a member's certificate and every control request it can send."""

    def __init__(self, world: World, tmp_path: Path) -> None:
        self.world = world
        self.tls = client_ssl_context(world.cluster.identity("mallory"))
        self.statuses: Counter[int] = Counter()
        self.spent = trio.Event()
        # Valid torrents for blobs nobody has: they pass every check but the quota.
        self.forged = []
        for n in range(3):
            data = os.urandom(64 * 1024)
            path = tmp_path / f"forged-{n}"
            path.write_bytes(data)
            self.forged.append(make_metainfo(path, Digest.of(data), len(data),
                                             root=world.cluster.ca.cert_pem))

    def requests(self, n: int) -> tuple[str, str, wire.Message]:
        """The n-th request of a connection: publish, report, lease in turn."""
        fake = str(Digest.of(b"made up %d" % n))
        honest = self.world.layers[n % len(self.world.layers)].digest
        kind = n % 3
        if kind == 0:
            if n % 9 == 0:
                meta = self.forged[n % len(self.forged)]
                return "PUT", f"/v1/metainfo/{meta.digest}", wire.PublishMetainfo(
                    "mallory", meta.size, meta.data)
            junk = os.urandom(MiB if n % 12 == 3 else 4096)
            return "PUT", f"/v1/metainfo/{fake}", wire.PublishMetainfo("mallory", 4096, junk)
        if kind == 1:
            return "POST", f"/v1/metainfo/{honest}/bad", wire.ReportBad(
                "mallory", b"\0" * 32, "digest_mismatch", 4096, os.urandom(4096))
        return "POST", f"/v1/leases/{fake}", wire.LeaseRequest("mallory", 4096)

    async def run(self, done: trio.Event) -> None:
        async with trio.open_nursery() as nursery:
            for c in range(FLOOD_CONNECTIONS):
                nursery.start_soon(self._connection, c, done)

    async def _connection(self, c: int, done: trio.Event) -> None:
        async with httpx.AsyncClient(verify=self.tls) as http:
            for n in range(c, c + FLOOD_MAX_REQUESTS * FLOOD_CONNECTIONS, FLOOD_CONNECTIONS):
                if done.is_set():
                    return
                method, path, msg = self.requests(n)
                r = await http.request(
                    method, self.world.cluster.tracker.url + path, content=wire.encode(msg),
                    headers={"Content-Type": wire.CONTENT_TYPE}, timeout=30,
                )
                self.statuses[r.status_code] += 1
                if sum(self.statuses.values()) >= SPEND_FIRST:
                    self.spent.set()


async def _watch(cluster: Cluster, done: trio.Event) -> int:
    """Another member's requests during the flood; every one must succeed."""
    tls = ReloadingTLS(cluster.identity("watcher"), role="node")
    answered = 0
    async with open_tracker_client(cluster.tracker.url, node="watcher", tls=tls) as client:
        mine = Digest.of(b"the watcher's own blob")
        for _ in range(10_000):
            if done.is_set():
                break
            lease = await client.acquire_lease(mine, size=10)
            assert lease.status is wire.LeaseStatus.GRANTED and lease.holder == "watcher"
            assert await client.lookup_metainfo(mine) is None
            answered += 1
            await trio.sleep(0.05)
    return answered


async def test_a_member_flooding_publishes_reports_and_leases_costs_the_others_nothing(
    world: World, tmp_path: Path
) -> None:
    # The same pulls, no flood yet.
    without_s = await trio.to_thread.run_sync(pull_all, world.nodes, world.twins)
    flood = Flood(world, tmp_path)
    done = trio.Event()
    watched: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(flood.run, done)

        async def watch() -> None:
            watched.append(await _watch(world.cluster, done))

        nursery.start_soon(watch)
        # Let the adversary spend its bursts before the honest pulls start.
        with trio.fail_after(60):
            await flood.spent.wait()
        sent = sum(flood.statuses.values())
        pull_s = await trio.to_thread.run_sync(pull_all, world.nodes, world.layers)
        during = sum(flood.statuses.values()) - sent
        done.set()
    # What the run saw (pytest -s shows it; nothing below depends on time).
    print(f"flood: honest pulls {pull_s:.2f} s; {during} adversary requests meanwhile "
          f"({during / pull_s:.0f}/s); all answers {dict(flood.statuses)}")

    # The flood was real, and the tracker turned it away on every kind.
    assert flood.statuses[429] > 100, flood.statuses
    refused = {
        kind: world.cluster.tracker_metric("p2preg_tracker_quota_refusals_total", kind=kind)
        for kind in ("publish", "report", "lease")
    }
    assert all(refused.values()), (refused, flood.statuses)
    # The others were answered all along.
    assert watched and watched[0] > 0
    for node in world.nodes:
        assert node.metric("p2preg_fallbacks_total", reason="tracker") == 0
    # Each layer crossed the upstream link at most once more than without the flood.
    gets = {b.digest: world.cluster.upstream_copies(b) for b in world.layers + world.twins}
    for layer in world.layers:
        assert 1 <= gets[layer.digest] <= 2, gets
    upstream = sum(n.metric("p2preg_blob_fetches_total", source="upstream") for n in world.nodes)
    assert upstream <= 2 * len(world.layers) + sum(gets[t.digest] for t in world.twins)
    for process in (world.cluster.tracker.process, *(n.process for n in world.nodes)):
        assert process.returncode is None, process.name
    _record(world, without_s, pull_s, gets, during)


def _record(world: World, without_s: float, with_s: float, gets: dict[str, int],
            during: int) -> None:
    tally = Tally("adversary-flood", COMMAND)
    pulls = len(world.nodes) * (len(world.layers) + len(world.twins))
    tally.pulls_attempted = tally.pulls_completed = pulls
    tally.bytes_verified = len(world.nodes) * sum(b.size for b in world.layers * 2)
    tally.faults_injected["a flood of publishes, reports and leases"] += 1
    tally.attacks.append(Attack(
        "a flood of publishes, reports and leases", without_s, with_s,
        sum(gets[t.digest] for t in world.twins), sum(gets[b.digest] for b in world.layers),
        p2p_again_s=None,
        note=f"{len(world.nodes)} nodes pull {len(world.layers)} layers at once; "
             f"{during / with_s:.0f} adversary requests/s meanwhile",
    ))  # fmt: skip
    tally.write()
