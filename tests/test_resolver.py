"""Manifests and tags against the seed registry (p2preg/node/resolver.py), in-process.

A FakeUpstream serves the manifests; a real store on tmp_path keeps them; MockClock
moves the tag TTL. What is counted is how often the seed registry is asked.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio
import trio.testing

from p2preg.core.digest import Digest
from p2preg.core.reference import Reference
from p2preg.node.errors import ManifestUnknown, UpstreamUnavailable
from p2preg.node.manifest import OCI_MANIFEST
from p2preg.node.metrics import NodeMetrics
from p2preg.node.pullorder import Place, PullOrder
from p2preg.node.resolver import Resolver
from p2preg.node.store import BlobStore
from p2preg.node.tenancy import Tenancy
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
    return Resolver(store, tenancy, NodeMetrics(), order, tag_ttl_s=TTL_S), tenancy, order, store


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
    await resolver.manifest(upstream, REPO, Reference.parse("latest"), None)
    await trio.sleep(TTL_S - 1)
    await resolver.manifest(upstream, REPO, Reference.parse("latest"), None)
    assert upstream.manifest_gets == 1
    await trio.sleep(2)
    await resolver.manifest(upstream, REPO, Reference.parse("latest"), None)
    assert upstream.manifest_gets == 2


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
