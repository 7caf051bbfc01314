"""The node's announce relay (p2preg/node/relay.py): its guard sans-IO, and its batching
over a real loopback socket with a fake tracker client.

The guard forwards an announce only for a torrent the swarm holds and from one
of its listen ports, and drops `token`, `node` and `ip`; anything else is a
bencoded failure, counted by why. Announces in flight at once each get their
own answer from the batches they went in; a tracker failure is a bencoded failure.
A seeder's periodic refresh of a torrent the tracker answered as a seeder is
answered by the relay and reaches the tracker in a later batch; nothing else is
held, and a refresh no tracker takes is retried, then given up to libtorrent.
A chunk torrent followed with its blob's peers (localanswers.py) is answered by
the relay from them, and reaches the tracker only if it is no longer followed
and says more than `stopped`; an own torrent's start or completion a control
call carried is answered once, as expected.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes

import httpx
import libtorrent as lt
import trio
import trio.testing

from p2preg.core import errors
from p2preg.core.digest import Digest
from p2preg.core.metainfo import Metainfo
from p2preg.node import localanswers
from p2preg.node.metrics import NodeMetrics
from p2preg.node.relay import checked, open_relay, parse_head, relay_host
from tracker.metainfo import make_metainfo
from tracker.peers import compact_address

HELD = bytes(range(20))
OTHER = bytes(range(1, 21))  # another torrent the swarm holds


class Held:
    listen_ports = frozenset({6882})

    def holds(self, info_hash: bytes) -> bool:
        return info_hash in (HELD, OTHER, *self.more)

    def __init__(self, *more: bytes) -> None:
        self.more = more  # other torrents it holds
        self.reannounced: list[bytes] = []

    def pause(self) -> int:
        return 0

    def reannounce_hash(self, info_hash: bytes) -> None:
        self.reannounced.append(info_hash)


class FakeTracker:
    """Answers each query with its own text, or fails every batch."""

    def __init__(self, *, fail: bool = False) -> None:
        self.batches: list[list[bytes]] = []
        self.fail = fail

    async def announce_batch(self, queries: Sequence[bytes], timeout_s: float) -> list[bytes]:
        self.batches.append(list(queries))
        if self.fail:
            raise errors.TrackerUnavailable("every tracker is down")
        return [b"answer:" + q for q in queries]


def target(info_hash: bytes = HELD, port: int = 6882, extra: str = "") -> bytes:
    q = f"info_hash={quote_from_bytes(info_hash)}&peer_id={'p' * 20}&port={port}&left=0{extra}"
    return b"/announce?" + q.encode()


def reason(body: bytes) -> bytes:
    doc: Any = lt.bdecode(body)
    return bytes(doc[b"failure reason"])


def test_the_guard_forwards_only_the_node_s_torrents_and_ports() -> None:
    query, result = checked(target(extra="&token=s3cret&node=other&ip=10.9.9.9"), Held())
    assert result == "answered" and query is not None
    assert b"token" not in query and b"node=" not in query and b"ip=" not in query
    assert b"port=6882" in query
    assert checked(target(bytes(20)), Held()) == (None, "unknown_torrent")
    # A torrent just removed from the swarm still says it stopped.
    assert checked(target(bytes(20), extra="&event=stopped"), Held())[1] == "answered"
    assert checked(target(bytes(20), 6881, extra="&event=stopped"), Held())[1] == "other_port"
    assert checked(target(port=6881), Held()) == (None, "other_port")
    assert checked(target(port=6882).replace(b"port=6882", b"port=99999999"), Held())[1] in (
        "other_port", "malformed")  # fmt: skip
    assert checked(b"/scrape?" + target().partition(b"?")[2], Held()) == (None, "malformed")
    assert checked(target(), None) == (None, "malformed")  # no swarm attached yet
    assert parse_head(b"GET /announce?x HTTP/1.1\r\nHost: a\r\n\r\n") == b"/announce?x"
    assert parse_head(b"POST /announce HTTP/1.1\r\n\r\n") is None


async def test_each_announce_gets_its_own_answer_and_a_failure_is_bencoded() -> None:
    metrics = NodeMetrics()
    tracker = FakeTracker()
    async with open_relay(tracker, metrics) as relay, httpx.AsyncClient() as http:
        relay.attach(Held())
        answers: list[bytes] = []

        def url(t: bytes) -> str:
            return relay.url + "?" + t.partition(b"?")[2].decode()

        async def get(t: bytes) -> None:
            answers.append((await http.get(url(t))).content)

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for n in range(4):
                    nursery.start_soon(get, target(extra=f"&n={n}"))
        assert sorted(a.rpartition(b"&n=")[2] for a in answers) == [b"0", b"1", b"2", b"3"]
        assert sum(len(b) for b in tracker.batches) == 4
        refused = await http.get(url(target(bytes(20))))
        assert b"unknown_torrent" in reason(refused.content)
        assert sum(len(b) for b in tracker.batches) == 4  # it reached no tracker
        tracker.fail = True
        failed = await http.get(url(target()))
        assert b"no tracker answered" in reason(failed.content)
    sample = metrics.registry.get_sample_value
    assert sample("p2preg_relay_announces_total", {"result": "answered"}) == 4
    assert sample("p2preg_relay_announces_total", {"result": "unknown_torrent"}) == 1
    assert sample("p2preg_relay_announces_total", {"result": "no_tracker"}) == 1


class SeedTracker:
    """Answers as a tracker does, with the interval it is given; or fails every batch."""

    def __init__(self) -> None:
        self.batches: list[list[bytes]] = []
        self.fail = False

    async def announce_batch(self, queries: Sequence[bytes], timeout_s: float) -> list[bytes]:
        self.batches.append(list(queries))
        if self.fail:
            raise errors.TrackerUnavailable("every tracker is down")
        return [lt.bencode({b"interval": 17777, b"peers": b""}) for _ in queries]

    def sent(self) -> list[bytes]:
        return [q for b in self.batches for q in b]


async def wait_for(what: Any, bound: int = 500) -> None:
    for _ in range(bound):
        if what():
            return
        await trio.sleep(0.01)
    raise AssertionError("it did not happen")


async def test_a_seeder_refresh_is_answered_at_once_and_sent_with_the_next_batch() -> None:
    tracker = SeedTracker()
    async with open_relay(tracker, NodeMetrics(), refresh_s=3600) as relay:
        relay.attach(Held())
        with trio.fail_after(30):
            await relay.answer(target(extra="&event=completed"))  # the tracker: a seeder
            assert len(tracker.batches) == 1
            doc: Any = lt.bdecode(await relay.answer(target(extra="&n=refresh")))
            assert doc == {b"interval": 17777, b"peers": b""}
            assert len(tracker.batches) == 1  # answered by the relay, queued
            await relay.answer(target(OTHER, extra="&left=5&n=leecher"))  # an ordinary batch
        assert [q.rpartition(b"&n=")[2] for q in tracker.batches[1]] == [b"leecher", b"refresh"]


async def test_an_announce_that_goes_through_supersedes_the_queued_refresh() -> None:
    tracker = SeedTracker()
    async with open_relay(tracker, NodeMetrics(), refresh_s=3600) as relay:
        relay.attach(Held())
        with trio.fail_after(30):
            await relay.answer(target(extra="&event=started"))
            await relay.answer(target(extra="&n=refresh"))  # held
            await relay.answer(target(extra="&event=stopped&n=stopped"))
        # the refresh never follows `stopped` (it would list the node again)
        assert [q.rpartition(b"&n=")[2] for q in tracker.batches[1]] == [b"stopped"]
        assert not any(q.endswith(b"&n=refresh") for q in tracker.sent())


async def test_the_refresh_batch_goes_on_its_own_every_refresh_s() -> None:
    tracker = SeedTracker()
    async with open_relay(tracker, NodeMetrics(), refresh_s=0.05) as relay:
        relay.attach(Held())
        with trio.fail_after(30):
            await relay.answer(target(extra="&event=started"))
            for n in range(3):  # one torrent: the newest refresh stands for the others
                await relay.answer(target(extra=f"&n={n}"))
            await wait_for(lambda: len(tracker.batches) == 2)
        assert tracker.batches[1] == [target(extra="&n=2").partition(b"?")[2]]


async def test_started_completed_stopped_and_leechers_are_never_held() -> None:
    tracker = SeedTracker()
    async with open_relay(tracker, NodeMetrics(), refresh_s=3600) as relay:
        relay.attach(Held())
        with trio.fail_after(30):
            await relay.answer(target(extra="&event=started"))
            for extra in ("&event=completed", "&event=started", "&left=7", "&event=stopped"):
                before = len(tracker.batches)
                await relay.answer(target(extra=extra + "&n=x"))
                assert len(tracker.batches) == before + 1, extra
            # after `stopped` the torrent is no longer known as a seeder: not held
            await relay.answer(target(extra="&n=after_stopped"))
        assert tracker.batches[-1][0].endswith(b"&n=after_stopped")


async def test_a_failed_refresh_is_retried_then_given_up_to_libtorrent() -> None:
    tracker, held = SeedTracker(), Held()
    async with open_relay(tracker, NodeMetrics(), refresh_s=0.02, refresh_tries=3) as relay:
        relay.attach(held)
        with trio.fail_after(30):
            await relay.answer(target(extra="&event=started"))
            tracker.fail = True
            assert b"failure reason" not in await relay.answer(target(extra="&n=r"))
            await wait_for(lambda: held.reannounced)
            assert held.reannounced == [HELD]
            assert sum(q.endswith(b"&n=r") for q in tracker.sent()) == 3  # tried 3 times
            # libtorrent's announce now goes through, and gets the failure
            failed = await relay.answer(target(extra="&n=libtorrent"))
            assert b"no tracker answered" in reason(failed)
            tracker.fail = False
            await relay.answer(target(extra="&n=libtorrent_retry"))  # through: it failed last
        assert tracker.sent()[-1].endswith(b"&n=libtorrent_retry")


class GatedTracker(SeedTracker):
    """Holds each batch with a refresh in it until `gate` is set; logs arrivals and ends."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = trio.Event()
        self.log: list[tuple[str, bytes]] = []

    async def announce_batch(self, queries: Sequence[bytes], timeout_s: float) -> list[bytes]:
        names = b",".join(q.rpartition(b"&n=")[2] for q in queries)
        self.log.append(("sent", names))
        if any(q.endswith(b"&n=refresh") for q in queries):
            await self.gate.wait()
        answers = await super().announce_batch(queries, timeout_s)
        self.log.append(("answered", names))
        return answers


async def test_a_stopped_waits_for_its_torrent_s_refresh_already_on_its_way() -> None:
    """Sent beside it on the other sender, `stopped` could reach the tracker first,
    and the refresh after it would list the stopped seeder again."""
    tracker = GatedTracker()
    async with open_relay(tracker, NodeMetrics(), refresh_s=0.02) as relay:
        relay.attach(Held())
        with trio.fail_after(30):
            await relay.answer(target(extra="&event=started&n=started"))
            await relay.answer(target(extra="&n=refresh"))  # held, then sent on its own
            await wait_for(lambda: ("sent", b"refresh") in tracker.log)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(relay.answer, target(extra="&event=stopped&n=stopped"))
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)
                tracker.gate.set()
    assert tracker.log == [
        ("sent", b"started"), ("answered", b"started"),
        ("sent", b"refresh"), ("answered", b"refresh"),
        ("sent", b"stopped"), ("answered", b"stopped"),
    ]


def test_the_relay_listens_where_libtorrent_announces_from() -> None:
    # libtorrent announces from each listen socket, bound to its address: a node
    # listening on one address reaches a relay there, not one on 127.0.0.1.
    assert relay_host("198.18.0.10") == "198.18.0.10"
    assert relay_host("0.0.0.0") == "127.0.0.1" and relay_host("::") == "127.0.0.1"


async def test_a_connection_from_another_address_is_refused() -> None:
    """Bound to 127.0.0.2, the relay answers 127.0.0.2 only: a connection from
    127.0.0.1 (as from another host) gets a failure and reaches no tracker."""
    metrics = NodeMetrics()
    tracker = FakeTracker()
    query = target().partition(b"?")[2].decode()
    async with open_relay(tracker, metrics, "127.0.0.2") as relay:
        relay.attach(Held())
        assert relay.url.startswith("http://127.0.0.2:")
        async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(
                local_address="127.0.0.1")) as other:  # fmt: skip
            refused = await other.get(f"{relay.url}?{query}")
        async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(
                local_address="127.0.0.2")) as own:  # fmt: skip
            answered = await own.get(f"{relay.url}?{query}")
    assert b"its own address only" in reason(refused.content)
    assert answered.content == b"answer:" + query.encode()
    assert [len(b) for b in tracker.batches] == [1]
    sample = metrics.registry.get_sample_value
    assert sample("p2preg_relay_announces_total", {"result": "other_host"}) == 1


def _torrent(tmp_path: Path, name: str) -> Metainfo:
    """A small torrent of its own bytes, as the node would make it."""
    data = tmp_path / name
    data.write_bytes(name.encode() * 8_000)
    return make_metainfo(data, Digest.of(data.read_bytes()), data.stat().st_size)


async def test_a_followed_chunk_torrent_is_answered_with_its_blob_s_peers(tmp_path: Path) -> None:
    chunk = _torrent(tmp_path, "chunk")
    blob = Digest.of(b"the blob")
    info_hash = chunk.info_hash_v2[:20]
    four, six = compact_address("198.18.0.2", 6882), compact_address("2001:db8::2", 6883)
    metrics, tracker = NodeMetrics(), SeedTracker()
    async with open_relay(tracker, metrics, refresh_s=3600) as relay:
        relay.attach(Held(info_hash))
        peers = relay.answers
        with trio.fail_after(30):
            peers.follow(chunk, blob)
            first: Any = lt.bdecode(await relay.answer(target(info_hash, extra="&event=started")))
            assert first[b"peers"] == b"" and b"peers6" not in first
            peers.learn(blob, [four, six, b"bad"])
            later: Any = lt.bdecode(await relay.answer(target(info_hash, extra="&left=9")))
            assert (later[b"peers"], later[b"peers6"]) == (four, six)
            assert later[b"interval"] == localanswers.CHUNK_INTERVAL_S
            await relay.answer(target(info_hash, extra="&event=completed"))
            assert tracker.batches == []  # none of it reached the tracker
            # Forgotten (dropped after the blob): its `stopped` is still answered here...
            assert peers.forget(chunk.digest) and not peers.forget(chunk.digest)
            gone: Any = lt.bdecode(await relay.answer(target(info_hash, extra="&event=stopped")))
            assert gone[b"peers"] == b""
            assert tracker.batches == []
            # ...but anything else goes to the tracker, as for any torrent.
            await relay.answer(target(info_hash, extra="&event=started"))
            assert len(tracker.sent()) == 1
            await relay.answer(target(extra="&event=started"))  # an ordinary torrent
            assert len(tracker.sent()) == 2
    assert metrics.registry.get_sample_value(
        "p2preg_relay_announces_total", {"result": "local"}
    ) == 4


async def test_an_own_torrent_s_start_and_completion_are_answered_once_as_expected(
    tmp_path: Path,
) -> None:
    meta = _torrent(tmp_path, "own")
    info_hash = meta.info_hash_v2[:20]
    seeder = compact_address("198.18.0.3", 6882)
    tracker = SeedTracker()
    async with open_relay(tracker, NodeMetrics(), refresh_s=3600) as relay:
        relay.attach(Held(info_hash))
        answers = relay.answers
        with trio.fail_after(30):
            # A SEEDED lease answer entered the node and named `seeder`; its seed
            # confirmation will carry the completion.
            answers.expect(meta, localanswers.STARTED, [seeder], 45)
            answers.expect(meta, localanswers.COMPLETED, interval_s=1777)
            start: Any = lt.bdecode(await relay.answer(target(info_hash, extra="&event=started")))
            assert (start[b"peers"], start[b"interval"]) == (seeder, 45)
            await relay.answer(target(info_hash, extra="&left=9"))  # a re-announce: sent
            assert len(tracker.sent()) == 1
            done: Any = lt.bdecode(await relay.answer(target(info_hash, extra="&event=completed")))
            assert (done[b"peers"], done[b"interval"]) == (b"", 1777)  # a seeder's, as told
            assert len(tracker.sent()) == 1  # answered here
            await relay.answer(target(info_hash, extra="&event=started"))  # once only
            assert len(tracker.sent()) == 2
            # A download that failed takes back what it expected.
            answers.expect(meta, localanswers.COMPLETED)
            answers.unexpect(meta)
            await relay.answer(target(info_hash, extra="&event=completed"))
            assert len(tracker.sent()) == 3


async def test_a_start_waits_for_the_publish_that_decides_it(tmp_path: Path) -> None:
    meta = _torrent(tmp_path, "published")
    info_hash = meta.info_hash_v2[:20]
    downloader = compact_address("198.18.0.4", 6882)
    tracker = SeedTracker()
    async with open_relay(tracker, NodeMetrics(), refresh_s=3600) as relay:
        relay.attach(Held(info_hash))
        answers = relay.answers
        with trio.fail_after(30):
            got: list[Any] = []

            async def start() -> None:
                body = await relay.answer(target(info_hash, extra="&event=started"))
                got.append(lt.bdecode(body))

            # Seeded, and its publish under way: the start waits for it ...
            answers.deciding(meta, localanswers.STARTED)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(start)
                await trio.sleep(0.2)
                assert got == [] and tracker.sent() == []
                # ... which entered the node: answered as the announce would have been.
                answers.expect(meta, localanswers.STARTED, [downloader], 1777, (2, 1))
                answers.decided(meta, localanswers.STARTED)
            assert got[0][b"peers"] == downloader and got[0][b"interval"] == 1777
            assert (got[0][b"complete"], got[0][b"incomplete"]) == (2, 1)
            assert tracker.sent() == []
            # A publish that did not enter it (an older tracker): the start goes on.
            answers.deciding(meta, localanswers.STARTED)
            answers.decided(meta, localanswers.STARTED)
            await relay.answer(target(info_hash, extra="&event=started"))
            assert len(tracker.sent()) == 1
