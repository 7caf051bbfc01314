"""The tracker's tag book (tracker/tags.py) and where it is kept.

The book alone: the last report wins, the book and each reporter's share of it
stay bounded, malformed reports are refused. Through the coordinator over
SQLite: answers survive a reopen, and the keys the bounds dropped are gone from
the file too. Over HTTP: only a caller with the cluster token reports or asks,
and under mutual TLS a node reports only as itself. On Redis (real
redis-server, real replica processes): a write without the term is refused and
changes nothing, and a standby that takes the term over answers what the dead
replica was told.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from harness.redis import start_redis
from p2preg.core import errors, wire
from p2preg.core.digest import Digest
from p2preg.core.pki import Identity
from tests.replica_helpers import replicas, serving
from tests.test_tracker_redis_store import store_on
from tests.test_tracker_replicas import crash
from tests.tracker_helpers import make_tracker
from tracker.client import open_tracker_client
from tracker.http_protocol import Request
from tracker.http_routes import TrackerHttp
from tracker.redis_store import LEADER_KEY
from tracker.state import StoredTag, open_sqlite_store
from tracker.tags import TagBook, checked, key_of

D1, D2 = (str(Digest.of(x)) for x in (b"one", b"two"))
ACCEPT = "application/vnd.oci.image.index.v1+json"
TOKEN = "tags-token"


def seen(tag: str, digest: str = D1, node: str = "n1", accept: str = ACCEPT) -> wire.TagSeen:
    return wire.TagSeen(node, "seed.test", "edge/app", tag, digest, accept)


def query(tag: str, accept: str = ACCEPT) -> wire.TagQuery:
    return wire.TagQuery("n9", "seed.test", "edge/app", tag, accept)


def test_the_last_report_wins_and_the_book_stays_bounded() -> None:
    book = TagBook(max_entries=3)
    assert book.put(checked(seen("a"), "n1", 10.0)) == []
    assert book.put(checked(seen("a", D2, node="n2"), "n2", 20.0)) == []
    answer = book.answer(key_of(checked(seen("a"), "n1", 0)), 25.0)
    assert answer == wire.TagAnswer(D2, 5.0, "n2")
    # Another Accept is another answer: a schema2-only client never gets an index.
    other_accept = checked(seen("a", accept=""), "n1", 0)
    assert book.answer(key_of(other_accept), 25.0) == wire.TagAnswer()
    for n, tag in enumerate(("b", "c", "d")):
        dropped = book.put(checked(seen(tag), "n1", 30.0 + n))
    assert len(book) == 3
    assert dropped == [("seed.test", "edge/app", "a", ACCEPT)]  # the least recently reported
    # A clock that went back gives an age of 0, not a negative one.
    assert book.answer(("seed.test", "edge/app", "d", ACCEPT), 0.0).age_s == 0.0


def test_one_node_cannot_push_out_what_others_reported() -> None:
    book = TagBook(max_entries=100, max_per_node=2)
    book.put(checked(seen("honest"), "n1", 1.0))
    for n in range(10):
        book.put(checked(seen(f"junk{n}", node="mallory"), "mallory", 2.0 + n))
    assert len(book) == 3
    assert book.get(("seed.test", "edge/app", "honest", ACCEPT)) is not None
    assert book.get(("seed.test", "edge/app", "junk9", ACCEPT)) is not None
    assert book.get(("seed.test", "edge/app", "junk0", ACCEPT)) is None


@pytest.mark.parametrize(
    ("message", "complaint"),
    [
        (wire.TagSeen("n1", "seed.test", "Edge/App", "a", D1), "repository name"),
        (wire.TagSeen("n1", "seed.test", "edge/app", "-a", D1), "invalid tag"),
        (wire.TagSeen("n1", "seed.test", "edge/app", "a", "sha256:12"), "digest"),
        (wire.TagSeen("n1", "seed/test", "edge/app", "a", D1), "host name"),
        (wire.TagSeen("n1", "seed.test", "edge/app", "a", D1, "x" * 3000), "accept"),
        (wire.TagSeen("n1", "seed.test", "edge/app", "a", D1, "a/b\n"), "accept"),
    ],
)
def test_a_malformed_report_is_refused(message: wire.TagSeen, complaint: str) -> None:
    with pytest.raises(errors.InvalidRequest, match=complaint):
        checked(message, "n1", 1.0)


async def test_answers_survive_a_reopen_and_dropped_ones_leave_the_file(tmp_path: Path) -> None:
    async with open_sqlite_store(tmp_path) as store:
        t = make_tracker(tmp_path, store, max_tag_answers=2)
        t.restore(await store.load())
        for tag in ("a", "b", "c"):
            await t.tag_seen(seen(tag), identity="n1")
        assert t.tag_query(query("a")).digest is None
        assert t.tag_query(query("c")).digest == D1
        counts = {r: c._value.get() for r, c in t.metrics.tag_answers.items()}
        assert counts == {"answered": 1, "unknown": 1}
        assert t.metrics.tag_reports._value.get() == 3
    async with open_sqlite_store(tmp_path) as store:
        snapshot = await store.load()
        assert sorted(s.tag for s in snapshot.tags) == ["b", "c"]
        again = make_tracker(tmp_path, store, max_tag_answers=2)
        again.restore(snapshot)
        answer = again.tag_query(query("c"))
        assert answer.digest == D1 and answer.reported_by == "n1" and answer.age_s >= 0


def _request(target: str, body: bytes, *, token: str | None = TOKEN,
             identity: Identity | None = None) -> Request:  # fmt: skip
    headers = () if token is None else ((b"authorization", f"Bearer {token}".encode()),)
    method = b"PUT" if target == "/v1/tags" else b"POST"
    return Request(method, target.encode(), headers, body, "10.0.0.7", identity)


async def test_only_the_cluster_reports_or_asks_and_a_node_only_as_itself(
    tmp_path: Path,
) -> None:
    http = TrackerHttp(make_tracker(tmp_path, token=TOKEN))
    report, ask = wire.encode(seen("a")), wire.encode(query("a"))
    assert (await http.handle(_request("/v1/tags", report, token=None))).status == 401
    assert (await http.handle(_request("/v1/tags/query", ask, token="wrong"))).status == 401
    assert (await http.handle(_request("/v1/tags", report))).status == 204
    answered = await http.handle(_request("/v1/tags/query", ask))
    assert wire.decode(wire.TagAnswer, answered.body).digest == D1
    bad = await http.handle(_request("/v1/tags", wire.encode(seen("-a"))))
    assert bad.status == 400
    # Under mutual TLS the certificate names the node; a report naming another is refused.
    tls = TrackerHttp(make_tracker(tmp_path / "tls"))
    mallory = Identity("edge", "node", "mallory")
    forged = await tls.handle(_request("/v1/tags", report, token=None, identity=mallory))
    assert forged.status == 403
    honest = wire.encode(seen("a", D2, node="mallory"))
    assert (await tls.handle(_request("/v1/tags", honest, token=None, identity=mallory))).status \
        == 204
    record = tls.tracker.tags.get(("seed.test", "edge/app", "a", ACCEPT))
    assert record is not None and record.reported_by == "mallory"


@pytest.mark.integration
async def test_a_write_without_the_term_changes_nothing(tmp_path: Path) -> None:
    tag = StoredTag("seed.test", "edge/app", "a", ACCEPT, D1, "n1", 1.0)
    with start_redis(tmp_path / "redis", password="store-test-password") as server:
        async with store_on(server, tmp_path) as store:
            await store.put_tag(tag, [])
            moved = StoredTag("seed.test", "edge/app", "b", ACCEPT, D2, "n1", 2.0)
            await store.put_tag(moved, [key_of(tag)])
            assert (await store.load()).tags == [moved]
            server.cli("SET", LEADER_KEY, "8:replica-b")  # another replica took the term
            with pytest.raises(errors.TrackerUnavailable):
                await store.put_tag(tag, [key_of(moved)])
            assert (await store.load()).tags == [moved]


@pytest.mark.integration
@pytest.mark.slow
async def test_a_standby_that_takes_the_term_answers_what_the_dead_one_heard(
    tmp_path: Path,
) -> None:
    password = "tags-store-password"
    with (
        start_redis(tmp_path / "redis", password=password) as server,
        replicas(tmp_path, server.url(), 2, token=TOKEN, password=password) as trackers,
    ):
        first = serving(trackers)
        urls = [t.url for t in trackers]
        async with open_tracker_client(urls, node="n1", token=TOKEN) as n1:
            await n1.report_tag("seed.test", "edge/app", "latest", Digest.parse(D1), ACCEPT)
        crash(first)
        took_over = serving(trackers)
        assert took_over is not first
        async with open_tracker_client(urls, node="n2", token=TOKEN) as n2:
            answer = await n2.query_tag("seed.test", "edge/app", "latest", ACCEPT)
            assert answer.digest == D1 and answer.reported_by == "n1"
            assert 0 <= answer.age_s < time.time()
            none = await n2.query_tag("seed.test", "edge/app", "other", ACCEPT)
            assert none == wire.TagAnswer()
