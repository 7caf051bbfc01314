"""Issue 13 attack: 1,000 fake seeders from one identity.

A member gone bad ("mallory": a valid node certificate of the cluster CA)
announces the blob 1,000 times with `left=0`, each with another peer id and
port, straight at the mTLS tracker. Real tracker, real nodes, real registry:

- the tracker holds one entry for mallory (each announce replaced the last),
  never counts it as a seeder (it neither published nor confirmed the torrent),
  and keeps answering everyone;
- an honest node pulls from the honest seeder meanwhile, bytes verified;
- once the honest seeders have left, a pull is not told SEEDED because of
  mallory (which would send it into a dead swarm until `swarm_stall_s`): it
  gets the upstream lease at once, and the blob crosses the upstream link
  exactly as often as without the attack (twice: the first pull, and the pull
  after every honest seeder left).

The same nodes pull a twin layer of the same size that mallory leaves alone
right before each attacked pull: the side-by-side numbers.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes

import libtorrent as lt
import pytest
import trio

from harness.images import build_image
from harness.procs import wait_until
from harness.registry import Registry
from harness.tlscerts import https_client
from p2preg.core.digest import Digest
from p2preg.core.tls import ReloadingTLS
from tests.adversary_cluster import Cluster, MiB, open_cluster, pull
from tests.fixtures.reliability import Attack, Tally
from tracker.client import open_tracker_client

pytestmark = [pytest.mark.integration, pytest.mark.slow]

COMMAND = ".venv/bin/pytest -q tests/test_adversary_seeders.py"
REPO = "team/fake-seeders"
FAKES = 1000
# Short peer lifetimes, seeders' too, so that honest seeders that left are gone within the test.
TRACKER_ARGS = ("--announce-interval-s", "10", "--min-announce-interval-s", "1",
                "--peer-ttl-s", "20", "--seeder-announce-interval-s", "10")


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_image(tmp_path_factory.mktemp("fakeseeders"), seed="fakeseeders",
                       layer_sizes=(3 * MiB, 3 * MiB))


async def _swarm_key(cluster: Cluster, tls_dir: Path) -> bytes:
    """The blob's info-hash as announced, read as any member may read it."""
    tls = ReloadingTLS(tls_dir, role="node")
    async with open_tracker_client(cluster.tracker.url, node="mallory", tls=tls) as client:
        record = await client.lookup_metainfo(Digest.parse(cluster.layers[0].digest))
    assert record is not None
    return bytes(lt.torrent_info(record.metainfo).info_hashes().v2.to_bytes()[:20])


async def _announce(cluster: Cluster, tls_dir: Path, ih: bytes, count: int) -> list[Any]:
    """`count` left=0 announces, each a new peer id and port: the answers, decoded."""
    answers = []
    async with https_client(tls_dir, headers={"Connection": "close"}, timeout=30) as http:
        for i in range(count):
            peer_id = quote_from_bytes(i.to_bytes(20, "big"))
            query = (
                f"info_hash={quote_from_bytes(ih)}&peer_id={peer_id}"
                f"&port={20000 + i}&uploaded=0&downloaded=0&left=0&compact=1&event=started"
            )
            r = await http.get(f"{cluster.tracker.url}/announce?{query}")
            assert r.status_code == 200
            answers.append(lt.bdecode(r.content))
    return answers


def test_a_thousand_fake_seeders_hold_one_entry_and_win_no_seeded(
    tmp_path: Path, registry: Registry, layout: Any
) -> None:
    tally = Tally("adversary-fake-seeders", COMMAND)
    with open_cluster(tmp_path, registry, layout, REPO, tracker_args=TRACKER_ARGS) as cluster:
        layer, control = cluster.layers
        mallory = cluster.identity("mallory")
        with ExitStack() as honest:
            a = cluster.node("a", stack=honest)
            for blob in (layer, control):
                pull(a, blob)  # upstream copy 1 of each; a publishes and seeds
            ih = trio.run(_swarm_key, cluster, mallory)
            answers = trio.run(_announce, cluster, mallory, ih, FAKES)
            assert all(b"failure reason" not in answer for answer in answers)
            # One entry for mallory beside a's two; only a counts as a seeder.
            assert cluster.tracker_metric("p2preg_tracker_peers") == 3
            assert cluster.tracker_metric("p2preg_tracker_seeders") == 2
            assert answers[-1][b"complete"] == 1
            assert cluster.tracker_metric("p2preg_tracker_peers_replaced_total") == FAKES - 1
            assert cluster.tracker_metric("p2preg_tracker_unconfirmed_seeds_total") == FAKES
            # An honest pull meanwhile: from a, through the swarm, verified.
            b = cluster.node("b", stack=honest)
            without_s, with_s = pull(b, control), pull(b, layer)
            assert b.metric("p2preg_blob_fetches_total", source="peers") == 2
        # Every honest seeder has left; mallory's claim stays a claim.
        wait_until(lambda: cluster.tracker_metric("p2preg_tracker_peers") == 0, timeout_s=60,
                   what="the honest seeders to leave the swarm", process=cluster.tracker.process)
        (again,) = trio.run(_announce, cluster, mallory, ih, 1)
        assert again[b"complete"] == 0
        assert cluster.tracker_metric("p2preg_tracker_peers") == 1
        c = cluster.node("c")
        without_s += pull(c, control)
        with_s += pull(c, layer)
        # c got the lease at once: no stalled swarm download, no fallback.
        assert c.metric("p2preg_blob_fetches_total", source="upstream") == 2
        assert sum(c.metric("p2preg_fallbacks_total", reason=r)
                   for r in ("stalled", "tracker", "lease_wait")) == 0
        assert cluster.tracker_metric("p2preg_tracker_lease_grants_total") == 4
        assert cluster.upstream_copies(layer) == 2  # the same as without mallory
        assert cluster.upstream_copies(control) == 2
        assert cluster.tracker_answers()
        assert trio.run(_announce, cluster, mallory, ih, 1)[0][b"complete"] == 1  # c seeds
        tally.pulls_attempted = tally.pulls_completed = 6
        tally.bytes_verified = 6 * layer.size
        tally.faults_injected[f"{FAKES} fake seeders from one identity"] += 1
        tally.attacks.append(Attack(
            f"{FAKES} fake seeders from one identity", without_s, with_s,
            cluster.upstream_copies(control), cluster.upstream_copies(layer), p2p_again_s=None,
            note="b pulls with an honest seeder beside mallory, c after every honest one left",
        ))  # fmt: skip
        tally.write()
