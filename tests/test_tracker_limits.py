"""The tracker's bounds: one client cannot grow its memory, or put others in a swarm.

Over real sockets (in process, `serve_tracker` on port 0): with small caps the
N+1th peer of a swarm, the N+1th peer of the tracker and the N+1th metainfo
(hence swarm) are refused while re-announces of known peers still work, a huge
`numwant` gets `max_numwant` peers, and `ip=` (or the BEP 15 IP field) moves a
peer only when the connection comes from a trusted network. On the service
itself (sans-IO, with tracemalloc): a flood of new peers and of unregistered
info-hashes past the caps allocates nothing that stays. Counts go to
bench/results/reliability-tracker-limits.json (docs/RELIABILITY.md).
"""

from __future__ import annotations

import os
import socket
import struct
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes, urlsplit

import httpx
import libtorrent as lt
import pytest
import trio

from harness.node import metric_value
from p2preg.core import errors, wire
from p2preg.core.metainfo import Metainfo
from tests.fixtures.reliability import Tally
from tests.tracker_helpers import blob_meta, make_tracker, publish_as_holder, running_tracker
from tracker import udp
from tracker.announce import AnnounceRequest, Event

CAPS: dict[str, Any] = dict(
    max_peers_per_swarm=3, max_peers=5, max_metainfo=2, max_numwant=2, default_numwant=2
)


@pytest.fixture(scope="module")
def tally() -> Iterator[Tally]:
    t = Tally("tracker-limits", ".venv/bin/pytest -q tests/test_tracker_limits.py")
    yield t
    t.write()


async def publish(http: httpx.AsyncClient, url: str, meta: Metainfo) -> httpx.Response:
    """File `meta` as node "n", holding its lease (only the holder defines a torrent)."""
    lease = wire.encode(wire.LeaseRequest("n", meta.size))
    assert (await http.post(f"{url}/v1/leases/{meta.digest}", content=lease)).status_code == 200
    body = wire.encode(wire.PublishMetainfo("n", meta.size, meta.data))
    return await http.put(f"{url}/v1/metainfo/{meta.digest}", content=body)


async def announce(
    http: httpx.AsyncClient, url: str, ih: bytes, n: int, extra: str = "", left: int = 1
) -> Any:
    query = (
        f"info_hash={quote_from_bytes(ih)}&peer_id={quote_from_bytes(bytes([n]) * 20)}"
        f"&port={7000 + n}&uploaded=0&downloaded=0&left={left}&compact=1&node=n{n}{extra}"
    )
    r = await http.get(f"{url}/announce?{query}")
    assert r.status_code == 200
    return lt.bdecode(r.content)


def peers_of(answer: Any) -> list[tuple[str, int]]:
    raw = answer[b"peers"]
    return [
        (socket.inet_ntoa(raw[i : i + 4]), int.from_bytes(raw[i + 4 : i + 6], "big"))
        for i in range(0, len(raw), 6)
    ]


async def test_caps_refuse_the_next_peer_swarm_and_metainfo(tmp_path: Path, tally: Tally) -> None:
    metas = [blob_meta(tmp_path) for _ in range(3)]
    a, b = metas[0].swarm_keys[0], metas[1].swarm_keys[0]
    async with running_tracker(tmp_path, **CAPS) as url, httpx.AsyncClient() as http:
        assert (await publish(http, url, metas[0])).status_code == 201
        assert (await publish(http, url, metas[1])).status_code == 201
        # The third metainfo, and so a third swarm, does not fit.
        third = await publish(http, url, metas[2])
        assert third.status_code == 503
        assert wire.decode(wire.ErrorReply, third.content).error == "limit_reached"
        # Capacity, not a malformed request: documented as 503 limit_reached.
        tally.record("metainfo-over-cap", "503-limit_reached", "third metainfo")
        for n in (1, 2, 3):
            assert b"failure reason" not in await announce(http, url, a, n)
        # The 4th peer of a swarm of max_peers_per_swarm = 3 is refused ...
        fourth = await announce(http, url, a, 4)
        assert b"limit" in fourth[b"failure reason"]
        tally.record("peer-over-swarm-cap", "refused", "4th peer of swarm a")
        # ... while the peers already in it keep announcing.
        assert b"failure reason" not in await announce(http, url, a, 1)
        for n in (5, 6):
            assert b"failure reason" not in await announce(http, url, b, n)
        # 5 peers in all (max_peers): a new one is refused in any swarm.
        seventh = await announce(http, url, b, 7)
        assert b"limit" in seventh[b"failure reason"]
        tally.record("peer-over-tracker-cap", "refused", "6th peer of the tracker")
        # A huge numwant gets max_numwant peers.
        for numwant in ("2", "3", str(10**18), "9" * 19):
            answer = await announce(http, url, a, 2, f"&numwant={numwant}")
            assert len(peers_of(answer)) == CAPS["max_numwant"]
            tally.record("numwant-capped", "ok", f"numwant={numwant}")
        # A peer that stops frees its place.
        await announce(http, url, a, 1, "&event=stopped")
        assert b"failure reason" not in await announce(http, url, a, 4)
        metrics = (await http.get(f"{url}/metrics")).text
        assert metric_value(metrics, "p2preg_tracker_peers") == CAPS["max_peers"]
        assert metric_value(metrics, "p2preg_tracker_swarms") == 2
        assert metric_value(metrics, "p2preg_tracker_metainfo") == CAPS["max_metainfo"]
        # Over UDP too: a new peer does not fit.
        reply = await udp_announce(url, a, 8, ip=0)
        assert reply[:4] == struct.pack(">I", udp.ERROR) and b"limit" in reply[8:]
        tally.record("peer-over-swarm-cap", "refused", "udp")


async def udp_announce(url: str, ih: bytes, n: int, *, ip: int) -> bytes:
    port = urlsplit(url).port or 0
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        await sock.connect(("127.0.0.1", port))
        with trio.fail_after(5):
            await sock.send(struct.pack(">QII", udp.PROTOCOL_ID, 0, 1))
            _, _, cid = struct.unpack(">IIQ", await sock.recv(2048))
            packet = struct.pack(
                ">QII20s20sQQQIIIiH",
                cid,
                1,
                2,
                ih,
                bytes([n]) * 20,
                0,
                1,
                0,
                2,
                ip,
                0,
                50,
                7000 + n,
            )
            await sock.send(packet)
            return await sock.recv(2048)
    finally:
        sock.close()


@pytest.mark.parametrize("trusted", [(), ("10.0.0.0/8",), ("127.0.0.0/8",)])
async def test_ip_is_honoured_only_from_trusted_sources(
    tmp_path: Path, tally: Tally, trusted: tuple[str, ...]
) -> None:
    meta = blob_meta(tmp_path)
    (ih,) = meta.swarm_keys
    honoured = "127.0.0.0/8" in trusted  # the test's connections come from 127.0.0.1
    async with (
        running_tracker(tmp_path, trusted_ip_sources=trusted) as url,
        httpx.AsyncClient() as http,
    ):
        assert (await publish(http, url, meta)).status_code == 201
        # Peer 1 claims to be 10.9.8.7 over HTTP, peer 2 claims 10.1.1.1 over UDP.
        await announce(http, url, ih, 1, "&ip=10.9.8.7", left=0)
        reply = await udp_announce(url, ih, 2, ip=0x0A010101)
        assert reply[:4] == struct.pack(">I", udp.ANNOUNCE)
        seen = set(peers_of(await announce(http, url, ih, 3, "&numwant=50")))
        if honoured:
            assert seen == {("10.9.8.7", 7001), ("10.1.1.1", 7002)}
        else:
            assert seen == {("127.0.0.1", 7001), ("127.0.0.1", 7002)}
        tally.record("forged-ip", "honoured" if honoured else "ignored", f"trusted={trusted}")


async def test_a_flood_past_the_caps_allocates_nothing_that_stays(
    tmp_path: Path, tally: Tally
) -> None:
    """Sans-IO: 20,000 new peers past a full swarm, 20,000 unregistered info-hashes."""
    cap = 1000
    tracker = make_tracker(tmp_path, max_peers_per_swarm=cap, max_peers=2 * cap, max_metainfo=1)
    meta = blob_meta(tmp_path)
    await publish_as_holder(tracker, meta, "n")
    (ih,) = meta.swarm_keys

    def req(info_hash: bytes, i: int) -> AnnounceRequest:
        return AnnounceRequest(
            info_hash, i.to_bytes(20, "big"), 7000, 0, 0, 1, Event.STARTED, 10**18, None
        )

    def ip(i: int) -> str:
        return f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"

    for i in range(cap):  # fill the swarm
        tracker.announce(req(ih, i), ip(i), "http")
    flood = 20_000
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        refused = unknown = 0
        for i in range(cap, cap + flood):
            try:
                tracker.announce(req(ih, i), ip(i), "http")
            except errors.LimitReached:
                refused += 1
        for i in range(flood):
            try:
                tracker.announce(req(os.urandom(20), i), ip(i), "udp")
            except errors.UnknownTorrent:
                unknown += 1
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    totals = tracker.peers.totals()
    assert (refused, unknown) == (flood, flood)
    assert (totals.peers, totals.swarms) == (cap, 1)
    grown = after - before
    assert grown < 64 * 1024, f"{grown} bytes stayed after {2 * flood} refused announces"
    # UDP connection ids are stateless; their cache is capped.
    ids = udp.ConnectionIds()
    for i in range(udp.ConnectionIds.MAX_CACHED + 5000):
        ids.issue(ip(i), 0.0)
    assert len(ids._cache) <= udp.ConnectionIds.MAX_CACHED
    tally.record("flood-new-peers", "refused", n=flood)
    tally.record("flood-unregistered-info-hash", "refused", n=flood)
    tally.extra["flood_bytes_retained"] = grown
    tally.extra["flood_peers_after"] = totals.peers
