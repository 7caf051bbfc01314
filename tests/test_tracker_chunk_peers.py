"""A blob's chunk swarms get their peers from its chunk list, against a tracker process.

Every reader of the list that names its peer's port (`&port=`) is entered as
a peer of all the blob's chunk torrents, the holder by filing a chunk; each
answer names the others, holders first, never the reader itself. That stands
in for every chunk torrent's announces, which the node's relay then answers
itself (tests/test_chunk_swarms.py has the whole path). A reader that names no
port (an older node, which announces its chunk torrents) is told the peers
but not entered; while the holder named none (an older node too), the list
names no peers at all, and its readers announce as before. Stall reports
delist a chunk peer as they do a swarm's; a bad port is a clear error.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from harness.tracker import open_tracker
from p2preg.core import errors
from tests.chunk_helpers import SIZE, Cut, blob_data
from tracker.client import TrackerClient, open_tracker_client
from tracker.peers import compact_address

pytestmark = pytest.mark.integration

TOKEN = "chunk-peers-token"
HOLDER_PORT = 7001


def _at(port: int) -> bytes:
    return compact_address("127.0.0.1", port)


@asynccontextmanager
async def _clients(tmp_path: Path, *names: str) -> AsyncIterator[list[TrackerClient]]:
    """A tracker (token) and a client of it per node name."""
    with open_tracker(tmp_path / "tracker", token=TOKEN) as t:
        async with AsyncExitStack() as stack:
            yield [await stack.enter_async_context(open_tracker_client(t.url, node=n, token=TOKEN))
                   for n in names]  # fmt: skip


async def _peers(client: TrackerClient, cut: Cut, port: int = 0) -> list[bytes]:
    client.peer_port = port
    listing = await client.list_chunks(cut.blob)
    assert listing is not None and listing.peers is not None
    return listing.peers


async def test_readers_are_handed_each_other_and_the_holder_first(tmp_path: Path) -> None:
    cut = Cut.make(tmp_path / "chunks", blob_data())
    async with _clients(tmp_path, "holder", "a", "b", "old", "c") as (holder, a, b, old, c):
        await holder.acquire_lease(cut.blob, size=SIZE)
        await holder.publish_chunk(cut.blob, replace(cut.msg("holder", 0), port=HOLDER_PORT))
        assert await _peers(a, cut, 7002) == [_at(HOLDER_PORT)]
        got = await _peers(b, cut, 7003)
        assert got[0] == _at(HOLDER_PORT) and sorted(got) == sorted([_at(7001), _at(7002)])
        # Never the reader itself; each read names whoever is in by then.
        assert sorted(await _peers(a, cut, 7002)) == sorted([_at(7001), _at(7003)])
        # An older node names no port: told the peers, entered nowhere.
        assert sorted(await _peers(old, cut)) == sorted([_at(7001), _at(7002), _at(7003)])
        assert sorted(await _peers(c, cut, 7004)) == sorted([_at(p) for p in (7001, 7002, 7003)])
        # A holder's chunk filed without a port enters nobody: nothing changes.
        await holder.publish_chunk(cut.blob, cut.msg("holder", 1))
        assert sorted(await _peers(c, cut, 7004)) == sorted([_at(p) for p in (7001, 7002, 7003)])


async def test_a_chunk_peer_reported_by_two_identities_is_no_longer_handed_out(
    tmp_path: Path,
) -> None:
    cut = Cut.make(tmp_path / "chunks", blob_data())
    async with _clients(tmp_path, "holder", "slow", "b", "c") as (holder, slow, b, c):
        await holder.acquire_lease(cut.blob, size=SIZE)
        await holder.publish_chunk(cut.blob, replace(cut.msg("holder", 0), port=HOLDER_PORT))
        await _peers(slow, cut, 7002)
        await _peers(b, cut, 7003)
        assert _at(7002) in await _peers(c, cut, 7004)
        # Reported as a peer of the blob (whose chunk swarms the tracker keeps as one).
        await b.report_stall(cut.blob, _at(7002))
        assert _at(7002) in await _peers(c, cut, 7004)  # one identity delists nobody
        await c.report_stall(cut.blob, _at(7002))
        assert _at(7002) not in await _peers(c, cut, 7004)
        # Cooling off: its own reads do not bring it back.
        await _peers(slow, cut, 7002)
        assert sorted(await _peers(b, cut, 7003)) == sorted([_at(7001), _at(7004)])


async def test_a_holder_that_names_no_port_leaves_its_readers_to_announce(
    tmp_path: Path,
) -> None:
    cut = Cut.make(tmp_path / "chunks", blob_data())
    async with _clients(tmp_path, "holder", "a", "b") as (holder, a, b):
        await holder.acquire_lease(cut.blob, size=SIZE)
        await holder.publish_chunk(cut.blob, cut.msg("holder", 0))
        for reader, port in ((a, 7002), (b, 7003)):
            reader.peer_port = port
            listing = await reader.list_chunks(cut.blob)
            assert listing is not None and listing.digests == cut.digests[:1]
            assert listing.peers is None


async def test_a_port_out_of_range_is_a_clear_error(tmp_path: Path) -> None:
    cut = Cut.make(tmp_path / "chunks", blob_data())
    async with _clients(tmp_path, "holder", "a") as (holder, a):
        await holder.acquire_lease(cut.blob, size=SIZE)
        await holder.publish_chunk(cut.blob, cut.msg("holder", 0))
        with pytest.raises(errors.InvalidRequest, match="port must be 1 to 65535"):
            a.peer_port = 70000
            await a.list_chunks(cut.blob)
        with pytest.raises(errors.InvalidRequest, match="port must be 1 to 65535"):
            await holder.publish_chunk(cut.blob, replace(cut.msg("holder", 1), port=1 << 16))
