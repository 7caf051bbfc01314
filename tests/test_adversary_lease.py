"""A member that holds a lease hostage, with a valid certificate, against a real TLS cluster.

Real processes on loopback: docker-registry behind a `FaultProxy` (which passes
bytes through, or paces one blob to stand in for a thin upstream link — a real
TCP stream paced in userspace, the simplest shaping that needs no root or
namespace), the tracker under mutual TLS with short leases (TTL 3 s, rate
window 4 s, the default minimum rate of 256 KiB/s), two honest nodes `a` and
`b`, and the adversary: this test holding a node certificate `evil` from the
cluster CA and speaking the control API with the real `TrackerClient`.

- fake progress: `evil` takes the lease on a layer before anyone asks and
  renews it with one more byte every second. The tracker hands the fetch to an
  honest waiter once a window closes below the rate; both pulls complete with
  the right bytes, the layer crosses the upstream link once, and `evil` is told
  why its lease went. The same pulls of a layer nobody attacks run first, for
  the side-by-side time.
- lease hijack by naming the holder: while `a` fetches, `evil` asks for the
  lease naming `a` (refused, 403) and as itself (WAIT, no lease id), and cannot
  renew without being the holder; `a` is not disturbed.
- an honest holder on a shaped link (twice the minimum rate) is not replaced.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from harness.images import build_image
from harness.node import NodeProcess
from harness.procs import wait_until
from harness.registry import Registry
from p2preg.core import errors
from p2preg.core.digest import Digest
from p2preg.core.tls import ReloadingTLS
from p2preg.core.wire import LeaseStatus
from tests.adversary_cluster import Blob, Cluster, MiB, open_cluster, pull, pull_all
from tests.fixtures.cluster import Background
from tests.fixtures.faults import Action, FaultProxy
from tests.fixtures.reliability import Attack, Tally
from tracker.client import TrackerClient, open_tracker_client

pytestmark = [pytest.mark.integration, pytest.mark.slow]

COMMAND = ".venv/bin/pytest -q tests/test_adversary_lease.py"
LAYER = 3 * MiB  # above the node's p2p threshold: lease and swarm
WINDOW_S = 4.0
TRACKER_ARGS = ("--lease-ttl-s", "3", "--lease-rate-window-s", str(WINDOW_S))
# The shaped link: twice the tracker's default minimum rate of 256 KiB/s.
SHAPED_BYTES_S = 512 * 1024


@dataclass(frozen=True)
class World:
    cluster: Cluster
    a: NodeProcess
    b: NodeProcess
    proxy: FaultProxy


@pytest.fixture(scope="module")
def tally() -> Iterator[Tally]:
    t = Tally("adversary-lease", COMMAND)
    yield t
    t.write()


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_image(tmp_path_factory.mktemp("advlease"), seed="advlease",
                       layer_sizes=(LAYER, LAYER))


@pytest.fixture
def world(tmp_path: Path, registry: Registry, layout: Any) -> Iterator[World]:
    with open_cluster(tmp_path, registry, layout, "team/adversary-lease",
                      tracker_args=TRACKER_ARGS, proxy=True) as c:
        assert c.proxy is not None
        yield World(c, c.node("a"), c.node("b"), c.proxy)


def _adversary(world: World, name: str = "evil") -> ReloadingTLS:
    return ReloadingTLS(world.cluster.identity(name), role="node")


def _honest_nodes_never_gave_up(world: World) -> None:
    for node in (world.a, world.b):
        for reason in ("lease_wait", "lease_bound", "tracker"):
            assert node.metric("p2preg_fallbacks_total", reason=reason) == 0, (node, reason)
    assert world.cluster.tracker_answers()


async def _fake_progress(world: World, blob: Blob) -> tuple[float, str]:
    """`evil` holds `blob`'s lease, +1 byte a second, while a and b pull it."""
    digest = Digest.parse(blob.digest)
    told: list[str] = []
    async with open_tracker_client(world.cluster.tracker.url, node="evil",
                                   tls=_adversary(world)) as evil:
        held = await evil.acquire_lease(digest, size=blob.size)
        assert held.status is LeaseStatus.GRANTED and held.lease_id
        lease_id = held.lease_id

        async def renew_forever() -> None:
            for n in range(120):  # at once, acknowledging the grant as a node does
                await trio.sleep(1 if n else 0)
                try:
                    await evil.renew_lease(digest, lease_id, n, blob.size)
                except errors.LeaseLost as e:
                    told.append(str(e))
                    return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(renew_forever)
            took = await trio.to_thread.run_sync(pull_all, [world.a, world.b], [blob])
        await _evil_asks_again(evil, digest, blob)
    assert len(told) == 1
    return took, told[0]


async def _evil_asks_again(evil: TrackerClient, digest: Digest, blob: Blob) -> None:
    """Replaced, `evil` cannot take the fetch straight back: the swarm has it."""
    again = await evil.acquire_lease(digest, size=blob.size)
    assert again.status in (LeaseStatus.SEEDED, LeaseStatus.WAIT) and again.lease_id is None


def test_fake_progress_on_a_lease_costs_one_window_and_no_extra_upstream_copy(
    world: World, tally: Tally
) -> None:
    base, attacked = world.cluster.layers
    baseline_s = pull_all([world.a, world.b], [base])
    attacked_s, told = trio.run(_fake_progress, world, attacked)
    tally.pulls_attempted += 4
    tally.pulls_completed += 4
    tally.bytes_verified += 2 * (base.size + attacked.size)
    tally.faults_injected["fake lease progress (+1 byte/s)"] += 1
    assert "handed from 'evil'" in told and "below the minimum" in told
    assert world.cluster.tracker_metric("p2preg_tracker_lease_replacements_total") == 1
    # The adversary fetched nothing; the replacement fetched once; the other node
    # got it from the swarm.
    assert world.cluster.upstream_copies(attacked) == 1 and world.cluster.upstream_copies(base) == 1
    assert sum(n.metric("p2preg_blob_fetches_total", source="peers")
               for n in (world.a, world.b)) == 2
    _honest_nodes_never_gave_up(world)
    tally.attacks.append(Attack(
        "fake progress on a lease (+1 byte/s)", baseline_s, attacked_s,
        world.cluster.upstream_copies(base), world.cluster.upstream_copies(attacked),
        p2p_again_s=attacked_s,  # the honest fetch that replaced evil's fed the other node
        note=f"rate window {WINDOW_S:.0f} s (30 s by default)",
    ))  # fmt: skip


async def _hijack(world: World, blob: Blob) -> None:
    digest = Digest.parse(blob.digest)
    async with open_tracker_client(world.cluster.tracker.url, node="a",
                                   tls=_adversary(world)) as posing:
        # evil's certificate, a message naming the holder: refused outright.
        with pytest.raises(errors.Forbidden):
            await posing.acquire_lease(digest, size=blob.size)
    async with open_tracker_client(world.cluster.tracker.url, node="evil",
                                   tls=_adversary(world)) as evil:
        reply = await evil.acquire_lease(digest, size=blob.size)
        assert reply.status is LeaseStatus.WAIT and reply.holder == "a"
        assert reply.lease_id is None
        # Without the id, and without being the holder, no renewal takes.
        with pytest.raises(errors.LeaseLost):
            await evil.renew_lease(digest, "0" * 32, blob.size, blob.size)


def _paced_pair(
    world: World, blob: Blob, meanwhile: Callable[[], None] | None = None
) -> float:
    """a pulls `blob` over the paced link, `meanwhile` runs once a's fetch began,
    then b pulls it too; seconds until both have the verified bytes."""
    world.proxy.script(lambda m, p: m == "GET" and p.endswith(blob.digest),
                         Action("throttle", bytes_per_s=SHAPED_BYTES_S))
    start = time.monotonic()
    holder = Background(lambda: pull(world.a, blob)).start()
    wait_until(lambda: world.cluster.upstream_copies(blob) == 1, timeout_s=30,
               what="a to start its upstream fetch", interval_s=0.1)
    if meanwhile is not None:
        meanwhile()
    waiting = Background(lambda: pull(world.b, blob)).start()
    holder.result(120)
    waiting.result(120)
    return time.monotonic() - start


def test_naming_the_holder_gets_no_lease_id_and_the_holder_is_undisturbed(
    world: World, tally: Tally
) -> None:
    base, blob = world.cluster.layers
    baseline_s = _paced_pair(world, base)
    hijacked_s = _paced_pair(world, blob, lambda: trio.run(_hijack, world, blob))
    tally.pulls_attempted += 4
    tally.pulls_completed += 4
    tally.bytes_verified += 2 * (base.size + blob.size)
    tally.faults_injected["lease hijack naming the holder"] += 1
    assert world.cluster.upstream_copies(blob) == 1
    assert world.cluster.tracker_metric("p2preg_tracker_lease_replacements_total") == 0
    assert world.b.metric("p2preg_blob_fetches_total", source="peers") == 2
    _honest_nodes_never_gave_up(world)
    tally.attacks.append(Attack(
        "lease hijack: naming the holder, and asking as itself", baseline_s, hijacked_s,
        world.cluster.upstream_copies(base), world.cluster.upstream_copies(blob), p2p_again_s=None,
        note=f"upstream paced at {SHAPED_BYTES_S // 1024} KiB/s",
    ))  # fmt: skip


def test_an_honest_holder_on_a_shaped_link_is_not_replaced(
    world: World, tally: Tally
) -> None:
    _, blob = world.cluster.layers
    took = _paced_pair(world, blob)
    tally.pulls_attempted += 2
    tally.pulls_completed += 2
    tally.bytes_verified += 2 * blob.size
    # 3 MiB at 512 KiB/s is about 6 s against a 4 s window: the rate was judged
    # at least once while the fetch ran (recorded below, not asserted: no timing).
    assert world.cluster.tracker_metric("p2preg_tracker_lease_replacements_total") == 0
    assert world.cluster.upstream_copies(blob) == 1
    assert world.b.metric("p2preg_blob_fetches_total", source="peers") == 1
    _honest_nodes_never_gave_up(world)
    tally.extra["shaped_honest_holder"] = {"link_bytes_s": SHAPED_BYTES_S,
                                           "pull_s": round(took, 2), "replacements": 0}
