"""The blob read path behind the facade (p2preg/node/blobs.py): tenancy, one HEAD, one flight.

In-process over tests/fakes.py, without a tracker: what is counted here is
what the seed registry is asked.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from p2preg.node.errors import BlobUnknown
from tests.fakes import FakeUpstream, blob, open_pull_node

REPO = "team/app"


async def test_a_blob_the_tenancy_record_lacks_costs_one_upstream_head(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    digest, data = blob()
    upstream = FakeUpstream({(REPO, digest): data})
    async with open_pull_node(tmp_path / "n", None) as node:
        await node.blobs.ensure(upstream, REPO, digest)
        assert node.tenancy.holds(upstream.upstream.ns, REPO, digest)
    assert (upstream.heads, upstream.gets) == (1, 1)


async def test_a_proven_blob_not_yet_stored_costs_one_head_for_its_size(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    digest, data = blob()
    upstream = FakeUpstream({(REPO, digest): data})
    async with open_pull_node(tmp_path / "n", None) as node:
        node.tenancy.grant(upstream.upstream.ns, REPO, [digest])  # a manifest listed it
        await node.blobs.ensure(upstream, REPO, digest)
    assert (upstream.heads, upstream.gets) == (1, 1)


async def test_a_head_answers_upstream_size_without_downloading(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    digest, data = blob()
    upstream = FakeUpstream({(REPO, digest): data})
    async with open_pull_node(tmp_path / "n", None) as node:
        assert await node.blobs.size(upstream, REPO, digest) == len(data)
        assert digest not in node.store
        assert await node.blobs.size(upstream, REPO, digest) == len(data)
    assert (upstream.heads, upstream.gets) == (2, 0)  # proof, then the size again


async def test_a_head_without_a_length_fetches_the_blob_to_know_it_with_one_head(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    digest, data = blob()
    upstream = FakeUpstream({(REPO, digest): data})
    upstream.says_size = False
    async with open_pull_node(tmp_path / "n", None) as node:
        assert await node.blobs.size(upstream, REPO, digest) == len(data)
        assert digest in node.store
    assert (upstream.heads, upstream.gets) == (1, 1)


async def test_a_stored_blob_is_not_served_through_a_repository_that_lacks_it(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    digest, data = blob()
    upstream = FakeUpstream({(REPO, digest): data})
    async with open_pull_node(tmp_path / "n", None) as node:
        await node.blobs.ensure(upstream, REPO, digest)
        with pytest.raises(BlobUnknown):
            await node.blobs.ensure(upstream, "other/private", digest)
        with pytest.raises(BlobUnknown):
            await node.blobs.size(upstream, "other/private", digest)
        assert not node.tenancy.holds(upstream.upstream.ns, "other/private", digest)
    assert upstream.heads == 3


async def test_many_asking_at_once_share_one_fetch_that_outlives_a_caller_who_left(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    digest, data = blob(size=1_000_000)
    upstream = FakeUpstream({(REPO, digest): data}, delay_s=1.0)
    async with open_pull_node(tmp_path / "n", None) as node:
        node.tenancy.grant(upstream.upstream.ns, REPO, [digest])
        async with trio.open_nursery() as nursery:
            with trio.move_on_after(2):  # the first asker hangs up mid-fetch
                await node.blobs.ensure(upstream, REPO, digest)
            for _ in range(3):
                nursery.start_soon(node.blobs.ensure, upstream, REPO, digest)
        assert digest in node.store
        joins = node.metrics.registry.get_sample_value("p2preg_blob_fetch_joins_total")
        assert joins == 3
        assert [r.source for r in node.blobs.recent] == ["upstream"]
    assert upstream.gets == 1
