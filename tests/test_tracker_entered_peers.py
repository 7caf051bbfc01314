"""Control calls that name the node's peer port enter it in the swarm, against a tracker process.

A node's libtorrent announces a torrent when it starts and when it completes;
the control calls around them already tell the tracker as much. So a lease
request, a seed confirmation and a published torrent carry the node's port
(`TrackerClient.peer_port`): a published torrent the tracker counts enters its
holder as a seeder (`MetainfoRecord.seeding`), a SEEDED answer enters the asker
as a downloader and names its peers, seeders first, as its `started` announce
would, and a confirmation makes it a seeder, whether it came alone or with the
node's next lease request. What libtorrent says later still
counts: its `stopped` (with a peer id the control calls never knew) drops the
peer. An older node (no port) gets none of it and announces.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from urllib.parse import quote_from_bytes

import httpx
import pytest
import trio

from harness.node import metric_value
from harness.tracker import TrackerProcess, open_tracker
from p2preg.core import errors, wire
from p2preg.core.digest import Digest
from p2preg.core.metainfo import Metainfo
from tracker.client import TrackerClient, open_tracker_client
from tracker.metainfo import make_metainfo
from tracker.peers import compact_address

pytestmark = pytest.mark.integration
# The tracker's defaults: seeder_announce_interval_s 1800 s, jittered by ±10 %.
SEEDER_S = (1620, 1980)


def _at(port: int) -> bytes:
    return compact_address("127.0.0.1", port)


@asynccontextmanager
async def _cluster(
    tmp_path: Path, *names: str
) -> AsyncIterator[tuple[TrackerProcess, list[TrackerClient]]]:
    """A token-less tracker, and a client per node name, each with its own peer port
    (7001, 7002, …); `old` names none."""
    with open_tracker(tmp_path / "tracker") as t:
        async with AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(open_tracker_client(t.url, node=n))
                       for n in names]  # fmt: skip
            for port, c in enumerate(clients, 7001):
                c.peer_port = 0 if c.node == "old" else port
            yield t, clients


def _blob(tmp_path: Path, name: str = "blob") -> Metainfo:
    path = tmp_path / name
    path.write_bytes(f"entered {name}".encode() * 10_000)
    return make_metainfo(path, Digest.of(path.read_bytes()), path.stat().st_size)


async def _filed(holder: TrackerClient, meta: Metainfo, *downloaders: TrackerClient) -> None:
    """`holder` fetched `meta`'s blob and filed its torrent; the `downloaders` asked
    for it since (SEEDED: entered as downloaders)."""
    granted = await holder.acquire_lease(meta.digest, size=meta.size)
    assert granted.lease_id is not None
    await holder.publish_metainfo(meta.digest, meta.size, meta.data)
    await holder.release_lease(meta.digest, granted.lease_id)
    for node in downloaders:
        await _seeded(node, meta)


async def _seeded(client: TrackerClient, meta: Metainfo) -> wire.LeaseReply:
    reply = await client.acquire_lease(meta.digest, size=meta.size)
    assert reply.status is wire.LeaseStatus.SEEDED, reply
    return reply


def _entered(t: TrackerProcess, by: str) -> float:  # (a local read, in a test)
    text = httpx.get(f"{t.url}/metrics", timeout=10, trust_env=False).text
    assert "# HELP p2preg_tracker_peers_entered_total " in text
    return metric_value(text, "p2preg_tracker_peers_entered_total", by=by)


async def test_control_calls_enter_the_node_where_its_announces_would(tmp_path: Path) -> None:
    meta = _blob(tmp_path)
    async with _cluster(tmp_path, "holder", "b", "c", "old", "d", "e") as (t, nodes):
        holder, b, c, old, d, e = nodes
        granted = await holder.acquire_lease(meta.digest, size=meta.size)
        assert granted.status is wire.LeaseStatus.GRANTED and granted.lease_id is not None
        record = await holder.publish_metainfo(meta.digest, meta.size, meta.data)
        assert record.seeding  # the holder seeds: nothing left for its `started` to say
        await holder.release_lease(meta.digest, granted.lease_id)

        joined = await _seeded(b, meta)
        assert joined.peers == [_at(7001)]
        # Its start is answered with a downloader's interval; its completion, which
        # its confirmation will carry, with a seeder's.
        assert joined.announce_interval_s == 60
        assert SEEDER_S[0] <= joined.seeder_interval_s <= SEEDER_S[1]
        # `b` is in as a downloader: handed out after the seeders.
        assert (await _seeded(c, meta)).peers == [_at(7001), _at(7002)]
        # An older node names no port: not entered, told to announce.
        assert (await _seeded(old, meta)).peers is None

        await b.confirm_seed(meta.digest, meta.info_hash_v2)  # b verified it: a seeder
        got = await _seeded(d, meta)
        assert got.peers is not None and sorted(got.peers[:2]) == [_at(7001), _at(7002)]
        assert got.peers[2:] == [_at(7003)]  # c, still downloading
        # e verified the same bytes elsewhere (chunks) and publishes: a seeder, told
        # the downloaders to dial, as its `started` announce would have been.
        again_published = await e.publish_metainfo(meta.digest, meta.size, meta.data)
        assert again_published.seeding and again_published.peers is not None
        assert sorted(again_published.peers) == [_at(7003), _at(7005)]  # c and d
        # ...and the counts its eviction weighs (holder, b, e seed; c, d download).
        assert (again_published.seeders, again_published.leechers) == (3, 2)
        assert (_entered(t, "publish"), _entered(t, "lease"), _entered(t, "confirm")) == (
            2, 3, 1)  # fmt: skip

        # libtorrent's own `stopped` (a peer id no control call knew) drops b.
        q = (f"info_hash={quote_from_bytes(meta.info_hash_v2[:20])}&peer_id={'B' * 20}"
             f"&port=7002&uploaded=0&downloaded=0&left=0&event=stopped&node=b")  # fmt: skip
        async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
            r = await http.get(f"{t.url}/announce?{q}")
        assert r.status_code == 200 and b"failure" not in r.content, r.content
        again = await _seeded(d, meta)
        assert again.peers is not None and _at(7002) not in again.peers


async def test_a_publisher_that_names_no_port_is_not_entered(tmp_path: Path) -> None:
    meta = _blob(tmp_path)
    async with _cluster(tmp_path, "old") as (t, (old,)):
        granted = await old.acquire_lease(meta.digest, size=meta.size)
        assert granted.status is wire.LeaseStatus.GRANTED
        record = await old.publish_metainfo(meta.digest, meta.size, meta.data)
        assert not record.seeding and record.peers is None  # it announces
        assert _entered(t, "publish") == 0


def _riding(t: TrackerProcess) -> float:  # (a local read, in a test)
    text = httpx.get(f"{t.url}/metrics", timeout=10, trust_env=False).text
    assert "# HELP p2preg_tracker_riding_confirms_total " in text
    return metric_value(text, "p2preg_tracker_riding_confirms_total")


async def test_a_seed_confirmation_rides_the_next_lease_request(tmp_path: Path) -> None:
    meta, nxt = _blob(tmp_path), _blob(tmp_path, "next")
    async with _cluster(tmp_path, "holder", "b", "c") as (t, (holder, b, c)):
        await _filed(holder, meta, b)

        # b verified the layer and confirms; its client asks for the next one at once:
        # the confirmation goes with that request, and the reply names it.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(b.confirm_seed, meta.digest, meta.info_hash_v2)
            await trio.sleep(0.1)
            reply = await b.acquire_lease(nxt.digest, size=nxt.size)
        assert reply.status is wire.LeaseStatus.GRANTED
        assert reply.confirmed == [str(meta.digest)]
        assert (_riding(t), _entered(t, "confirm")) == (1, 1)
        # Taken as the call would be: b is a seeder, handed out beside the holder.
        got = await _seeded(c, meta)
        assert got.peers is not None and sorted(got.peers[:2]) == [_at(7001), _at(7002)]

        # One for a digest the tracker has no torrent for is not taken; the lease is
        # answered, and the confirmation, then sent alone, fails as the call does.
        async with trio.open_nursery() as nursery:

            async def asks_soon() -> None:
                await trio.sleep(0.1)
                again = await b.acquire_lease(nxt.digest, size=nxt.size)
                assert again.confirmed == []  # (b holds that lease: granted again)

            nursery.start_soon(asks_soon)
            with pytest.raises(errors.NotFound):
                await b.confirm_seed(nxt.digest, nxt.info_hash_v2)
        assert _riding(t) == 1


async def test_confirmations_with_no_lease_request_to_ride_go_in_one_call(
    tmp_path: Path,
) -> None:
    # A pull's last layers: verified a moment apart, nothing left to ask for.
    one, two, three, unknown = (
        _blob(tmp_path, name) for name in ("one", "two", "three", "unknown")
    )
    async with _cluster(tmp_path, "holder", "b", "c") as (t, (holder, b, c)):
        for meta in (one, two, three):
            await _filed(holder, meta, b)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(b.confirm_seed, one.digest, one.info_hash_v2)
            await trio.sleep(0.2)
            nursery.start_soon(b.confirm_seed, two.digest, two.info_hash_v2)
        # `one` went alone when its hold ended, `two` riding it and taken: one call.
        assert (_riding(t), _entered(t, "confirm")) == (1, 2)
        for meta in (one, two):  # each taken as its own call would be: b seeds it
            got = await _seeded(c, meta)
            assert got.peers is not None and sorted(got.peers[:2]) == [_at(7001), _at(7002)]

        # A confirmation the tracker refuses (no torrent filed for it) fails as the
        # call alone does, and the one it carried goes alone after it, taken.
        async with trio.open_nursery() as nursery:

            async def refused() -> None:
                with pytest.raises(errors.NotFound):
                    await b.confirm_seed(unknown.digest, unknown.info_hash_v2)

            nursery.start_soon(refused)
            await trio.sleep(0.2)
            nursery.start_soon(b.confirm_seed, three.digest, three.info_hash_v2)
        assert (_riding(t), _entered(t, "confirm")) == (1, 3)
        got = await _seeded(c, three)
        assert got.peers is not None and sorted(got.peers[:2]) == [_at(7001), _at(7002)]
