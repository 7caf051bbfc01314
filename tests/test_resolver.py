"""Manifests and tags against the seed registry (p2preg/node/resolver.py), in-process.

A FakeUpstream serves the manifests; a real store on tmp_path keeps them; MockClock
moves the tag TTL. What is counted is how often the seed registry is asked.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pytest
import trio
import trio.testing

from p2preg.core.digest import Digest
from p2preg.core.reference import Reference
from p2preg.node.errors import (
    ManifestUnknown,
    RegistryError,
    UpstreamError,
    UpstreamServerError,
    UpstreamUnauthorized,
    UpstreamUnavailable,
)
from p2preg.node.manifest import OCI_MANIFEST
from p2preg.node.metrics import NodeMetrics
from p2preg.node.pullorder import Place, PullOrder
from p2preg.node.resolver import Manifest, ManifestHead, Resolver
from p2preg.node.store import BlobStore
from p2preg.node.tagmap import TagMap
from p2preg.node.tenancy import Tenancy
from p2preg.node.upstream import Fetched
from tests.fakes import FakeUpstream, blob

REPO = "team/app"
TTL_S = 30.0


def image_manifest(config: Digest, layers: list[Digest]) -> bytes:
    def desc(d: Digest) -> dict[str, object]:
        return {"mediaType": "application/octet-stream", "digest": str(d), "size": 1}

    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": desc(config),
           "layers": [desc(d) for d in layers]}
    return json.dumps(doc).encode()


@pytest.fixture
def parts(tmp_path: Path) -> tuple[Resolver, Tenancy, PullOrder, BlobStore]:
    store = BlobStore(tmp_path, 1 << 30)
    store.open()
    tenancy, order = Tenancy(), PullOrder()
    tags = TagMap(ttl_s=TTL_S, stale_s=0)
    resolver = Resolver(store, tenancy, NodeMetrics(), order, tags, clock=trio.current_time)
    return resolver, tenancy, order, store


async def test_a_resolved_manifest_proves_tenancy_and_notes_the_pull_order(
    parts: tuple[Resolver, Tenancy, PullOrder, BlobStore], autojump_clock: trio.testing.MockClock
) -> None:
    resolver, tenancy, order, store = parts
    (config, _), (layer, _) = blob(seed=1), blob(seed=2)
    body = image_manifest(config, [layer])
    upstream = FakeUpstream({})
    upstream.manifests[(REPO, "1.0")] = body
    found = await resolver.manifest(upstream, REPO, Reference.parse("1.0"), None)
    assert found.body == body and found.media_type == OCI_MANIFEST
    assert found.digest in store  # kept by digest, for good
    for d in (found.digest, config, layer):
        assert tenancy.holds("seed.test", REPO, d)
    assert not tenancy.holds("seed.test", "other/repo", layer)
    assert order.of(layer) == Place(found.digest, 1) and order.of(config) == Place(found.digest, 0)


async def test_a_tag_is_asked_again_only_after_its_ttl(
    parts: tuple[Resolver, Tenancy, PullOrder, BlobStore], autojump_clock: trio.testing.MockClock
) -> None:
    resolver = parts[0]
    (config, _), (layer, _) = blob(seed=1), blob(seed=2)
    upstream = FakeUpstream({})
    upstream.manifests[(REPO, "latest")] = image_manifest(config, [layer])
    found = await resolver.manifest(upstream, REPO, Reference.parse("latest"), None)
    # The tag is a HEAD; the body a GET by digest, never by tag.
    asked = [("HEAD", "latest"), ("GET", str(found.digest))]
    await trio.sleep(TTL_S - 1)
    await resolver.manifest(upstream, REPO, Reference.parse("latest"), None)
    assert upstream.manifest_requests == asked
    await trio.sleep(2)
    assert await resolver.manifest(upstream, REPO, Reference.parse("latest"), None) == found
    assert upstream.manifest_requests == [*asked, ("HEAD", "latest")]


async def test_a_clients_head_of_a_tag_costs_upstream_one_head_and_no_get(
    parts: tuple[Resolver, Tenancy, PullOrder, BlobStore], autojump_clock: trio.testing.MockClock
) -> None:
    resolver, _, _, store = parts
    body = image_manifest(blob(seed=1)[0], [blob(seed=2)[0]])
    digest = Digest.of(body, "sha256")
    upstream = FakeUpstream({})
    upstream.manifests[(REPO, "latest")] = body
    for _ in range(2):  # the second within the TTL: upstream is not asked again
        heard = await resolver.head(upstream, REPO, Reference.parse("latest"), None)
        assert heard == ManifestHead(digest, OCI_MANIFEST, len(body))
        assert upstream.manifest_requests == [("HEAD", "latest")] and digest not in store
    # The GET that follows within the TTL asks for the body by digest only.
    found = await resolver.manifest(upstream, REPO, Reference.parse("latest"), None)
    assert found.body == body and digest in store
    assert upstream.manifest_requests == [("HEAD", "latest"), ("GET", str(digest))]


async def test_a_tag_pointing_at_a_held_manifest_costs_upstream_a_head_only(
    parts: tuple[Resolver, Tenancy, PullOrder, BlobStore], autojump_clock: trio.testing.MockClock
) -> None:
    resolver, tenancy, _, _ = parts
    (config, _), (layer, _) = blob(seed=1), blob(seed=2)
    body = image_manifest(config, [layer])
    upstream = FakeUpstream({})
    upstream.manifests[(REPO, "1.0")] = body
    upstream.manifests[("team/other", "latest")] = body
    first = await resolver.manifest(upstream, REPO, Reference.parse("1.0"), None)
    assert not tenancy.holds("seed.test", "team/other", layer)
    again = await resolver.manifest(upstream, "team/other", Reference.parse("latest"), None)
    heard = await resolver.head(upstream, REPO, Reference.parse("1.0"), None)
    assert again == first == heard and upstream.manifest_gets == 1
    # Upstream said team/other's tag points there: it holds what the manifest references.
    assert tenancy.holds("seed.test", "team/other", layer)


async def test_a_head_without_a_digest_falls_back_to_a_get_and_is_counted(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    store = BlobStore(tmp_path, 1 << 30)
    store.open()
    metrics = NodeMetrics()
    resolver = Resolver(store, Tenancy(), metrics, PullOrder(), TagMap(ttl_s=TTL_S, stale_s=0),
                        clock=trio.current_time)
    body = image_manifest(blob(seed=1)[0], [blob(seed=2)[0]])
    upstream = FakeUpstream({})
    upstream.head_says_digest = False
    upstream.manifests[(REPO, "latest")] = body
    found = await resolver.head(upstream, REPO, Reference.parse("latest"), None)
    assert isinstance(found, Manifest) and found.body == body
    assert upstream.manifest_requests == [("HEAD", "latest"), ("GET", "latest")]
    fallbacks = metrics.registry.get_sample_value(
        "p2preg_manifest_head_fallbacks_total", {"registry": "seed.test"}
    )
    assert fallbacks == 1


async def test_a_body_that_does_not_match_the_digest_the_head_gave_is_refused(
    parts: tuple[Resolver, Tenancy, PullOrder, BlobStore], autojump_clock: trio.testing.MockClock
) -> None:
    resolver, tenancy, _, store = parts
    body = image_manifest(blob(seed=1)[0], [blob(seed=2)[0]])
    other = image_manifest(blob(seed=3)[0], [blob(seed=4)[0]])
    digest = Digest.of(body, "sha256")
    upstream = FakeUpstream({})
    upstream.manifests[(REPO, "latest")] = body
    upstream.manifests[(REPO, str(digest))] = other  # the GET by digest sends other bytes
    with pytest.raises(UpstreamError, match="does not match"):
        await resolver.manifest(upstream, REPO, Reference.parse("latest"), None)
    assert digest not in store and not tenancy.holds("seed.test", REPO, blob(seed=4)[0])
    assert ("GET", "latest") not in upstream.manifest_requests


async def test_a_manifest_by_digest_is_served_from_the_store_with_upstream_down(
    parts: tuple[Resolver, Tenancy, PullOrder, BlobStore], autojump_clock: trio.testing.MockClock
) -> None:
    resolver = parts[0]
    (config, _), (layer, _) = blob(seed=1), blob(seed=2)
    body = image_manifest(config, [layer])
    digest = Digest.of(body, "sha256")
    upstream = FakeUpstream({})
    upstream.manifests[(REPO, str(digest))] = body
    first = await resolver.manifest(upstream, REPO, Reference(digest=digest), None)
    upstream.down = True
    again = await resolver.manifest(upstream, REPO, Reference(digest=digest), None)
    assert again == first and upstream.manifest_gets == 1
    with pytest.raises(UpstreamUnavailable):  # a repository never proven to hold it
        await resolver.manifest(upstream, "other/repo", Reference(digest=digest), None)


async def test_a_manifest_the_seed_registry_lacks_is_unknown(
    parts: tuple[Resolver, Tenancy, PullOrder, BlobStore], autojump_clock: trio.testing.MockClock
) -> None:
    with pytest.raises(ManifestUnknown):
        await parts[0].manifest(FakeUpstream({}), REPO, Reference.parse("nope"), None)


STALE_S = 3600.0


class FailingUpstream(FakeUpstream):
    """A FakeUpstream whose manifest requests raise `error` while it is set."""

    def __init__(self) -> None:
        super().__init__({})
        self.error: RegistryError | None = None

    async def fetch(
        self, method: str, repository: str, path: str, *,
        headers: Mapping[str, str] | None = None, max_bytes: int,
    ) -> Fetched | None:
        if self.error is not None:
            self.manifest_requests.append((method, path.partition("/")[2]))
            raise self.error
        return await super().fetch(method, repository, path, headers=headers, max_bytes=max_bytes)


@pytest.fixture
def stale_parts(tmp_path: Path) -> tuple[Resolver, NodeMetrics]:
    store = BlobStore(tmp_path, 1 << 30)
    store.open()
    metrics = NodeMetrics()
    tags = TagMap(ttl_s=TTL_S, stale_s=STALE_S)
    resolver = Resolver(
        store, Tenancy(), metrics, PullOrder(), tags, clock=trio.current_time
    )
    return resolver, metrics


def _stale_answers(metrics: NodeMetrics) -> float:
    value = metrics.registry.get_sample_value(
        "p2preg_stale_tag_answers_total", {"registry": "seed.test"}
    )
    return value or 0.0


DOWN = [
    UpstreamUnavailable("seed registry seed.test unreachable: ConnectError"),
    UpstreamUnavailable("seed registry rate-limited team/app/manifests/latest"),
    UpstreamServerError("seed registry answered 500 for team/app/manifests/latest"),
]


@pytest.mark.parametrize("error", DOWN, ids=["unreachable", "429", "500"])
async def test_while_upstream_is_down_a_tag_answers_the_last_digest_seen(
    stale_parts: tuple[Resolver, NodeMetrics], autojump_clock: trio.testing.MockClock,
    error: RegistryError,
) -> None:
    resolver, metrics = stale_parts
    upstream = FailingUpstream()
    upstream.manifests[(REPO, "latest")] = image_manifest(blob(seed=1)[0], [blob(seed=2)[0]])
    first = await resolver.manifest(upstream, REPO, Reference.parse("latest"), None)
    await trio.sleep(TTL_S + 1)
    upstream.error = error
    again = await resolver.manifest(upstream, REPO, Reference.parse("latest"), None)
    # The tag's HEAD failed: that counts as the outage, as a GET's failure would.
    assert again == first and upstream.manifest_requests[-1] == ("HEAD", "latest")
    assert len(upstream.manifest_requests) == 3
    # Within a TTL of the failure upstream is not asked again; the answer is still stale.
    await resolver.manifest(upstream, REPO, Reference.parse("latest"), None)
    assert len(upstream.manifest_requests) == 3 and _stale_answers(metrics) == 2
    # Past serve_stale_s since upstream last gave it, the failure shows.
    await trio.sleep(STALE_S)
    with pytest.raises(type(error)):
        await resolver.manifest(upstream, REPO, Reference.parse("latest"), None)


async def test_a_404_or_a_refusal_from_a_reachable_upstream_is_never_answered_stale(
    stale_parts: tuple[Resolver, NodeMetrics], autojump_clock: trio.testing.MockClock
) -> None:
    resolver, metrics = stale_parts
    upstream = FailingUpstream()
    upstream.manifests[(REPO, "latest")] = image_manifest(blob(seed=1)[0], [blob(seed=2)[0]])
    await resolver.manifest(upstream, REPO, Reference.parse("latest"), None)
    await trio.sleep(TTL_S + 1)
    upstream.error = UpstreamUnauthorized("seed registry denied access to team/app")
    with pytest.raises(UpstreamUnauthorized):
        await resolver.manifest(upstream, REPO, Reference.parse("latest"), None)
    upstream.error = None
    del upstream.manifests[(REPO, "latest")]  # the tag was deleted upstream
    with pytest.raises(ManifestUnknown):
        await resolver.manifest(upstream, REPO, Reference.parse("latest"), None)
    # An outage after the 404 does not bring the deleted tag back.
    upstream.error = DOWN[0]
    with pytest.raises(UpstreamUnavailable):
        await resolver.manifest(upstream, REPO, Reference.parse("latest"), None)
    assert _stale_answers(metrics) == 0


async def test_once_upstream_is_back_a_tag_moved_during_the_outage_shows_within_the_ttl(
    stale_parts: tuple[Resolver, NodeMetrics], autojump_clock: trio.testing.MockClock
) -> None:
    resolver = stale_parts[0]
    upstream = FailingUpstream()
    upstream.manifests[(REPO, "latest")] = image_manifest(blob(seed=1)[0], [blob(seed=2)[0]])
    old = await resolver.manifest(upstream, REPO, Reference.parse("latest"), None)
    await trio.sleep(TTL_S + 1)
    upstream.error = DOWN[0]
    assert await resolver.manifest(upstream, REPO, Reference.parse("latest"), None) == old
    upstream.error = None
    upstream.manifests[(REPO, "latest")] = image_manifest(blob(seed=3)[0], [blob(seed=4)[0]])
    await trio.sleep(TTL_S)
    moved = await resolver.manifest(upstream, REPO, Reference.parse("latest"), None)
    assert moved.digest != old.digest
    assert moved.digest == Digest.of(upstream.manifests[(REPO, "latest")], "sha256")


async def test_a_clients_head_of_a_tag_is_answered_stale_while_upstream_is_down(
    stale_parts: tuple[Resolver, NodeMetrics], autojump_clock: trio.testing.MockClock
) -> None:
    resolver, metrics = stale_parts
    upstream = FailingUpstream()
    upstream.manifests[(REPO, "latest")] = image_manifest(blob(seed=1)[0], [blob(seed=2)[0]])
    first = await resolver.manifest(upstream, REPO, Reference.parse("latest"), None)
    await trio.sleep(TTL_S + 1)
    upstream.error = DOWN[0]
    assert await resolver.head(upstream, REPO, Reference.parse("latest"), None) == first
    assert upstream.manifest_requests[-1] == ("HEAD", "latest") and _stale_answers(metrics) == 1
    # A tag the node never held the body of has nothing to answer stale with.
    upstream.error = None
    upstream.manifests[(REPO, "next")] = image_manifest(blob(seed=3)[0], [blob(seed=4)[0]])
    await resolver.head(upstream, REPO, Reference.parse("next"), None)
    await trio.sleep(TTL_S + 1)
    upstream.error = DOWN[0]
    with pytest.raises(UpstreamUnavailable):
        await resolver.head(upstream, REPO, Reference.parse("next"), None)
