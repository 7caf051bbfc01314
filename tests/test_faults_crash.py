"""Processes that die: a node killed mid-download, a dead lease holder, a dead tracker.

Real processes on loopback: a tracker, nodes, the real docker-registry behind a
`FaultProxy` that slows one blob down so there is a "mid-download" to kill in;
for a download from peers, a rate-limited libtorrent seeder (`SlowSeeder`)
does the same. What must hold: after `kill -9` and a restart the store is
consistent and seeds again without downloading, and the interrupted blob comes
through, from peers when peers have it; a dead lease holder delays the others
by about one lease, a slow but live one is not overtaken; pulls complete while
the tracker is dead and after it comes back.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.images import Blob, PushedImage, build_image
from harness.procs import free_port
from harness.registry import Registry
from harness.skopeo import push
from harness.tracker import open_tracker
from p2preg.core.digest import Digest
from p2preg.core.metainfo import info_name, piece_size_for
from tests.fixtures.cluster import (
    Background,
    Cluster,
    blob_files_verified,
    get_blob,
    kill9,
    swarm_counts,
    wait_for,
)
from tests.fixtures.faults import Action, FaultProxy, SlowSeeder
from tests.fixtures.reliability import Tally
from tracker.metainfo import make_metainfo

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MiB = 1024 * 1024
COMMAND = ".venv/bin/pytest -q tests/test_faults_crash.py"
# How fast the proxy lets the slowed blob through: 4 MiB take about 8 s.
SLOW_BYTES_PER_S = 512 * 1024


@pytest.fixture(scope="module")
def tally() -> Iterator[Tally]:
    t = Tally("faults-crash", COMMAND)
    yield t
    t.write()


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Any:
    # A config, a 1.5 MiB layer (above the swarm threshold) and a 4 MiB one to slow down.
    return build_image(
        tmp_path_factory.mktemp("crash") / "layout",
        seed="crash",
        layer_sizes=(3 * MiB // 2, 4 * MiB),
    )


@pytest.fixture
def proxy(registry: Registry) -> Iterator[FaultProxy]:
    with FaultProxy(registry.url) as p:
        yield p


def _layers(image: PushedImage) -> tuple[Blob, Blob]:
    small, big = sorted(image.manifests[0].layers, key=lambda b: b.size)
    return small, big


def _slow_once(proxy: FaultProxy, digest: str) -> None:
    proxy.script(
        lambda m, p: m == "GET" and p.endswith(digest),
        Action("throttle", bytes_per_s=SLOW_BYTES_PER_S),
    )


def _blob_url(node_url: str, image: PushedImage, digest: str) -> str:
    return f"{node_url}/v2/{image.repository}/blobs/{digest}"


def _fetch_ok(node_url: str, image: PushedImage, blob: Blob) -> int:
    r = get_blob(_blob_url(node_url, image, blob.digest))
    assert r.status_code == 200, (r.status_code, r.text[:300])
    assert "sha256:" + hashlib.sha256(r.content).hexdigest() == blob.digest
    return len(r.content)


def _tmp_bytes(data_dir: Path) -> int:
    tmp = data_dir / "tmp"
    return sum(p.stat().st_size for p in tmp.iterdir()) if tmp.is_dir() else 0


def test_kill_9_mid_download_leaves_a_consistent_store_that_seeds_again(
    registry: Registry,
    proxy: FaultProxy,
    layout: Any,
    tmp_path: Path,
    tally: Tally,
) -> None:
    image = push(layout, registry.host, "crash/kill9")
    small, big = _layers(image)
    with open_tracker(tmp_path / "tracker") as tracker, ExitStack() as stack:
        cluster = Cluster(stack, tmp_path, proxy.url, tracker.url)
        node = cluster.node("n1")
        tally.pulls_attempted += 1
        verified = _fetch_ok(node.url, image, image.manifests[0].config)
        verified += _fetch_ok(node.url, image, small)
        _slow_once(proxy, big.digest)
        pending = Background(lambda: get_blob(_blob_url(node.url, image, big.digest))).start()
        wait_for(lambda: _tmp_bytes(node.data_dir) >= 256 * 1024, 30, "the download to start")
        kill9(node.process)
        tally.faults_injected["kill -9 node mid-download"] += 1
        with pytest.raises(httpx.TransportError):
            pending.result(30)  # the client sees the connection drop, never a wrong blob
        assert _tmp_bytes(node.data_dir) > 0  # the half-written blob is there, but only in tmp/
        stored = blob_files_verified(node.data_dir)
        assert big.digest not in stored and small.digest in stored
        registry.settle()
        sent_small = registry.blob_bytes_sent().get(small.digest, 0)

        again = cluster.node("n1")  # same data directory
        assert _tmp_bytes(again.data_dir) == 0
        assert not any((again.data_dir / "swarm").glob("*" + big.digest.split(":")[1]))
        assert blob_files_verified(again.data_dir) == stored
        # The small layer, and the config: below the swarm threshold it is fetched
        # from upstream, and seeded for an outage (cluster_fallback, on by default).
        assert again.metric("p2preg_blobs_seeded") == 2
        # Seeded again, not downloaded again: a new node gets it from n1's restarted session.
        other = cluster.node("n2")
        _fetch_ok(other.url, image, small)
        assert other.metric("p2preg_peer_blob_bytes_total") >= small.size
        registry.settle()
        assert registry.blob_bytes_sent().get(small.digest, 0) == sent_small
        # And the interrupted blob comes through once asked again.
        verified += _fetch_ok(again.url, image, big)
        tally.pulls_completed += 1
        tally.bytes_verified += verified + small.size
        assert blob_files_verified(again.data_dir).keys() >= {small.digest, big.digest}


# The peer-kill layer: larger than the 32 MiB a node's libtorrent queues in
# memory for the disk (`max_queued_disk_bytes`, p2preg/node/swarm.py), so that a
# partial file is on disk when the node dies; a smaller download never reaches
# the disk before it completes. Its only seeder sends 4 MiB/s until the file
# is there, then 64 KiB/s, so the kill lands mid-way whatever the machine's speed.
PEER_KILL_MIB = 48
PEER_BYTES_PER_S = 4 * MiB
PEER_CRAWL_BYTES_PER_S = 64 * 1024


def _get_heard(url: str, heard: list[int]) -> bytes:
    """GET `url`; the status is appended to `heard` as soon as a status line arrives."""
    with httpx.Client(trust_env=False, timeout=120) as http, http.stream("GET", url) as r:
        heard.append(r.status_code)
        return r.read()


def _pieces_held(path: Path, blob: bytes) -> int:
    """How many of `blob`'s pieces `path` holds byte for byte (0 if it is missing)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0
    piece = piece_size_for(len(blob))
    return sum(
        1
        for i in range(0, len(blob), piece)
        if data[i : i + piece] == blob[i : i + piece]
    )


def test_kill_9_mid_download_from_peers_leaves_nothing_unverified_and_completes_after_restart(
    registry: Registry, tmp_path: Path, tally: Tally
) -> None:
    layout: Any = build_image(
        tmp_path / "layout", seed="peer-kill", layer_sizes=(PEER_KILL_MIB * MiB,)
    )
    image = push(layout, registry.host, "crash/peer-kill9")
    (blob,) = image.manifests[0].layers
    digest = Digest.parse(blob.digest)
    blob_bytes = layout.blob_path(blob.digest).read_bytes()
    pieces = -(-blob.size // piece_size_for(blob.size))
    with open_tracker(tmp_path / "tracker") as tracker, ExitStack() as stack:
        cluster = Cluster(stack, tmp_path, registry.url, tracker.url)
        # a fetches the layer from the seed registry (the one copy the cluster
        # gets), seeds it and files its metainfo.
        a = cluster.node("a")
        verified = _fetch_ok(a.url, image, blob)
        wait_for(lambda: swarm_counts(tracker.url, blob.digest) == (1, 0), 30, "a to seed")
        # A slow seeder of the same bytes under the same metainfo joins; then a
        # stops (gracefully: it announces `stopped`), so the slow one is the
        # only source of the layer.
        meta = make_metainfo(layout.blob_path(blob.digest), digest, blob.size)
        slow = SlowSeeder(
            tmp_path / "slow", tracker.url, layout.blob_path(blob.digest), meta, PEER_BYTES_PER_S
        )
        stack.callback(slow.close)
        slow.wait_seeding()
        wait_for(lambda: swarm_counts(tracker.url, blob.digest) == (2, 0), 30, "the slow seeder")
        a.process.stop()
        wait_for(lambda: swarm_counts(tracker.url, blob.digest) == (1, 0), 30, "a to leave")
        registry.settle()
        sent = registry.blob_bytes_sent().get(blob.digest, 0)
        assert blob.size <= sent <= 1.05 * blob.size

        b = cluster.node("b")
        tally.pulls_attempted += 1
        heard: list[int] = []
        url = _blob_url(b.url, image, blob.digest)
        pending = Background(lambda: _get_heard(url, heard)).start()
        partial = b.data_dir / "swarm" / info_name(digest)

        def mid_way() -> bool:
            # Every look while b downloads: nothing under the digest, nothing in tmp/.
            assert blob.digest not in blob_files_verified(b.data_dir)
            assert _tmp_bytes(b.data_dir) == 0
            return _pieces_held(partial, blob_bytes) >= 4

        wait_for(mid_way, 60, "b to write 4 pieces of the layer from the slow seeder")
        slow.set_rate(PEER_CRAWL_BYTES_PER_S)
        kill9(b.process)
        tally.faults_injected["kill -9 node mid-download from peers"] += 1
        uploaded = slow.uploaded()
        with pytest.raises(httpx.TransportError):
            pending.result(30)
        # The client never got as much as a status line: nothing unverified was served.
        assert heard == []
        assert uploaded < blob.size
        # The download was cut mid-way: some pieces, not all, sit in swarm/ (an
        # unverified libtorrent file), none under the digest, nothing in tmp/.
        held = _pieces_held(partial, blob_bytes)
        tally.extra["peer_kill_pieces_held"] = f"{held}/{pieces}"
        assert 4 <= held < pieces, (held, pieces)
        stored = blob_files_verified(b.data_dir)
        assert blob.digest not in stored
        assert _tmp_bytes(b.data_dir) == 0

        again = cluster.node("b")  # same data directory
        assert not partial.exists()  # the unverified file is gone, not resumed from
        assert _tmp_bytes(again.data_dir) == 0
        assert blob_files_verified(again.data_dir) == stored
        assert again.metric("p2preg_blobs_seeded") == 0
        # a comes back and seeds the layer from its store, the slow seeder leaves;
        # the interrupted blob now comes through from a, verified, and the seed
        # registry sends nothing more.
        cluster.node("a")
        wait_for(lambda: swarm_counts(tracker.url, blob.digest)[0] == 2, 30, "a to seed again")
        slow.close()
        wait_for(lambda: swarm_counts(tracker.url, blob.digest)[0] == 1, 30, "the slow one to go")
        verified += _fetch_ok(again.url, image, blob)
        tally.pulls_completed += 1
        tally.bytes_verified += verified
        assert again.metric("p2preg_blob_fetches_total", source="peers") == 1
        assert again.metric("p2preg_peer_blob_bytes_total") >= blob.size
        assert again.metric("p2preg_upstream_blob_bytes_total") == 0
        assert blob_files_verified(again.data_dir).keys() == {blob.digest}
        registry.settle()
        assert registry.blob_bytes_sent().get(blob.digest, 0) == sent


def _has_metainfo(tracker_url: str, digest: str) -> bool:
    try:
        r = httpx.get(f"{tracker_url}/v1/metainfo/{digest}", timeout=5, trust_env=False)
    except httpx.TransportError:
        return False
    return r.status_code == 200


def test_pulls_complete_while_the_tracker_is_dead_and_after_it_restarts(
    registry: Registry,
    proxy: FaultProxy,
    layout: Any,
    tmp_path: Path,
    tally: Tally,
) -> None:
    image = push(layout, registry.host, "crash/tracker")
    small, big = _layers(image)
    port = free_port()
    with ExitStack() as stack:
        tracker = stack.enter_context(open_tracker(tmp_path / "tracker", port=port))
        cluster = Cluster(stack, tmp_path, proxy.url, tracker.url)
        a, b = cluster.node("a"), cluster.node("b")
        tally.pulls_attempted += 1
        verified = _fetch_ok(a.url, image, image.manifests[0].config)
        verified += _fetch_ok(a.url, image, small)
        # a holds the lease on the big layer and fetches it slowly when the tracker dies.
        _slow_once(proxy, big.digest)
        pending = Background(lambda: _fetch_ok(a.url, image, big)).start()
        wait_for(lambda: _tmp_bytes(a.data_dir) >= 256 * 1024, 30, "a's download to start")
        kill9(tracker.process)
        tally.faults_injected["kill -9 tracker mid-pull"] += 1
        verified += pending.result(120)  # the in-flight pull completes
        tally.pulls_completed += 1
        tally.bytes_verified += verified
        # A new pull while the tracker is dead: straight from upstream.
        tally.pulls_attempted += 1
        tally.bytes_verified += sum(_fetch_ok(b.url, image, blob) for blob in image.blobs)
        tally.pulls_completed += 1
        assert b.metric("p2preg_fallbacks_total", reason="tracker") == 2

        # The tracker comes back on the same address and data directory.
        stack.enter_context(open_tracker(tmp_path / "tracker", port=port, name="tracker-2"))
        tally.faults_injected["tracker restart"] += 1
        # Metainfo filed before the crash survived it; metainfo of the blob fetched
        # while the tracker was dead is filed again by the nodes that seed it.
        assert _has_metainfo(tracker.url, small.digest)
        wait_for(
            lambda: _has_metainfo(tracker.url, big.digest),
            60,
            "a seeder to file the big layer's metainfo again",
        )
        c = cluster.node("c")
        registry.settle()
        sent = registry.blob_bytes_sent()
        tally.pulls_attempted += 1
        tally.bytes_verified += sum(_fetch_ok(c.url, image, blob) for blob in image.blobs)
        tally.pulls_completed += 1
        registry.settle()
        after = registry.blob_bytes_sent()
        from_peers = c.metric("p2preg_peer_blob_bytes_total")
        tally.extra["tracker_restart_c_peer_bytes"] = from_peers
        tally.extra["tracker_restart_c_upstream_layer_bytes"] = sum(
            after.get(x.digest, 0) - sent.get(x.digest, 0) for x in (small, big)
        )
        # The swarm re-formed: c got the big layer from a seeder, not from upstream.
        assert after.get(big.digest, 0) == sent.get(big.digest, 0)
        assert from_peers >= big.size


LEASE_TTL_S = 3


def _asked(proxy: FaultProxy, digest: str, n: int) -> bool:
    return sum(1 for e in proxy.log if e[1] == "HEAD" and e[2].endswith(digest)) >= n


def test_a_dead_lease_holder_is_overtaken_once_it_goes_silent(
    registry: Registry,
    proxy: FaultProxy,
    layout: Any,
    tmp_path: Path,
    tally: Tally,
) -> None:
    image = push(layout, registry.host, "crash/lease-dead")
    _, big = _layers(image)
    with ExitStack() as stack:
        tracker = stack.enter_context(
            open_tracker(tmp_path / "tracker", args=("--lease-ttl-s", str(LEASE_TTL_S)))
        )
        cluster = Cluster(stack, tmp_path, proxy.url, tracker.url)
        a, b = cluster.node("a"), cluster.node("b")
        _slow_once(proxy, big.digest)
        Background(lambda: get_blob(_blob_url(a.url, image, big.digest))).start()
        wait_for(lambda: _tmp_bytes(a.data_dir) >= 256 * 1024, 30, "a's download to start")
        tally.pulls_attempted += 1
        waiting = Background(lambda: _fetch_ok(b.url, image, big)).start()
        wait_for(lambda: _asked(proxy, big.digest, 2), 30, "b to ask for the blob")
        kill9(a.process)
        tally.faults_injected["kill -9 lease holder"] += 1
        tally.bytes_verified += waiting.result(120)
        tally.pulls_completed += 1
        # b took the lease over and fetched the blob itself; it did not give up waiting.
        assert b.metric("p2preg_fallbacks_total", reason="lease_wait") == 0
        assert b.metric("p2preg_upstream_blob_bytes_total") >= big.size
        gets = [e for e in proxy.log if e[1] == "GET" and e[2].endswith(big.digest)]
        assert [e[3] for e in gets] == ["throttle", "pass"]
        tally.extra["dead_holder_takeover_s"] = round(gets[1][0] - gets[0][0], 1)


def test_a_slow_but_live_lease_holder_is_not_overtaken(
    registry: Registry,
    proxy: FaultProxy,
    layout: Any,
    tmp_path: Path,
    tally: Tally,
) -> None:
    image = push(layout, registry.host, "crash/lease-slow")
    _, big = _layers(image)
    with ExitStack() as stack:
        tracker = stack.enter_context(
            open_tracker(tmp_path / "tracker", args=("--lease-ttl-s", str(LEASE_TTL_S)))
        )
        cluster = Cluster(stack, tmp_path, proxy.url, tracker.url)
        a, b = cluster.node("a"), cluster.node("b")
        # About 8 s of fetching against a 3 s lease: only renewals keep it.
        _slow_once(proxy, big.digest)
        tally.pulls_attempted += 2
        holder = Background(lambda: _fetch_ok(a.url, image, big)).start()
        wait_for(lambda: _tmp_bytes(a.data_dir) >= 256 * 1024, 30, "a's download to start")
        waiting = Background(lambda: _fetch_ok(b.url, image, big)).start()
        tally.faults_injected["slow lease holder"] += 1
        tally.bytes_verified += holder.result(120) + waiting.result(120)
        tally.pulls_completed += 2
        gets = [e for e in proxy.log if e[1] == "GET" and e[2].endswith(big.digest)]
        assert [e[3] for e in gets] == ["throttle"], gets  # one upstream fetch in the cluster
        assert b.metric("p2preg_peer_blob_bytes_total") >= big.size


def test_a_seeder_killed_without_a_word_is_reported_and_its_downloaders_share_one_copy(
    registry: Registry,
    proxy: FaultProxy,
    layout: Any,
    tmp_path: Path,
    tally: Tally,
) -> None:
    """The only seeder dies without `stopped`: the tracker keeps handing it out (a
    seeder's announce is good for half an hour). Its downloaders cannot connect,
    report it once nobody served them for `peer_stall_report_s`, and ask again:
    one fetches upstream as the lease holder, the other gets the blob from it."""
    image = push(layout, registry.host, "crash/vanished")
    small, big = _layers(image)
    with ExitStack() as stack:
        tracker = stack.enter_context(open_tracker(tmp_path / "tracker"))
        # A long swarm_stall_s: the downloaders must not just time out into upstream.
        cluster = Cluster(stack, tmp_path, proxy.url, tracker.url,
                          config="peer_stall_report_s = 2\nswarm_stall_s = 120\n")  # fmt: skip
        a, b, c = cluster.node("a"), cluster.node("b"), cluster.node("c")
        tally.bytes_verified += _fetch_ok(a.url, image, small) + _fetch_ok(a.url, image, big)
        wait_for(lambda: swarm_counts(tracker.url, small.digest) == (1, 0), 30, "a to seed")
        # b and c have reached a peer lately (a node that never reached one does not
        # report others unreachable: its own network may be what is broken).
        tally.bytes_verified += _fetch_ok(b.url, image, big) + _fetch_ok(c.url, image, big)
        kill9(a.process)
        tally.faults_injected["kill -9 of the only seeder"] += 1
        pulls = [Background(lambda n=n: _fetch_ok(n.url, image, small)).start()  # type: ignore[misc]
                 for n in (b, c)]  # fmt: skip
        tally.bytes_verified += sum(p.result(150) for p in pulls)
        tally.pulls_attempted += 6
        tally.pulls_completed += 6
        for node in (b, c):
            assert node.metric("p2preg_peer_stalls_total") == 1  # a, unreachable
            assert node.metric("p2preg_fallbacks_total", reason="stalled") == 0
        assert sorted(n.metric("p2preg_blob_fetches_total", source=s)
                      for n in (b, c) for s in ("upstream", "peers")) == [0, 1, 1, 2]  # fmt: skip
        gets = [e for e in proxy.log if e[1] == "GET" and e[2].endswith(small.digest)]
        assert len(gets) == 2  # a's copy and the new holder's; without reports, three
