"""Issue 13 attack: a seeder that never sends.

"mallory", a member gone bad (a valid node certificate of the cluster CA),
runs a libtorrent SSL session that holds the blob, tells the tracker it
verified it (a lie the tracker cannot check), announces as a seeder, unchokes
whoever connects and takes their requests — but sends at 512 B/s, far less
than one 16 KiB block in the nodes' `peer_stall_report_s`. The honest
publisher has left, so the tracker's SEEDED points every downloader at
mallory. Real tracker, real nodes, real registry:

- two honest nodes pulling at once are stalled by it; each reports it, and the
  second report delists it (the tracker logs its identity);
- as soon as mallory is the only peer they have and they reported it
  (`peer_stall_report_s`, not `swarm_stall_s`), they ask the tracker again,
  which no longer sends them to the swarm: one takes the lease and fetches
  upstream, the other waits for it and gets the blob from it. Both pulls
  complete, verified, and the blob crosses the upstream link as often as
  without mallory — as the same two nodes show with a twin layer of the same
  size just before, for the side-by-side numbers;
- the next pull is not handed mallory: it gets the blob from the honest
  nodes through the swarm, and the tracker keeps answering everyone.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import libtorrent as lt
import pytest
import trio

from harness.images import build_image
from harness.procs import wait_until
from harness.registry import Registry
from p2preg.core.digest import Digest
from p2preg.core.metainfo import info_name
from p2preg.core.tls import ReloadingTLS
from p2preg.node.peertls import PeerTLS
from p2preg.node.swarmsettings import session_settings
from tests.adversary_cluster import Cluster, MiB, open_cluster, pull, pull_all
from tests.fixtures.reliability import Attack, Tally
from tracker.client import open_tracker_client

pytestmark = [pytest.mark.integration, pytest.mark.slow]

COMMAND = ".venv/bin/pytest -q tests/test_adversary_silent_seeder.py"
REPO = "team/silent-seeder"
# Far below a block per peer_stall_report_s, yet enough to get the handshake,
# bitfield and unchoke out (libtorrent rate-limits protocol bytes too).
MALLORY_BYTES_PER_S = 512
NODE_CONFIG = "swarm_stall_s = 10\npeer_stall_report_s = 2\n"
TRACKER_ARGS = ("--announce-interval-s", "10", "--min-announce-interval-s", "1",
                "--peer-ttl-s", "20", "--seeder-announce-interval-s", "10")


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_image(tmp_path_factory.mktemp("silentseeder"), seed="silentseeder",
                       layer_sizes=(3 * MiB, 3 * MiB))


class SilentSeeder:
    """An SSL libtorrent session holding the blob that uploads at a trickle."""

    def __init__(self, workdir: Path, tls_dir: Path, tracker_url: str, metainfo: bytes,
                 blob: Path, digest: Digest) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        os.link(blob, workdir / info_name(digest))
        settings = session_settings("127.0.0.1:0s")
        settings["num_want"] = 0  # it only waits to be dialled, at its listening port
        self.session = lt.session(settings)
        for cls in (self.session.local_peer_class_id, self.session.global_peer_class_id):
            pc = self.session.get_peer_class(cls)
            pc["upload_limit"] = MALLORY_BYTES_PER_S
            self.session.set_peer_class(cls, pc)
        atp = lt.add_torrent_params()
        atp.ti = lt.torrent_info(metainfo)
        atp.save_path = str(workdir)
        atp.flags |= lt.torrent_flags.seed_mode | lt.torrent_flags.disable_pex
        atp.flags &= ~(lt.torrent_flags.auto_managed | lt.torrent_flags.paused)
        self.handle = self.session.add_torrent(atp)
        PeerTLS(ReloadingTLS(tls_dir, role="node"), workdir).apply(self.handle)
        self.handle.add_tracker({"url": f"{tracker_url}/announce"})

    def uploaded(self) -> int:
        return int(self.handle.status().total_payload_upload)

    def close(self) -> None:
        self.session.remove_torrent(self.handle)
        del self.session


async def _confirm(cluster: Cluster, tls_dir: Path) -> bytes:
    """mallory reads the metainfo and claims it verified the blob; returns the metainfo."""
    tls = ReloadingTLS(tls_dir, role="node")
    digest = Digest.parse(cluster.layers[0].digest)
    async with open_tracker_client(cluster.tracker.url, node="mallory", tls=tls) as client:
        record = await client.lookup_metainfo(digest)
        assert record is not None
        info_hash = lt.torrent_info(record.metainfo).info_hashes().v2.to_bytes()
        await client.confirm_seed(digest, bytes(info_hash))
    return record.metainfo


def test_a_seeder_that_never_sends_is_reported_delisted_and_costs_no_copy(
    tmp_path: Path, registry: Registry, layout: Any
) -> None:
    tally = Tally("adversary-silent-seeder", COMMAND)
    with open_cluster(tmp_path, registry, layout, REPO, tracker_args=TRACKER_ARGS,
                      node_config=NODE_CONFIG) as cluster:
        layer, control = cluster.layers
        tracker = cluster.tracker
        mallory_tls = cluster.identity("mallory")
        with ExitStack() as first:
            a = cluster.node("a", stack=first)
            for blob in (layer, control):
                pull(a, blob)  # upstream copy 1 of each; a publishes and seeds
            metainfo = trio.run(_confirm, cluster, mallory_tls)
            mallory = SilentSeeder(tmp_path / "mallory", mallory_tls, tracker.url, metainfo,
                                   layout.blob_path(layer.digest), Digest.parse(layer.digest))
            cluster.stack.callback(mallory.close)
            wait_until(lambda: cluster.tracker_metric("p2preg_tracker_seeders") == 3,
                       timeout_s=30, what="mallory to count as a seeder", process=tracker.process)
        # a has left: the tracker sends every downloader of the layer to mallory.
        wait_until(lambda: cluster.tracker_metric("p2preg_tracker_seeders") == 1, timeout_s=60,
                   what="a to leave the swarm", process=tracker.process)
        b, c = cluster.node("b"), cluster.node("c")
        without_s = pull_all([b, c], [control])  # nobody seeds it: one fetches, feeds the other
        with_s = pull_all([b, c], [layer])
        for node in (b, c):
            assert node.metric("p2preg_peer_stalls_total") == 1
            assert node.metric("p2preg_fallbacks_total", reason="stalled") == 0
            assert node.metric("p2preg_fallbacks_total", reason="peers_stalled") == 0
        # One of them fetched the layer as the lease holder, one the twin.
        assert sum(n.metric("p2preg_blob_fetches_total", source="upstream")
                   for n in (b, c)) == 2  # fmt: skip
        assert cluster.tracker_metric("p2preg_tracker_stall_reports_total",
                                      outcome="delisted") == 1
        assert cluster.tracker_metric("p2preg_tracker_peers_cooling") == 1
        assert "'mallory' delisted" in tracker.process.log_path.read_text()
        assert mallory.uploaded() < 64 * 1024  # not a block per report period
        # As many copies as without mallory: a's, and the new holder's.
        assert cluster.upstream_copies(layer) == 2
        assert cluster.upstream_copies(control) == 2
        # The next pull is not sent to mallory: b and c serve it.
        d = cluster.node("d")
        pull(d, layer)
        assert d.metric("p2preg_blob_fetches_total", source="peers") == 1
        assert d.metric("p2preg_peer_stalls_total") == 0
        assert cluster.upstream_copies(layer) == 2
        assert cluster.tracker_answers()
        tally.pulls_attempted = tally.pulls_completed = 7
        tally.bytes_verified = 7 * layer.size
        tally.faults_injected["a seeder that never sends"] += 1
        tally.attacks.append(Attack(
            "a seeder that never sends (the only one)", without_s, with_s,
            cluster.upstream_copies(control) - 1, cluster.upstream_copies(layer) - 1,
            p2p_again_s=with_s,  # from then on b and c seed it; d got it from them
            note="after a's first copy; peer_stall_report_s = 2 here (10 by default)",
        ))  # fmt: skip
        tally.write()
