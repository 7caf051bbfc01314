"""The cluster's word during an outage (p2preg/node/clusterword.py), in-process.

Real resolvers, tenancy ledgers, stores and the tracker's real coordinator
(its tag book) behind the node's tag seam; FakeUpstream is the seed registry,
switched off for the outage. What is checked: a node reports a tag only when
it is news; while upstream is unreachable a node that never saw a tag
resolves it to the cluster's answer (counted, marked as the cluster's word
and never written down as upstream's); a 404 from a reachable registry, an
answer older than `serve_stale_s`, a tracker that fails and the switch turned
off each leave the node's own error. On the pull path over the fake swarm: a
blob the cluster's word granted comes from peers at the size its manifest
declares, never from upstream, and one no peer holds is a prompt 503.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trio.testing

from p2preg.core import errors as tracker_errors
from p2preg.core import wire
from p2preg.core.config import HostPort
from p2preg.core.digest import Digest
from p2preg.core.reference import Reference
from p2preg.node.cluster_manifests import ClusterManifests
from p2preg.node.clusterword import REPORT_EVERY_S, ClusterWord
from p2preg.node.errors import ManifestUnknown, UpstreamUnavailable
from p2preg.node.manifest import OCI_MANIFEST
from p2preg.node.metrics import NodeMetrics
from p2preg.node.pullorder import PullOrder
from p2preg.node.resolver import Resolver
from p2preg.node.store import BlobStore
from p2preg.node.tagmap import TagMap
from p2preg.node.tenancy import Tenancy
from tests.fakes import FakeTrackerServer, FakeUpstream, blob, open_pull_node
from tracker.config import TrackerConfig
from tracker.coordinator import Tracker
from tracker.state import MemoryStore

REPO, NS = "edge/app", "seed.test"
STALE_S = 3600.0


@pytest.fixture(autouse=True)
def threads_run_inline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run `trio.to_thread.run_sync` in the event loop here.

    Under the autojump clock a task waiting for a worker thread counts as
    idle, so virtual time jumps from deadline to deadline for as long as the
    thread takes in real time. A holder's renewals (every 0.83 s) ran about
    1,000 virtual seconds while its manifest's 50 ms write was on disk, and
    the report rule's ten minutes went by within one test step.
    """

    async def inline(fn: Callable[..., object], *args: object, **_: object) -> object:
        await trio.lowlevel.checkpoint()
        return fn(*args)

    monkeypatch.setattr(trio.to_thread, "run_sync", inline)


def make_tracker(tmp_path: Path) -> Tracker:
    """The tracker's coordinator, its wall clock trio's (MockClock moves the answers' age)."""
    config = TrackerConfig(listen=HostPort("127.0.0.1", 0), data_dir=tmp_path / "tracker")
    return Tracker(config, MemoryStore(), wall_clock=trio.current_time)


class TrackerTags:
    """The tracker's real coordinator behind the node's cluster seam, without HTTP;
    `tamper` makes the shelf's answers other bytes (a compromised tracker)."""

    def __init__(self, tracker: Tracker, node: str) -> None:
        self.tracker = tracker
        self.node = node
        self.down = False
        self.reports = 0
        self.queries = 0
        self.tamper = False

    async def report_tag(
        self, ns: str, repository: str, tag: str, digest: Digest, accept: str = ""
    ) -> None:
        self.reports += 1
        if self.down:
            raise tracker_errors.TrackerUnavailable("tracker http://t.invalid: ConnectError")
        msg = wire.TagSeen(self.node, ns, repository, tag, str(digest), accept)
        await self.tracker.tag_seen(msg, identity=self.node)

    async def query_tag(
        self, ns: str, repository: str, tag: str, accept: str = ""
    ) -> wire.TagAnswer:
        self.queries += 1
        if self.down:
            raise tracker_errors.TrackerUnavailable("tracker http://t.invalid: ConnectError")
        await trio.lowlevel.checkpoint()
        return self.tracker.tag_query(wire.TagQuery(self.node, ns, repository, tag, accept))

    async def put_manifest(
        self, digest: Digest, ns: str, repository: str, media_type: str, body: bytes
    ) -> None:
        msg = wire.PutManifest(self.node, ns, repository, media_type, body)
        await self.tracker.put_manifest(str(digest), msg)

    async def acquire_lease(
        self,
        digest: Digest,
        *,
        size: int | None = None,
        wait_s: float = 0.0,
        group: str | None = None,
        order: int = 0,
        manifest: bool = False,
    ) -> wire.LeaseReply:
        msg = wire.LeaseRequest(self.node, size, wait_s, group, order, manifest)
        return await self.tracker.acquire_lease(str(digest), msg, identity=self.node)

    async def renew_lease(
        self,
        digest: Digest,
        lease_id: str,
        bytes_done: int,
        size: int | None = None,
        *,
        timeout_s: float | None = None,
    ) -> wire.LeaseReply:
        msg = wire.LeaseRenew(lease_id, bytes_done, size, self.node)
        return await self.tracker.renew_lease(str(digest), msg, identity=self.node)

    async def release_lease(self, digest: Digest, lease_id: str) -> None:
        await self.tracker.release_lease(
            str(digest), wire.LeaseRelease(lease_id, self.node), identity=self.node
        )

    async def get_manifest(self, digest: Digest) -> wire.ManifestBody | None:
        await trio.lowlevel.checkpoint()
        try:
            found = self.tracker.get_manifest(str(digest))
        except tracker_errors.NotFound:
            return None
        if self.tamper:
            found = wire.ManifestBody(found.media_type, found.body + b" ", found.places)
        return found


def image(sizes: tuple[int, int] = (5, 7)) -> tuple[bytes, Digest, Digest]:
    (config, _), (layer, _) = blob(seed=1), blob(seed=2)

    def desc(d: Digest, size: int) -> dict[str, object]:
        return {"mediaType": "application/octet-stream", "digest": str(d), "size": size}

    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": desc(config, sizes[0]),
           "layers": [desc(layer, sizes[1])]}  # fmt: skip
    return json.dumps(doc).encode(), config, layer


@dataclass
class Node:
    resolver: Resolver
    tenancy: Tenancy
    store: BlobStore
    metrics: NodeMetrics
    word: ClusterWord
    tags: TrackerTags

    def taken(self, kind: str) -> float:
        sample = self.metrics.registry.get_sample_value(
            "p2preg_cluster_fallback_answers_total", {"kind": kind}
        )
        return sample or 0.0


@asynccontextmanager
async def node(
    tmp_path: Path, tracker: Tracker, name: str, *, enabled: bool = True
) -> AsyncIterator[Node]:
    store = BlobStore(tmp_path / name, 1 << 30)
    store.open()
    tenancy, metrics = Tenancy(), NodeMetrics()
    tags = TrackerTags(tracker, name)
    word = ClusterWord(tags, metrics, enabled=enabled, max_age_s=STALE_S, recheck_s=30.0,
                       clock=trio.current_time)  # fmt: skip
    resolver = Resolver(store, tenancy, metrics, PullOrder(), TagMap(ttl_s=30.0, stale_s=STALE_S),
                        clock=trio.current_time, word=word,
                        cluster=ClusterManifests(tags, metrics, 20.0))  # fmt: skip
    async with trio.open_nursery() as nursery:
        nursery.start_soon(word.report_forever)
        yield Node(resolver, tenancy, store, metrics, word, tags)
        nursery.cancel_scope.cancel()


async def test_a_tag_is_reported_when_it_moves_or_a_while_after(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    tracker = make_tracker(tmp_path)
    body, _, _ = image()
    upstream = FakeUpstream({})
    upstream.manifests[(REPO, "latest")] = body
    async with node(tmp_path, tracker, "a") as a:
        for _ in range(3):
            await a.resolver.manifest(upstream, REPO, Reference.parse("latest"), None)
            await trio.sleep(31)  # past the tag TTL: upstream is asked again
        assert a.tags.reports == 1
        answer = tracker.tag_query(wire.TagQuery("x", NS, REPO, "latest"))
        assert answer.digest == str(Digest.of(body)) and answer.reported_by == "a"
        moved, _, _ = image((9, 9))
        upstream.manifests[(REPO, "latest")] = moved
        await a.resolver.manifest(upstream, REPO, Reference.parse("latest"), None)
        await trio.sleep(0.1)
        assert a.tags.reports == 2  # moved: at once
        await trio.sleep(REPORT_EVERY_S)
        await a.resolver.manifest(upstream, REPO, Reference.parse("latest"), None)
        await trio.sleep(0.1)
        assert a.tags.reports == 3  # the same answer, confirmed once per REPORT_EVERY_S


async def test_during_an_outage_a_tag_never_seen_resolves_to_the_clusters_answer(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    tracker = make_tracker(tmp_path)
    body, config, layer = image()
    digest = Digest.of(body)
    upstream = FakeUpstream({})
    upstream.manifests[(REPO, "latest")] = body
    async with node(tmp_path, tracker, "a") as a, node(tmp_path, tracker, "b") as b:
        await a.resolver.manifest(upstream, REPO, Reference.parse("latest"), None)
        # b holds the manifest's bytes (another repository's pull), never this tag.
        upstream.manifests[("other/app", "v1")] = body
        await b.resolver.manifest(upstream, "other/app", Reference.parse("v1"), None)
        await trio.sleep(0.1)
        upstream.down = True
        with pytest.raises(UpstreamUnavailable):  # by digest: nobody vouched for this repository
            await b.resolver.manifest(upstream, "third/app", Reference(digest=digest), None)
        found = await b.resolver.manifest(upstream, REPO, Reference.parse("latest"), None)
        assert found.digest == digest and b.taken("tag") == 1
        # Now by digest too, as the tag's answer vouched; counted apart.
        again = await b.resolver.manifest(upstream, REPO, Reference(digest=digest), None)
        assert again == found and b.taken("manifest") == 1
        # The cluster's word is kept apart: not upstream's proof, never written down.
        assert not b.tenancy.holds(NS, REPO, digest)
        assert b.tenancy.on_cluster_word(NS, REPO, layer) == 7
        assert b.tenancy.on_cluster_word(NS, REPO, config) == 5
        assert all(key[1] != REPO for key in b.tenancy.take_unsaved())
        # Upstream back: within tag_ttl_s of its last failure the cluster's word still
        # answers, upstream not asked; after that upstream's own word proves the repository.
        upstream.down = False
        gets, heads = upstream.manifest_gets, upstream.manifest_heads
        await b.resolver.manifest(upstream, REPO, Reference(digest=digest), None)
        assert (upstream.manifest_gets, upstream.manifest_heads) == (gets, heads)
        assert b.taken("manifest") == 2
        await trio.sleep(31)
        # Upstream's HEAD by digest proves it; the body b holds needs no GET.
        await b.resolver.manifest(upstream, REPO, Reference(digest=digest), None)
        assert (upstream.manifest_gets, upstream.manifest_heads) == (gets, heads + 1)
        assert b.tenancy.holds(NS, REPO, digest) and b.taken("manifest") == 2


async def test_what_the_cluster_does_not_answer_for(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    tracker = make_tracker(tmp_path)
    body, _, _ = image()
    upstream = FakeUpstream({})
    upstream.manifests[(REPO, "latest")] = body
    upstream.manifests[("other/app", "v1")] = body
    async with (
        node(tmp_path, tracker, "a") as a,
        node(tmp_path, tracker, "b") as b,
        node(tmp_path, tracker, "off", enabled=False) as off,
    ):
        await a.resolver.manifest(upstream, REPO, Reference.parse("latest"), None)
        for n in (b, off):
            await n.resolver.manifest(upstream, "other/app", Reference.parse("v1"), None)
        await trio.sleep(0.1)
        # A 404 from a registry that answered stands: the cluster is not asked.
        del upstream.manifests[(REPO, "latest")]
        with pytest.raises(ManifestUnknown):
            await b.resolver.manifest(upstream, REPO, Reference.parse("latest"), None)
        assert b.tags.queries == 0
        upstream.down = True
        # Switched off: the node's own 503, and the tracker is not asked.
        with pytest.raises(UpstreamUnavailable, match="unreachable"):
            await off.resolver.manifest(upstream, REPO, Reference.parse("latest"), None)
        assert off.tags.queries == 0 and off.taken("tag") == 0
        # A tracker that fails is no answer.
        b.tags.down = True
        with pytest.raises(UpstreamUnavailable):
            await b.resolver.manifest(upstream, REPO, Reference.parse("latest"), None)
        b.tags.down = False
        # An answer older than serve_stale_s is not taken.
        await trio.sleep(STALE_S + 1)
        with pytest.raises(UpstreamUnavailable):
            await b.resolver.manifest(upstream, REPO, Reference.parse("latest"), None)
        assert b.taken("tag") == 0 and b.tags.queries == 2


async def test_a_blob_on_the_clusters_word_comes_from_peers_or_is_a_prompt_503(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    server = FakeTrackerServer()
    (held, data), (lost, lost_data) = blob(seed=3), blob(seed=4)
    upstream = FakeUpstream({(REPO, held): data, (REPO, lost): lost_data})
    tags = TrackerTags(make_tracker(tmp_path), "b")
    word = ClusterWord(tags, NodeMetrics(), enabled=True, max_age_s=STALE_S,
                       clock=trio.current_time)
    async with (
        open_pull_node(tmp_path / "a", server, name="a") as a,
        open_pull_node(tmp_path / "b", server, name="b", word=word) as b,
    ):
        await a.blobs.ensure(upstream, REPO, held)  # a fetched it and seeds it
        upstream.down = True
        gets = upstream.gets
        # b never saw either; the cluster's word (a manifest) granted both, with sizes.
        b.tenancy.grant_on_cluster_word(NS, REPO, {held: len(data), lost: len(lost_data)})
        assert await b.blobs.size(upstream, REPO, held) == len(data)
        heads = upstream.heads  # that one found upstream down: not asked again for a while
        await b.blobs.ensure(upstream, REPO, held)
        assert held in b.store and b.fetches("peers") == 1
        start = trio.current_time()
        with pytest.raises(UpstreamUnavailable, match="no peer holds"):
            await b.blobs.ensure(upstream, REPO, lost)
        assert trio.current_time() - start < 60  # answered, not left hanging
        assert upstream.gets == gets  # never an upstream fetch while it is down
        assert upstream.heads == heads
        # Not granted on anyone's word: the node's own 503.
        with pytest.raises(UpstreamUnavailable, match="seed registry"):
            await b.blobs.ensure(upstream, "other/app", held)
        word.enabled = False
        b.tenancy.grant_on_cluster_word(NS, "third/app", {held: len(data)})
        with pytest.raises(UpstreamUnavailable, match="seed registry"):
            await b.blobs.size(upstream, "third/app", held)


async def test_with_the_fallback_on_a_small_blob_from_upstream_is_seeded_for_the_site(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    server = FakeTrackerServer()
    small, data = blob(size=500, seed=5)  # below the pull path's p2p_min_bytes (1024)
    other, other_data = blob(size=600, seed=6)
    upstream = FakeUpstream({(REPO, small): data, (REPO, other): other_data})
    word = ClusterWord(TrackerTags(make_tracker(tmp_path), "b"), NodeMetrics(), enabled=True,
                       max_age_s=STALE_S, clock=trio.current_time)  # fmt: skip
    async with (
        open_pull_node(tmp_path / "a", server, name="a", share_small=True) as a,
        open_pull_node(tmp_path / "off", server, name="off") as off,
        open_pull_node(tmp_path / "b", server, name="b", word=word) as b,
    ):
        await a.blobs.ensure(upstream, REPO, small)
        await off.blobs.ensure(upstream, REPO, other)
        await trio.sleep(1)
        assert a.fetches("upstream") == 1 and "a" in server.seeders.get(small, {})
        assert not server.seeders.get(other)  # without it, small blobs stay out of the swarm
        upstream.down = True
        b.tenancy.grant_on_cluster_word(NS, REPO, {small: len(data), other: len(other_data)})
        await b.blobs.ensure(upstream, REPO, small)
        assert b.fetches("peers") == 1
        with pytest.raises(UpstreamUnavailable, match="no peer holds"):
            await b.blobs.ensure(upstream, REPO, other)


async def test_a_node_with_nothing_takes_the_manifest_from_the_shelf_for_its_place_only(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    tracker = make_tracker(tmp_path)
    body, _, layer = image()
    digest = Digest.of(body)
    upstream = FakeUpstream({})
    upstream.manifests[(REPO, "latest")] = body
    async with node(tmp_path, tracker, "a") as a, node(tmp_path, tracker, "b") as b:
        await a.resolver.manifest(upstream, REPO, Reference.parse("latest"), None)
        await trio.sleep(0.1)  # a put it on the shelf, with its place
        assert tracker.get_manifest(str(digest)).places == [f"{NS}/{REPO}"]
        upstream.down = True
        with pytest.raises(UpstreamUnavailable):  # the shelf names edge/app only
            await b.resolver.manifest(upstream, "other/app", Reference(digest=digest), None)
        b.tags.tamper = True
        with pytest.raises(UpstreamUnavailable):  # other bytes than the digest's
            await b.resolver.manifest(upstream, REPO, Reference(digest=digest), None)
        assert digest not in b.store and b.taken("manifest") == 0
        b.tags.tamper = False
        found = await b.resolver.manifest(upstream, REPO, Reference(digest=digest), None)
        assert found.body == body and digest in b.store and b.taken("manifest") == 1
        assert b.tenancy.on_cluster_word(NS, REPO, layer) == 7
        assert not b.tenancy.holds(NS, REPO, digest)
    async with node(tmp_path, tracker, "c") as c:  # by tag, on a third node that holds nothing
        found = await c.resolver.manifest(upstream, REPO, Reference.parse("latest"), None)
        assert found.digest == digest and c.taken("tag") == 1


async def test_an_evicted_blob_upstream_proved_comes_back_from_peers_during_an_outage(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    server = FakeTrackerServer()
    (held, data), (lost, _) = blob(seed=7), blob(seed=8)
    upstream = FakeUpstream({(REPO, held): data, (REPO, lost): b"x" * 4096})
    word = ClusterWord(TrackerTags(make_tracker(tmp_path), "b"), NodeMetrics(), enabled=False,
                       max_age_s=STALE_S, clock=trio.current_time)  # fmt: skip
    async with (
        open_pull_node(tmp_path / "a", server, name="a") as a,
        open_pull_node(tmp_path / "b", server, name="b", word=word) as b,
    ):
        await a.blobs.ensure(upstream, REPO, held)
        b.tenancy.grant(NS, REPO, [held, lost])  # upstream proved it; b's copy was evicted
        upstream.down = True
        gets = upstream.gets
        assert await b.blobs.size(upstream, REPO, held) == len(data)
        assert held in b.store and b.fetches("peers") == 1
        with pytest.raises(UpstreamUnavailable, match="no peer holds"):
            await b.blobs.ensure(upstream, REPO, lost)
        assert upstream.gets == gets
