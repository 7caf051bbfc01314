"""Chunk swarms: a layer spreads in chunks while its first copy comes from upstream.

A docker-registry behind a proxy that slows the layer's GET, a tracker, and
node processes cutting 1 MiB chunks (`chunk_bytes`, 4 MiB by default, so the
layers stay small). The first node to ask holds the upstream lease and files
each chunk's torrent as it arrives; the others join the chunk swarms while it
still fetches, assemble the chunks and serve the layer only once it hashes to
its digest. A client that gives up mid-layer wastes nothing: its retry comes
from the store. A lease holder that files a wrong chunk (a member gone bad:
the test's own libtorrent sessions seed chunk bytes it altered, under torrents
made from them) costs one upstream copy: the waiters' assembly fails, they
report it, which opens a dispute: the tracker sets the records aside and drops
the liar's lease, one honest node fetches the layer as VERIFY while the others
follow its chunks, and the chunk that differs convicts the publisher — also
when the verifier's own `chunk_bytes` is another: it cuts as the disputed
publisher did (the tracker's chunk list names that cut). A node
that lies in a report is judged the same way: the verifier's chunks match the
holder's, the reporter is quarantined and the holder keeps its records.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.images import PushedImage, build_image
from harness.node import NodeProcess, metric_value
from harness.registry import Registry
from harness.skopeo import push
from harness.tracker import TrackerProcess, open_tracker
from p2preg.core import wire
from p2preg.core.digest import Digest
from tests.fixtures.cluster import Background, Cluster, get_blob, wait_for
from tests.fixtures.faults import Action, FaultProxy, LiarSeeder

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MiB = 1 << 20
LAYER = 8 * MiB  # 9 chunks of 1 MiB (the layer's tar is a little longer)
SLOW_BYTES_S = MiB  # the layer's first copy takes about 8 s
CONFIG = "chunk_bytes = 1048576\nswarm_stall_s = 10\n"


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_image(tmp_path_factory.mktemp("chunks") / "layout", seed="chunks",
                       layer_sizes=(LAYER,))  # fmt: skip


@pytest.fixture
def proxy(registry: Registry) -> Iterator[FaultProxy]:
    with FaultProxy(registry.url) as p:
        yield p


@pytest.fixture
def tracker(tmp_path: Path) -> Iterator[TrackerProcess]:
    with open_tracker(tmp_path / "tracker") as t:
        yield t


@pytest.fixture
def cluster(
    request: pytest.FixtureRequest, tmp_path: Path, proxy: FaultProxy, tracker: TrackerProcess
) -> Iterator[Cluster]:
    config = getattr(request, "param", CONFIG)  # the nodes' config.toml
    with ExitStack() as stack:
        yield Cluster(stack, tmp_path, proxy.url, tracker.url, config=config)


def _tracker_metric(tracker: TrackerProcess, name: str, **labels: str) -> float:
    text = httpx.get(f"{tracker.url}/metrics", timeout=10, trust_env=False).text
    assert f"# HELP {name} " in text, name  # declared: a renamed metric is no silent 0
    return metric_value(text, name, **labels)


def _layer(image: PushedImage) -> Any:
    return image.manifests[0].layers[0]


def _url(node: NodeProcess, image: PushedImage, digest: str) -> str:
    return f"{node.url}/v2/{image.repository}/blobs/{digest}"


def _slow(proxy: FaultProxy, digest: str) -> None:
    proxy.script(lambda m, p: m == "GET" and p.endswith(digest),
                 Action("throttle", bytes_per_s=SLOW_BYTES_S))  # fmt: skip


def _upstream_copies(proxy: FaultProxy, digest: str) -> int:
    return sum(1 for e in proxy.log if e[1] == "GET" and e[2].endswith(digest))


def _check(r: httpx.Response, digest: str) -> None:
    assert r.status_code == 200, (r.status_code, r.text[:300])
    assert "sha256:" + hashlib.sha256(r.content).hexdigest() == digest


def _fetch(node: NodeProcess, image: PushedImage, digest: str) -> Background:
    return Background(lambda: get_blob(_url(node, image, digest))).start()


def test_waiters_join_chunk_swarms_while_the_first_copy_arrives(
    registry: Registry, proxy: FaultProxy, tracker: TrackerProcess, layout: Any,
    cluster: Cluster,
) -> None:
    image = push(layout, registry.host, "team/chunks")
    layer = _layer(image)
    _slow(proxy, layer.digest)
    holder, *waiters = [cluster.node(f"n{i}") for i in range(3)]
    first = _fetch(holder, image, layer.digest)
    wait_for(lambda: holder.metric("p2preg_chunks_published_total") >= 1, 30,
             "the holder's first chunk torrent")  # fmt: skip
    pulls = [_fetch(n, image, layer.digest) for n in waiters]
    # The spread runs alongside the first copy: a waiter holds chunk bytes while
    # the holder's client still waits for the verified layer (about 6 s more).
    wait_for(lambda: waiters[0].metric("p2preg_chunk_bytes_total") >= MiB, 30,
             "a waiter's first chunk")  # fmt: skip
    assert not first.done
    for pull in (first, *pulls):
        _check(pull.result(), layer.digest)

    assert _upstream_copies(proxy, layer.digest) == 1
    chunks = -(-layer.size // MiB)
    assert holder.metric("p2preg_chunks_published_total") == chunks
    assert _tracker_metric(tracker, "p2preg_tracker_chunks_published_total") == chunks
    polls = sum(_tracker_metric(tracker, "p2preg_tracker_chunk_polls_total", answer=a)
                for a in ("at_once", "news", "timed_out"))  # fmt: skip
    print(f"chunk list reads at the tracker: {polls:.0f}")
    # Long polls: a read per chunk filed at most (and each waiter's first, and one
    # answered as the list closes), where reading every 0.25 s for the ~8 s the
    # first copy takes would be over 30 per waiter.
    assert polls <= len(waiters) * (chunks + 3)
    for n in waiters:
        assert n.metric("p2preg_chunks_joined_total") == chunks
        assert n.metric("p2preg_chunk_bytes_total") == layer.size
        assert n.metric("p2preg_chunks_assembled_total", result="verified") == 1
        assert n.metric("p2preg_blob_fetches_total", source="peers") == 1
        # The chunk torrents' peers came with the list: the relay answered each chunk
        # torrent's join and completion itself, and forwarded only the whole layer's.
        local = n.metric("p2preg_relay_announces_total", result="local")
        forwarded = n.metric("p2preg_relay_announces_total", result="answered")
        print(f"chunk announces answered by the relay {local:.0f}, "
              f"announces forwarded {forwarded:.0f}")  # fmt: skip
        assert local >= 2 * chunks
        assert forwarded < chunks


def test_a_client_that_gives_up_mid_layer_wastes_nothing(
    registry: Registry, proxy: FaultProxy, layout: Any, cluster: Cluster
) -> None:
    image = push(layout, registry.host, "team/impatient")
    layer = _layer(image)
    _slow(proxy, layer.digest)
    holder, waiter = cluster.node("h"), cluster.node("w")
    first = _fetch(holder, image, layer.digest)
    wait_for(lambda: holder.metric("p2preg_chunks_published_total") >= 1, 30,
             "the holder's first chunk torrent")  # fmt: skip
    # As containerd at image_pull_progress_timeout: no byte yet, the client hangs up.
    impatient = httpx.Client(trust_env=False, timeout=httpx.Timeout(30, read=1.0))
    with impatient, pytest.raises(httpx.TimeoutException):
        impatient.get(_url(waiter, image, layer.digest))
    assert waiter.metric("p2preg_chunk_bytes_total") < layer.size  # it gave up mid-layer
    wait_for(lambda: waiter.metric("p2preg_blob_fetches_total", source="peers") == 1, 60,
             "the chunked fetch to finish without its client")  # fmt: skip
    _check(get_blob(_url(waiter, image, layer.digest)), layer.digest)
    # The retry came from the store: no second fetch, none joined.
    assert waiter.metric("p2preg_blob_fetches_total", source="peers") == 1
    assert waiter.metric("p2preg_blob_fetches_total", source="upstream") == 0
    assert waiter.metric("p2preg_blob_fetch_joins_total") == 0
    assert waiter.metric("p2preg_chunks_assembled_total", result="verified") == 1
    _check(first.result(), layer.digest)
    assert _upstream_copies(proxy, layer.digest) == 1


def _file_chunks(
    http: httpx.Client, tracker: TrackerProcess, workdir: Path, blob: bytes, digest: str
) -> list[LiarSeeder]:
    """As `evil`, the lease holder: file 1 MiB chunk torrents of `blob` with chunk 1
    altered (its torrent made from the altered bytes), and seed them."""
    seeders = []
    for i in range(-(-len(blob) // MiB)):
        part = blob[i * MiB:(i + 1) * MiB]
        if i == 1:
            part = hashlib.shake_256(b"not the layer").digest(len(part))
        seeder = LiarSeeder(workdir / f"c{i}", tracker.url, part, Digest.of(part), node="evil")
        msg = wire.PublishChunk("evil", len(blob), MiB, i, str(seeder.meta.digest),
                                seeder.meta.data)  # fmt: skip
        r = http.put(f"{tracker.url}/v1/chunks/{digest}", content=wire.encode(msg),
                     headers={"Content-Type": wire.CONTENT_TYPE})  # fmt: skip
        assert r.status_code == 201, r.content
        seeder.start()
        seeders.append(seeder)
    return seeders


def _renew_until_dropped(
    tracker: TrackerProcess, digest: str, lease_id: str, size: int, stop: threading.Event
) -> str:
    """Renew `evil`'s lease, claiming 512 KiB/s of progress (above the tracker's minimum
    rate), until the tracker refuses it; bounded."""
    with httpx.Client(trust_env=False, timeout=10) as http:
        for i in range(480):  # two minutes at most
            done = min(size - 1, (i + 1) * 128 * 1024)
            renew = wire.encode(wire.LeaseRenew(lease_id, done, size, "evil"))
            r = http.put(f"{tracker.url}/v1/leases/{digest}", content=renew,
                         headers={"Content-Type": wire.CONTENT_TYPE})  # fmt: skip
            if r.status_code >= 400:
                return "dropped"
            if stop.wait(0.25):
                return "stopped"
    return "still held"


# The honest nodes cut 2 MiB chunks: the verifier cuts as the disputed holder did.
@pytest.mark.parametrize("cluster", [CONFIG, CONFIG.replace("1048576", "2097152")],
                         indirect=True, ids=["same-cut", "verifier-configured-otherwise"])
def test_a_holder_that_files_a_wrong_chunk_costs_one_upstream_copy(
    registry: Registry, proxy: FaultProxy, tracker: TrackerProcess, layout: Any,
    cluster: Cluster, tmp_path: Path,
) -> None:
    image = push(layout, registry.host, "team/badchunk")
    layer = _layer(image)
    blob = layout.blob_path(layer.digest).read_bytes()
    http = httpx.Client(trust_env=False, timeout=30)
    seeders: list[LiarSeeder] = []
    stop = threading.Event()
    try:
        lease = http.post(f"{tracker.url}/v1/leases/{layer.digest}",
                          content=wire.encode(wire.LeaseRequest("evil", layer.size)))  # fmt: skip
        granted = wire.decode(wire.LeaseReply, lease.content)
        assert granted.status is wire.LeaseStatus.GRANTED and granted.lease_id is not None
        # As a holder does, however long the seeders take to start on a busy machine.
        lease_id = granted.lease_id
        renewing = Background(
            lambda: _renew_until_dropped(tracker, layer.digest, lease_id, layer.size, stop)
        ).start()
        seeders = _file_chunks(http, tracker, tmp_path / "evil", blob, layer.digest)
        for s in seeders:
            s.wait_seeding()
        _slow(proxy, layer.digest)
        nodes = [cluster.node(f"h{i}") for i in range(3)]
        pulls = [_fetch(n, image, layer.digest) for n in nodes]
        for pull in pulls:
            _check(pull.result(), layer.digest)

        # Caught when the whole layer was checked, reported once, and settled by
        # one honest upstream copy; nobody served the altered chunk's bytes.
        assert sum(n.metric("p2preg_chunks_assembled_total", result="mismatch")
                   for n in nodes) >= 1  # fmt: skip
        assert _tracker_metric(tracker, "p2preg_tracker_chunk_reports_total") == 1
        assert _tracker_metric(tracker, "p2preg_tracker_disputes_total",
                               outcome="overturned") == 1  # fmt: skip
        assert _upstream_copies(proxy, layer.digest) == 1
        assert sum(n.metric("p2preg_blob_fetches_total", source="upstream") for n in nodes) == 1
        # `evil` lost the lease, and may not file chunks of this layer again.
        msg = wire.PublishChunk("evil", layer.size, MiB, 0, str(seeders[0].meta.digest),
                                seeders[0].meta.data)  # fmt: skip
        again = http.put(f"{tracker.url}/v1/chunks/{layer.digest}", content=wire.encode(msg),
                         headers={"Content-Type": wire.CONTENT_TYPE})  # fmt: skip
        assert again.status_code == 403, again.content
        assert renewing.result() == "dropped"  # the report took the lease from `evil`
    finally:
        stop.set()
        for s in seeders:
            s.close()
        http.close()


def _lease(http: httpx.Client, tracker: TrackerProcess, node: str, digest: str,
           size: int) -> httpx.Response:  # fmt: skip
    return http.post(f"{tracker.url}/v1/leases/{digest}",
                     content=wire.encode(wire.LeaseRequest(node, size)))  # fmt: skip


def test_a_reporter_that_lies_about_honest_chunks_is_the_one_judged(
    registry: Registry, proxy: FaultProxy, tracker: TrackerProcess, layout: Any,
    cluster: Cluster,
) -> None:
    image = push(layout, registry.host, "team/liar")
    layer = _layer(image)
    _slow(proxy, layer.digest)
    holder = cluster.node("h0")
    _check(_fetch(holder, image, layer.digest).result(), layer.digest)
    http = httpx.Client(trust_env=False, timeout=30)
    with http:
        chunks_url = f"{tracker.url}/v1/chunks/{layer.digest}"
        before = wire.decode(wire.ChunkList, http.get(chunks_url).content)
        assert before.publisher == "h0" and len(before.digests) == -(-layer.size // MiB)
        lie = wire.ReportChunks("liar", "h0", "they do not hash to the blob (a lie)")
        r = http.post(f"{chunks_url}/bad", content=wire.encode(lie),
                      headers={"Content-Type": wire.CONTENT_TYPE})  # fmt: skip
        assert r.is_success, r.content
        # Disputed: nobody is answered SEEDED; the reporter, a side, waits.
        reply = wire.decode(wire.LeaseReply, _lease(http, tracker, "liar", layer.digest,
                                                    layer.size).content)  # fmt: skip
        assert reply.status is wire.LeaseStatus.WAIT
        nodes = [cluster.node(f"h{i}") for i in (1, 2)]
        pulls = [_fetch(n, image, layer.digest) for n in nodes]
        for pull in pulls:
            _check(pull.result(), layer.digest)

        # One verifier's upstream copy settled it: the report was the lie.
        assert _upstream_copies(proxy, layer.digest) == 2  # the holder's, the verifier's
        assert sum(n.metric("p2preg_blob_fetches_total", source="upstream") for n in nodes) == 1
        assert _tracker_metric(tracker, "p2preg_tracker_disputes_total", outcome="upheld") == 1
        assert _tracker_metric(tracker, "p2preg_tracker_disputes_total",
                               outcome="overturned") == 0  # fmt: skip
        # The holder keeps its records and is not barred; the reporter is quarantined.
        after = wire.decode(wire.ChunkList, http.get(chunks_url).content)
        assert (after.publisher, after.digests) == ("h0", before.digests)
        again = _lease(http, tracker, "h0", layer.digest, layer.size)
        assert again.status_code == 200, again.content
        assert wire.decode(wire.LeaseReply, again.content).status is wire.LeaseStatus.SEEDED
        # Quarantined: no upstream lease on any blob, no more reports.
        other = str(Digest.of(b"another blob"))
        assert _lease(http, tracker, "liar", other, 1).status_code == 403
        r = http.post(f"{chunks_url}/bad", content=wire.encode(lie),
                      headers={"Content-Type": wire.CONTENT_TYPE})  # fmt: skip
        assert r.status_code == 403, r.content
