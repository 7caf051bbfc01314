"""Announce fronts (tracker/fronts.py) as real processes: replicas on one redis-server.

Under mutual TLS, a standby answers a node's announce with the serving
replica's answer: a peer that announced to one standby is handed out by the
other and by the serving replica itself. A node's certificate cannot use the
forward route (only a tracker's may speak for a node). Killing the serving
replica (-9) makes the fronts answer a failure at once, then forward to the
replica that takes the next term, which hands out the peers of the last.
In a token cluster the fronts forward with the token, and a forward without
it is refused.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from urllib.parse import quote_from_bytes

import httpx
import libtorrent as lt
import pytest
import trio

from harness.procs import wait_until
from harness.redis import start_redis
from harness.tlscerts import ClusterCA, https_client
from harness.tracker import TrackerProcess
from p2preg.core.metainfo import Metainfo
from p2preg.core.tls import ReloadingTLS
from tests.replica_helpers import metric, replicas, serving
from tests.tracker_helpers import blob_meta, file_as_holder
from tracker import fronts
from tracker.client import open_tracker_client

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PASSWORD = "fronts-store-password"
# Bound on a front learning where the next term is served (a third of a term
# after it begins, TERM_S = 2 s), with room for a busy machine.
NEXT_TERM_WAIT_S = 30.0


def announce_query(meta: Metainfo, n: int, *, left: int) -> str:
    (ih,) = meta.swarm_keys
    return (
        f"info_hash={quote_from_bytes(ih)}&peer_id={quote_from_bytes(bytes([n]) * 20)}"
        f"&port={7000 + n}&uploaded=0&downloaded=0&left={left}&compact=1&numwant=50"
    )


async def announce(t: TrackerProcess, tls_dir: Path, meta: Metainfo, n: int,
                   left: int = 1) -> dict[bytes, object]:  # fmt: skip
    async with https_client(tls_dir, headers={"Connection": "close"}) as http:
        r = await http.get(f"{t.url}/announce?{announce_query(meta, n, left=left)}")
    answer = lt.bdecode(r.content)
    assert isinstance(answer, dict), r.content[:200]
    return {k: v for k, v in answer.items() if isinstance(k, bytes)}


async def answered_by(t: TrackerProcess, tls_dir: Path, meta: Metainfo,
                      n: int) -> dict[bytes, object]:  # fmt: skip
    """The first answer of `t` that is no failure (bounded by NEXT_TERM_WAIT_S)."""
    answer: dict[bytes, object] = {}
    with trio.move_on_after(NEXT_TERM_WAIT_S):
        for _ in range(int(NEXT_TERM_WAIT_S / 0.2)):
            answer = await announce(t, tls_dir, meta, n)
            if b"failure reason" not in answer:
                break
            await trio.sleep(0.2)
    assert b"failure reason" not in answer, answer
    return answer


def forwards(t: TrackerProcess, result: str) -> float:
    return metric(t, "p2preg_tracker_front_forwards_total", result=result)


def peer(n: int) -> bytes:
    return bytes([127, 0, 0, 1]) + (7000 + n).to_bytes(2, "big")


def peers_of(answer: dict[bytes, object]) -> set[bytes]:
    raw = answer.get(b"peers", b"")
    assert isinstance(raw, bytes), answer
    return {raw[i : i + 6] for i in range(0, len(raw), 6)}


async def test_standbys_front_for_the_serving_replica_and_follow_a_takeover(
    tmp_path: Path,
) -> None:
    ca = ClusterCA.make("test")
    certs = tmp_path / "certs"
    tracker_dirs = [ca.tls_dir(certs / f"t{n}", "tracker", f"t{n}", ips=["127.0.0.1"])
                    for n in range(3)]  # fmt: skip
    node = {name: ca.tls_dir(certs / name, "node", name) for name in ("a", "b", "c", "d")}
    meta = blob_meta(tmp_path, root=ca.cert_pem)
    with (
        start_redis(tmp_path / "redis", password=PASSWORD) as server,
        replicas(tmp_path, server.url(), 3, token=None, password=PASSWORD,
                 tls_dirs=tracker_dirs) as trackers,  # fmt: skip
    ):
        first = serving(trackers)
        front, other = (t for t in trackers if t is not first)
        tls_a = ReloadingTLS(node["a"], role="node")
        async with open_tracker_client([t.url for t in trackers], node="a", tls=tls_a) as a:
            await file_as_holder(a, meta)
        # Each standby learns where the term is served within a third of a term.
        for t in (front, other):
            await answered_by(t, node["d"], meta, 4)
        answered = {t.url: forwards(t, "answered") for t in (front, other)}
        applied = metric(first, "p2preg_tracker_forwarded_total", result="applied")
        seeded = await announce(front, node["a"], meta, 1, left=0)
        assert b"failure reason" not in seeded, seeded
        # The peer that announced to one front is handed out by the other front
        # and by the serving replica: one swarm, in the serving replica's memory.
        assert peer(1) in peers_of(await announce(other, node["b"], meta, 2))
        assert {peer(1), peer(2)} <= peers_of(await announce(first, node["c"], meta, 3))
        for t in (front, other):
            assert forwards(t, "answered") == answered[t.url] + 1
        assert metric(first, "p2preg_tracker_forwarded_total", result="applied") == applied + 2
        # The swarm's identities are the nodes', not the fronts'.
        in_store = ["a", "b", "c", "d"]
        wait_until(lambda: sorted(server.cli("HKEYS", f"p2preg:p:{meta.digest}")) == in_store,
                   timeout_s=10, what="the peers written to the store")  # fmt: skip

        await a_node_certificate_cannot_forward(first, node["d"], meta)

        os.kill(first.process.pid, signal.SIGKILL)
        first.process.stop()  # reaps it
        # The term's key still names the dead replica: the fronts say so at once.
        failed = await announce(front, node["a"], meta, 1, left=0)
        assert b"failure reason" in failed, failed
        assert forwards(front, "unreachable") >= 1
        took = serving([front, other])
        still = other if took is front else front
        # The remaining front forwards to the new term, which loaded the peers.
        answer = await answered_by(still, node["d"], meta, 4)
        assert {peer(1), peer(2), peer(3)} <= peers_of(answer)
        assert metric(took, "p2preg_tracker_forwarded_total", result="applied") >= 1


async def a_node_certificate_cannot_forward(
    serving_replica: TrackerProcess, node_dir: Path, meta: Metainfo
) -> None:
    """A node that posts a forged batch (another node's identity, another address)
    to the serving replica is refused, and nothing of it reaches the swarm."""
    forged = fronts.encode_batch([
        fronts.Forwarded(b"/announce", announce_query(meta, 9, left=0).encode(), "127.0.0.9", "b")
    ])  # fmt: skip
    before = metric(serving_replica, "p2preg_tracker_forwarded_total", result="applied")
    async with https_client(node_dir) as http:
        r = await http.post(f"{serving_replica.url}{fronts.FORWARD_PATH}", content=forged,
                            headers={"Content-Type": fronts.CONTENT_TYPE})  # fmt: skip
    assert r.status_code == 403 and b"forbidden" in r.content, r.content
    assert metric(serving_replica, "p2preg_tracker_forwarded_total", result="refused") == 1
    assert metric(serving_replica, "p2preg_tracker_forwarded_total", result="applied") == before
    async with https_client(node_dir, headers={"Connection": "close"}) as http:
        r = await http.get(f"{serving_replica.url}/announce?{announce_query(meta, 4, left=1)}")
    handed_out = peers_of(lt.bdecode(r.content))
    assert bytes([127, 0, 0, 9]) + peer(9)[4:] not in handed_out and peer(9) not in handed_out


async def test_with_a_token_a_front_forwards_with_it_and_nothing_forwards_without(
    tmp_path: Path,
) -> None:
    """A token cluster: the fronts forward with the cluster token; a forward
    without it is refused (401) and reaches no swarm."""
    token = "fronts-token"
    meta = blob_meta(tmp_path)
    (ih,) = meta.swarm_keys
    with (
        start_redis(tmp_path / "redis", password=PASSWORD) as server,
        replicas(tmp_path, server.url(), 2, token=token, password=PASSWORD) as trackers,
    ):
        first = serving(trackers)
        (front,) = (t for t in trackers if t is not first)
        async with open_tracker_client(first.url, node="a", token=token) as a:
            await file_as_holder(a, meta)

        def query(node: str, n: int, left: int) -> str:
            return (f"info_hash={quote_from_bytes(ih)}&peer_id={quote_from_bytes(bytes([n]) * 20)}"
                    f"&port={7000 + n}&uploaded=0&downloaded=0&left={left}&compact=1"
                    f"&node={node}&token={token}")  # fmt: skip

        async with httpx.AsyncClient(headers={"Connection": "close"}) as http:
            seeded: dict[bytes, object] = {}
            with trio.move_on_after(NEXT_TERM_WAIT_S):
                for _ in range(int(NEXT_TERM_WAIT_S / 0.2)):
                    r = await http.get(f"{front.url}/announce?{query('a', 1, 0)}")
                    seeded = lt.bdecode(r.content)
                    if b"failure reason" not in seeded:
                        break
                    await trio.sleep(0.2)
            assert b"failure reason" not in seeded, seeded
            r = await http.get(f"{first.url}/announce?{query('b', 2, 1)}")
            assert peer(1) in peers_of(lt.bdecode(r.content))
            forged = fronts.encode_batch([
                fronts.Forwarded(b"/announce", query("c", 9, 0).encode(), "127.0.0.9", None)
            ])  # fmt: skip
            r = await http.post(f"{first.url}{fronts.FORWARD_PATH}", content=forged)
        assert r.status_code == 401, r.content
        assert token.encode() not in r.content
        assert metric(first, "p2preg_tracker_forwarded_total", result="applied") >= 1
        assert "c" not in server.cli("HKEYS", f"p2preg:p:{meta.digest}")


async def test_a_standby_forwards_a_node_relay_s_batch_to_the_serving_replica(
    tmp_path: Path,
) -> None:
    """A node relay's batch (`POST /v1/announces`) that reaches a standby is applied
    by the serving replica, under the node the relay's client names."""
    token = "relay-token"
    meta = blob_meta(tmp_path)
    (ih,) = meta.swarm_keys
    with (
        start_redis(tmp_path / "redis", password=PASSWORD) as server,
        replicas(tmp_path, server.url(), 2, token=token, password=PASSWORD) as trackers,
    ):
        first = serving(trackers)
        (front,) = (t for t in trackers if t is not first)
        async with open_tracker_client(first.url, node="a", token=token) as a:
            await file_as_holder(a, meta)
        # As libtorrent sends it to the relay: no token, no node (the client adds both).
        q = (f"info_hash={quote_from_bytes(ih)}&peer_id={quote_from_bytes(bytes([3]) * 20)}"
             f"&port=7003&uploaded=0&downloaded=0&left=0&compact=1").encode()  # fmt: skip
        answers: list[bytes] = []
        async with open_tracker_client(front.url, node="a", token=token) as relayed:
            with trio.move_on_after(NEXT_TERM_WAIT_S):
                for _ in range(int(NEXT_TERM_WAIT_S / 0.2)):  # until the front knows the term
                    answers = await relayed.announce_batch([q, q], 10)
                    if all(b"failure reason" not in lt.bdecode(x) for x in answers):
                        break
                    await trio.sleep(0.2)
        assert len(answers) == 2 and b"failure reason" not in lt.bdecode(answers[0]), answers
        assert metric(front, "p2preg_tracker_relayed_total", result="forwarded") >= 2
        assert metric(first, "p2preg_tracker_forwarded_total", result="applied") >= 2
        async with httpx.AsyncClient(headers={"Connection": "close"}) as http:
            r = await http.get(f"{first.url}/announce?" + announce_query(meta, 4, left=1)
                               + f"&node=b&token={token}")  # fmt: skip
        assert peer(3) in peers_of(lt.bdecode(r.content))
