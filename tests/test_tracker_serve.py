"""The tracker over real sockets, in process (tracker/serve.py, its listeners and routes).

Started with `nursery.start(serve_tracker, ...)` on port 0 (tests/tracker_helpers.py);
spoken to with httpx, the node's TrackerClient, raw TCP and raw UDP. Every
refusal must be a clear error of the right kind, and the tracker must keep
serving after it.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes, urlsplit

import h11
import httpx
import libtorrent as lt
import msgpack
import pytest
import trio
import trio.testing

from p2preg.core import errors, wire
from p2preg.core.digest import Digest
from tests.tracker_helpers import (
    SteppedClock,
    blob_meta,
    file_as_holder,
    remake,
    running_tracker,
)
from tracker import udp
from tracker.client import TrackerClient, open_tracker_client

TOKEN = "cluster-token"


@asynccontextmanager
async def running(tmp_path: Path, **overrides: Any) -> AsyncIterator[str]:
    """The shared in-process tracker, with this file's cluster token."""
    async with running_tracker(tmp_path, **{"token": TOKEN, **overrides}) as url:
        yield url


def announce_query(ih: bytes, n: int, *, left: int = 0, token: str | None = TOKEN) -> str:
    """Peer `n`'s announce, as node `n<n>` (the publisher in these tests is n1)."""
    q = (
        f"info_hash={quote_from_bytes(ih)}&peer_id={quote_from_bytes(bytes([n]) * 20)}"
        f"&port={7000 + n}&uploaded=0&downloaded=0&left={left}&compact=1&numwant=50&node=n{n}"
    )
    return q + (f"&token={token}" if token else "")


async def healthy(http: httpx.AsyncClient, url: str) -> bool:
    return (await http.get(url + "/healthz")).status_code == 200


async def test_announce_scrape_auth_and_metrics(tmp_path: Path) -> None:
    meta = blob_meta(tmp_path)
    (ih,) = meta.swarm_keys
    async with (
        running(tmp_path) as url,
        open_tracker_client(url, node="n1", token=TOKEN) as client,
        httpx.AsyncClient(headers={"Connection": "close"}) as http,
    ):
        await file_as_holder(client, meta)
        seeder = lt.bdecode((await http.get(f"{url}/announce?{announce_query(ih, 1)}")).content)
        assert seeder[b"peers"] == b"" and seeder[b"complete"] == 1
        r = await http.get(f"{url}/announce?{announce_query(ih, 2, left=5)}")
        assert r.status_code == 200 and r.headers["connection"] == "close"
        leecher = lt.bdecode(r.content)
        assert leecher[b"peers"] == bytes([127, 0, 0, 1]) + (7001).to_bytes(2, "big")
        assert (leecher[b"complete"], leecher[b"incomplete"]) == (1, 1)
        scrape = lt.bdecode(
            (await http.get(f"{url}/scrape?info_hash={quote_from_bytes(ih)}&token={TOKEN}")).content
        )
        assert scrape == {b"files": {ih: {b"complete": 1, b"incomplete": 1, b"downloaded": 0}}}

        no_token = lt.bdecode(
            (await http.get(f"{url}/announce?{announce_query(ih, 3, token=None)}")).content
        )
        assert b"token" in no_token[b"failure reason"]
        r = await http.get(f"{url}/v1/metainfo/{meta.digest}")
        assert r.status_code == 401
        assert wire.decode(wire.ErrorReply, r.content).error == "unauthorized"
        async with open_tracker_client(url, node="n2", token="wrong") as intruder:
            with pytest.raises(errors.Unauthorized):
                await intruder.publish_metainfo(meta.digest, meta.size, meta.data)

        metrics = (await http.get(url + "/metrics")).text
        assert 'p2preg_tracker_announces_total{event="none",transport="http"} 3.0' in metrics
        assert 'p2preg_tracker_failures_total{code="unauthorized",transport="http"} 1.0' in metrics
        assert "p2preg_tracker_metainfo 1.0" in metrics
        assert "p2preg_tracker_peers 2.0" in metrics and "p2preg_tracker_seeders 1.0" in metrics
        assert "p2preg_tracker_swarms 1.0" in metrics


@pytest.mark.parametrize(
    "target,reason",
    [
        ("/announce?info_hash=short&peer_id=x&port=1&left=0", b"info_hash must be 20 bytes"),
        ("/announce?" + announce_query(b"\x07" * 20, 1), b"unregistered info_hash"),
        ("/announce", b"info_hash"),
        ("/scrape?token=" + TOKEN, b"at least one info_hash"),
    ],
)
async def test_malformed_announces_get_bencoded_failures(
    tmp_path: Path, target: str, reason: bytes
) -> None:
    async with running(tmp_path) as url, httpx.AsyncClient() as http:
        r = await http.get(url + target)
        assert r.status_code == 200  # BitTorrent clients read failures from 200s
        assert reason in lt.bdecode(r.content)[b"failure reason"]
        assert await healthy(http, url)


async def test_garbage_and_split_requests_over_raw_tcp(tmp_path: Path) -> None:
    async with running(tmp_path, token=None) as url:
        host, port = urlsplit(url).hostname or "", urlsplit(url).port or 0
        # Not HTTP at all: a 400, and the tracker stays up.
        stream = await trio.open_tcp_stream(host, port)
        await stream.send_all(b"\x16\x03\x01 hello?\r\n\r\n")
        reply = await stream.receive_some(4096)
        assert reply.startswith(b"HTTP/1.1 400")
        await stream.aclose()
        # An announce whose head arrives in two pieces takes the slow path.
        stream = await trio.open_tcp_stream(host, port)
        await stream.send_all(b"GET /announce?info_hash=x HTTP/1.1\r\nHost: t")
        await trio.sleep(0.05)
        await stream.send_all(b"\r\n\r\n")
        data = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(4096):
                data += chunk
        await stream.aclose()
        assert data.startswith(b"HTTP/1.1 200") and b"failure reason" in data
        async with httpx.AsyncClient() as http:
            assert await healthy(http, url)


async def exchange_on(
    stream: trio.SocketStream, conn: h11.Connection, method: str, target: str, body: bytes = b""
) -> tuple[h11.Response, bytes]:
    """One request on an open connection, read back with h11 (client side)."""
    headers = [("Host", "tracker"), ("Authorization", f"Bearer {TOKEN}")]
    headers.append(("Content-Length", str(len(body))))
    data = conn.send(h11.Request(method=method, target=target, headers=headers)) or b""
    data += conn.send(h11.Data(data=body)) if body else b""
    await stream.send_all(data + (conn.send(h11.EndOfMessage()) or b""))
    head: h11.Response | None = None
    answer = b""
    with trio.fail_after(10):  # a hang guard, not a timing assertion
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                head = event
            elif isinstance(event, h11.Data):
                answer += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                return head, answer


async def test_control_requests_keep_the_connection_and_announces_close_it(
    tmp_path: Path,
) -> None:
    meta = blob_meta(tmp_path)
    async with running(tmp_path) as url:
        async with open_tracker_client(url, node="n1", token=TOKEN) as client:
            await client.acquire_lease(meta.digest, size=meta.size)  # the lease holder files
        stream = await trio.open_tcp_stream("127.0.0.1", urlsplit(url).port or 0)
        conn = h11.Connection(h11.CLIENT)
        body = wire.encode(wire.PublishMetainfo("n1", meta.size, meta.data))
        head, _ = await exchange_on(stream, conn, "PUT", f"/v1/metainfo/{meta.digest}", body)
        assert head.status_code == 201
        conn.start_next_cycle()
        head, answer = await exchange_on(stream, conn, "GET", "/healthz")
        assert (head.status_code, answer) == (200, b"ok\n")
        conn.start_next_cycle()
        # A HEAD is a GET without the body.
        head, answer = await exchange_on(stream, conn, "HEAD", "/healthz")
        assert (head.status_code, answer) == (200, b"")
        conn.start_next_cycle()
        # An announce on the same connection: the client's real address, then close.
        query = announce_query(meta.swarm_keys[0], 1)
        head, answer = await exchange_on(stream, conn, "GET", f"/announce?{query}")
        assert head.status_code == 200 and (b"connection", b"close") in list(head.headers)
        assert lt.bdecode(answer)[b"complete"] == 1
        assert await stream.receive_some(1) == b""
        await stream.aclose()
        async with httpx.AsyncClient() as http:
            r = await http.get(f"{url}/announce?{announce_query(meta.swarm_keys[0], 2, left=9)}")
        assert lt.bdecode(r.content)[b"peers"] == bytes([127, 0, 0, 1, 0x1B, 0x59])


async def test_metainfo_refusals_are_clear_and_typed(tmp_path: Path) -> None:
    meta = blob_meta(tmp_path)
    other = blob_meta(tmp_path)
    async with (
        running(tmp_path, max_metainfo_bytes=4096) as url,
        open_tracker_client(url, node="n1", token=TOKEN) as client,
        open_tracker_client(url, node="n2", token=TOKEN) as other_node,
    ):
        with pytest.raises(errors.InvalidMetainfo, match="length"):
            await client.publish_metainfo(meta.digest, meta.size + 1, meta.data)
        with pytest.raises(errors.InvalidMetainfo, match="name"):
            await client.publish_metainfo(meta.digest, other.size, other.data)
        top: Any = lt.bdecode(meta.data)
        top[b"info"][b"private"] = 0
        with pytest.raises(errors.InvalidMetainfo, match="not private"):
            await client.publish_metainfo(meta.digest, meta.size, lt.bencode(top))
        with pytest.raises(errors.MetainfoTooLarge):
            await client.publish_metainfo(meta.digest, meta.size, meta.data + b"x" * 5000)
        with pytest.raises(errors.InvalidMetainfo, match="decode"):
            await client.publish_metainfo(meta.digest, meta.size, b"\xff not bencode")
        with pytest.raises(errors.Forbidden, match="only the holder of the upstream lease"):
            await client.publish_metainfo(meta.digest, meta.size, meta.data)
        first = await file_as_holder(client, meta)
        assert await client.publish_metainfo(meta.digest, meta.size, meta.data) == first
        assert await client.lookup_metainfo(meta.digest) == first
        assert await client.lookup_metainfo(Digest.of(b"never published")) is None
        hybrid = remake(tmp_path, meta, hybrid=True)
        with pytest.raises(errors.MetainfoConflict):
            await client.publish_metainfo(meta.digest, meta.size, hybrid.data)
        # A report is evidence: the reporter's torrent comes back, the stored one stays.
        with pytest.raises(errors.InvalidRequest, match="published this metainfo itself"):
            await client.report_bad(meta.digest, meta.swarm_keys[0], meta.size, hybrid.data, "x")
        challenger = await other_node.report_bad(
            meta.digest, meta.swarm_keys[0], meta.size, hybrid.data, "pieces failed"
        )
        assert challenger.info_hashes == list(hybrid.swarm_keys)
        assert await client.lookup_metainfo(meta.digest) == first
        async with httpx.AsyncClient() as http:
            r = await http.put(
                f"{url}/v1/metainfo/{meta.digest}",
                content=msgpack.packb({"node": 5}),
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
            assert r.status_code == 400
            assert "node must be str" in wire.decode(wire.ErrorReply, r.content).message
            assert await _oversized_put(url, f"/v1/metainfo/{meta.digest}", 4096 + 70 * 1024) == 413
            r = await http.put(
                f"{url}/v1/metainfo/md5:abc",
                content=wire.encode(wire.PublishMetainfo("n1", meta.size, meta.data)),
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
            assert r.status_code == 400
            assert "digest" in wire.decode(wire.ErrorReply, r.content).message
            assert await healthy(http, url)


async def _oversized_put(url: str, path: str, length: int) -> int:
    """The status a PUT announcing `length` body bytes gets before sending them.

    Over a raw stream: the tracker answers from the head and closes, and an
    HTTP client still uploading would see the reset instead of the answer.
    """
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    head = (
        f"PUT {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Length: {length}\r\n"
        f"Authorization: Bearer {TOKEN}\r\n\r\n"
    )
    stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    async with stream:
        await stream.send_all(head.encode())
        reply = b""
        with trio.fail_after(10):
            while b"\r\n" not in reply:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                reply += chunk
    return int(reply.split(b" ", 2)[1])


async def test_expired_lease_passes_on_while_a_renewing_one_does_not(tmp_path: Path) -> None:
    """Over HTTP, with the tracker's clock stepped by hand: no wall-clock waits."""
    digest = Digest.of(b"a blob nobody has yet")
    clock = SteppedClock()
    async with (
        running(tmp_path, clock=clock, lease_ttl_s=1.0, lease_wait_max_s=5.0) as url,
        open_tracker_client(url, node="a", token=TOKEN) as a,
        open_tracker_client(url, node="b", token=TOKEN) as b,
    ):
        held = await a.acquire_lease(digest, size=1000)
        assert held.status is wire.LeaseStatus.GRANTED and held.lease_id is not None
        # Renewed every 0.6 s for 3 s, longer than the TTL: never handed over.
        for step in range(1, 6):
            clock.step(0.6)
            await a.renew_lease(digest, held.lease_id, 100 * step)
            waited = await b.acquire_lease(digest)
            assert waited.status is wire.LeaseStatus.WAIT and waited.holder == "a"
            assert waited.bytes_done == 100 * step and waited.retry_after_s > 0
        # Silent past its TTL: the next asker takes it, and the old holder has lost it.
        clock.step(1.1)
        taken = await b.acquire_lease(digest)
        assert taken.status is wire.LeaseStatus.GRANTED and taken.holder == "b"
        with pytest.raises(errors.LeaseLost):
            await a.renew_lease(digest, held.lease_id, 1)
        # A long-polled request is answered when the lease is released (on the
        # stepped clock it has no other way to end; fail_after guards a hang).
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                got: list[wire.LeaseReply] = []

                async def long_poll() -> None:
                    got.append(await a.acquire_lease(digest, wait_s=5.0))

                nursery.start_soon(long_poll)
                await trio.testing.wait_all_tasks_blocked()
                assert got == []
                await b.release_lease(digest, taken.lease_id or "")
        assert got[0].status is wire.LeaseStatus.GRANTED and got[0].holder == "a"
        async with httpx.AsyncClient() as http:
            metrics = (await http.get(url + "/metrics")).text
        assert "p2preg_tracker_lease_grants_total 3.0" in metrics
        assert "p2preg_tracker_lease_expiries_total 1.0" in metrics


async def test_unreachable_tracker_is_unavailable() -> None:
    client = TrackerClient("http://127.0.0.1:9", node="n", timeout_s=2)
    try:
        with pytest.raises(errors.TrackerUnavailable):
            await client.lookup_metainfo(Digest.of(b"x"))
    finally:
        await client.aclose()


def udp_announce(cid: int, ih: bytes, n: int, left: int, url_data: bytes) -> bytes:
    fixed = struct.pack(
        ">QII20s20sQQQIIIiH", cid, 1, 50 + n, ih, bytes([n]) * 20, 0, left, 0, 2, 0, 0, -1, 7000 + n
    )
    return fixed + bytes([2, len(url_data)]) + url_data + b"\x00"


async def test_udp_tracker(tmp_path: Path) -> None:
    meta = blob_meta(tmp_path)
    (ih,) = meta.swarm_keys
    async with (
        running(tmp_path) as url,
        open_tracker_client(url, node="n1", token=TOKEN) as client,
    ):
        await file_as_holder(client, meta)
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await sock.connect(("127.0.0.1", urlsplit(url).port or 0))

        async def ask(packet: bytes) -> bytes:
            await sock.send(packet)
            with trio.fail_after(5):
                return await sock.recv(2048)

        action, tid, cid = struct.unpack(
            ">IIQ", await ask(struct.pack(">QII", udp.PROTOCOL_ID, 0, 9))
        )
        assert (action, tid) == (0, 9)
        good = f"/announce?token={TOKEN}".encode()
        # BEP 41 URL data names the node: the seeder is n1, the publisher.
        await ask(udp_announce(cid, ih, 1, 0, good + b"&node=n1"))
        reply = await ask(udp_announce(cid, ih, 2, 10, good + b"&node=n2"))
        action, tid, _interval, leechers, seeders = struct.unpack_from(">IIIII", reply)
        assert (action, tid, leechers, seeders) == (1, 52, 1, 1)
        assert reply[20:] == bytes([127, 0, 0, 1]) + (7001).to_bytes(2, "big")
        for bad, message in (
            (udp_announce(cid, ih, 3, 0, b"/announce?token=nope"), b"token"),
            (udp_announce(cid ^ 1, ih, 3, 0, good), b"connection id"),
            (struct.pack(">QII", cid, 2, 77) + ih, b"token"),  # UDP scrape cannot carry one
            (struct.pack(">QII", cid, 9, 1), b"unknown action"),
        ):
            answer = await ask(bad)
            assert answer[:4] == b"\x00\x00\x00\x03" and message in answer[8:]
        sock.close()
        async with httpx.AsyncClient() as http:
            assert await healthy(http, url)
