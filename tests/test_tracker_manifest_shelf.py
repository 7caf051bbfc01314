"""The manifest shelf (tracker/manifest_shelf.py), its routes and its SQLite store.

The shelf alone: bodies are checked against their digest, bounded in count
and bytes with the least recently used going first, and keep at most
MAX_PLACES places, newest first. Through `TrackerHttp` over a coordinator:
201 for a new body, 200 for a known one, a clear 4xx for each kind of bad
input (the shelf unchanged), 404 `not_found` for a digest nobody put. Through
SQLite: what one tracker shelved, and only that, the next one serves after a
reopen; and the node's `TrackerClient` against a served tracker, restarted in
between; and the single flight: nodes waiting on a manifest's lease are all
answered SEEDED by the put. (Redis: tests/test_tracker_redis_store.py.)
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable
from pathlib import Path

import pytest
import trio
import trio.testing

from p2preg.core import errors, wire
from p2preg.core.digest import Digest
from tests.tracker_helpers import make_tracker, running_tracker
from tracker.client import open_tracker_client
from tracker.http_protocol import BodyLimit, HttpConnection, Refusal, Request
from tracker.http_routes import TrackerHttp
from tracker.manifest_shelf import MAX_MANIFEST_BYTES, MAX_PLACES, ManifestShelf, check_put
from tracker.state import open_sqlite_store

TOKEN = "t0ken"
OCI = "application/vnd.oci.image.manifest.v1+json"


def body(n: int, size: int = 100) -> bytes:
    return (b'{"n": %d}' % n).ljust(size, b" ")


def put_msg(data: bytes, *, ns: str = "127.0.0.1:5000", repo: str = "library/app",
            media_type: str = OCI, node: str = "n1") -> wire.PutManifest:  # fmt: skip
    return wire.PutManifest(node, ns, repo, media_type, data)


def shelve(shelf: ManifestShelf, data: bytes, place: str = "r/a", at: float = 1.0) -> str:
    digest = str(Digest.of(data))
    shelf.put(digest, OCI, data, place, at)
    return digest


# -- the shelf alone ------------------------------------------------------------------


def test_a_body_must_hash_to_its_digest_and_fit() -> None:
    data = body(1)
    assert check_put(str(Digest.of(data)), put_msg(data)) == "127.0.0.1:5000/library/app"
    sha512 = "sha512:" + hashlib.sha512(data).hexdigest()
    assert check_put(sha512, put_msg(data)) == "127.0.0.1:5000/library/app"
    with pytest.raises(errors.InvalidManifest, match="hashes to"):
        check_put(str(Digest.of(b"other")), put_msg(data))
    with pytest.raises(errors.InvalidRequest, match="unsupported digest algorithm"):
        check_put("md5:" + hashlib.md5(data).hexdigest(), put_msg(data))
    big = b" " * (MAX_MANIFEST_BYTES + 1)
    with pytest.raises(errors.ManifestTooLarge):
        check_put(str(Digest.of(big)), put_msg(big))
    digest = str(Digest.of(data))
    for bad in (put_msg(data, ns="a/b"), put_msg(data, repo="Upper/Case"),
                put_msg(data, media_type="json")):  # fmt: skip
        with pytest.raises(errors.InvalidRequest):
            check_put(digest, bad)


def test_the_least_recently_used_goes_first_past_the_count() -> None:
    shelf = ManifestShelf(max_count=3, max_bytes=10_000)
    a, b, c = (shelve(shelf, body(n)) for n in range(3))
    assert shelf.get(a) is not None  # a is now the most recently used
    d = shelve(shelf, body(3))
    assert shelf.get(b) is None and len(shelf) == 3
    assert all(shelf.get(x) is not None for x in (a, c, d))
    assert shelf.drops() == [b]
    shelf.committed([b])
    assert shelf.drops() == []


def test_bytes_are_bounded_and_a_body_larger_than_the_shelf_is_refused() -> None:
    shelf = ManifestShelf(max_count=100, max_bytes=1000)
    first = [shelve(shelf, body(n, 300)) for n in range(3)]
    assert shelf.bytes == 900
    shelve(shelf, body(9, 300))
    assert shelf.bytes == 900 and shelf.get(first[0]) is None
    huge = body(10, 1001)
    with pytest.raises(errors.ManifestTooLarge, match="larger than the whole shelf"):
        shelf.put(str(Digest.of(huge)), OCI, huge, "r/a", 1.0)
    assert shelf.bytes == 900 and len(shelf) == 3


def test_places_are_newest_first_and_bounded() -> None:
    shelf = ManifestShelf(max_count=10, max_bytes=10_000)
    data = body(1)
    digest = str(Digest.of(data))
    first = shelf.put(digest, OCI, data, "r/p0", 1.0)
    assert first.created and first.changed
    for n in range(1, MAX_PLACES + 5):
        put = shelf.put(digest, OCI, data, f"r/p{n}", 1.0 + n)
        assert not put.created and put.changed
    record = shelf.get(digest)
    assert record is not None and len(record.places) == MAX_PLACES
    assert record.places[0] == f"r/p{MAX_PLACES + 4}"
    again = shelf.put(digest, OCI, data, f"r/p{MAX_PLACES + 4}", 99.0)
    assert not again.changed  # nothing to commit
    moved = shelf.put(digest, OCI, data, "r/p10", 100.0)
    assert moved.changed and moved.record.places[:2] == ("r/p10", f"r/p{MAX_PLACES + 4}")


def test_restore_keeps_the_newest_within_the_bounds() -> None:
    full = ManifestShelf(max_count=10, max_bytes=10_000)
    digests = [shelve(full, body(n), at=float(n)) for n in range(5)]
    records = [r for r in (full.get(d) for d in digests) if r is not None]
    small = ManifestShelf(max_count=2, max_bytes=10_000)
    small.restore(reversed(records))
    assert [small.get(d) is not None for d in digests] == [False, False, False, True, True]
    assert small.drops() == sorted(digests[:3])


# -- routes -----------------------------------------------------------------------------


def request(method: bytes, digest: str, message: wire.Message | None = None) -> Request:
    headers = ((b"authorization", f"Bearer {TOKEN}".encode()),)
    content = b"" if message is None else wire.encode(message)
    return Request(method, f"/v1/manifests/{digest}".encode(), headers, content, "10.0.0.7")


def error_of(status: int, reply_body: bytes) -> tuple[int, str]:
    return status, wire.decode(wire.ErrorReply, reply_body).error


async def test_put_then_get_and_every_bad_input_refused(tmp_path: Path) -> None:
    tracker = make_tracker(tmp_path, token=TOKEN)
    http = TrackerHttp(tracker)
    data = body(1)
    digest = str(Digest.of(data))
    missing = await http.handle(request(b"GET", digest))
    assert error_of(missing.status, missing.body) == (404, "not_found")
    assert (await http.handle(request(b"PUT", digest, put_msg(data)))).status == 201
    again = await http.handle(request(b"PUT", digest, put_msg(data, repo="other/app")))
    assert again.status == 200
    got = await http.handle(request(b"GET", digest))
    reply = wire.decode(wire.ManifestBody, got.body)
    assert (reply.media_type, reply.body) == (OCI, data)
    assert reply.places == ["127.0.0.1:5000/other/app", "127.0.0.1:5000/library/app"]
    other = str(Digest.of(b"other"))
    big = b" " * (MAX_MANIFEST_BYTES + 1)
    cases = [
        (other, put_msg(data), (422, "invalid_manifest")),
        ("md5:" + hashlib.md5(data).hexdigest(), put_msg(data), (400, "invalid_request")),
        (str(Digest.of(big)), put_msg(big), (413, "manifest_too_large")),
        (digest, put_msg(data, ns="a b"), (400, "invalid_request")),
        (digest, put_msg(data, node="n" * 129), (400, "invalid_request")),
    ]
    for target, msg, expected in cases:
        refused = await http.handle(request(b"PUT", target, msg))
        assert error_of(refused.status, refused.body) == expected, (target, msg.ns)
    not_msgpack = Request(b"PUT", f"/v1/manifests/{digest}".encode(),
                          ((b"authorization", f"Bearer {TOKEN}".encode()),), b"\xc1", "10.0.0.7")
    bad = await http.handle(not_msgpack)
    assert error_of(bad.status, bad.body) == (400, "invalid_request")
    assert len(tracker.manifests) == 1
    text = tracker.metrics.render().decode()
    assert 'p2preg_tracker_manifest_lookups_total{result="hit"} 1.0' in text
    assert 'p2preg_tracker_manifest_lookups_total{result="miss"} 1.0' in text
    assert "p2preg_tracker_manifests 1.0" in text


async def test_puts_are_charged_to_the_publish_quota(tmp_path: Path) -> None:
    tracker = make_tracker(tmp_path, token=TOKEN, quota_publish_per_s=0.001,
                           quota_publish_burst=70)  # fmt: skip
    http = TrackerHttp(tracker)
    answers = []
    for n in range(3):
        data = body(n, 2 * 1024 * 1024)  # 33 tokens each
        answers.append(await http.handle(request(b"PUT", str(Digest.of(data)), put_msg(data))))
    assert [a.status for a in answers] == [201, 201, 429]
    assert wire.decode(wire.ErrorReply, answers[2].body).error == "rate_limited"


# -- SQLite ---------------------------------------------------------------------------------


async def test_the_shelf_survives_a_restart_without_what_it_dropped(tmp_path: Path) -> None:
    datas = [body(n) for n in range(3)]
    async with open_sqlite_store(tmp_path) as store:
        tracker = make_tracker(tmp_path, store, max_manifests=2)
        for data in datas:
            await tracker.put_manifest(str(Digest.of(data)), put_msg(data))
        assert tracker.manifests.drops() == []
    async with open_sqlite_store(tmp_path) as store:
        snapshot = await store.load()
        assert sorted(m.digest for m in snapshot.manifests) == sorted(
            str(Digest.of(d)) for d in datas[1:]
        )
        fresh = make_tracker(tmp_path, store, max_manifests=2)
        fresh.restore(snapshot)
        got = fresh.get_manifest(str(Digest.of(datas[2])))
        assert got == wire.ManifestBody(OCI, datas[2], ["127.0.0.1:5000/library/app"])
        with pytest.raises(errors.NotFound):
            fresh.get_manifest(str(Digest.of(datas[0])))


# -- the node's client, over sockets ------------------------------------------------------


async def test_the_client_puts_and_gets_across_a_tracker_restart(tmp_path: Path) -> None:
    data = body(7, 3 * 1024 * 1024)  # over max_metainfo_bytes: the body limit covers it
    digest = Digest.of(data)
    async with (
        running_tracker(tmp_path, token=TOKEN) as url,
        open_tracker_client(url, node="n1", token=TOKEN) as client,
    ):
        assert await client.get_manifest(digest) is None
        await client.put_manifest(digest, "127.0.0.1:5000", "library/app", OCI, data)
        with pytest.raises(errors.InvalidManifest):
            await client.put_manifest(Digest.of(b"x"), "127.0.0.1:5000", "a", OCI, data)
    async with (
        running_tracker(tmp_path, token=TOKEN) as url,
        open_tracker_client(url, node="n2", token=TOKEN) as client,
    ):
        got = await client.get_manifest(digest)
    assert got == wire.ManifestBody(OCI, data, ["127.0.0.1:5000/library/app"])


def test_only_the_manifest_route_takes_a_body_of_megabytes(tmp_path: Path) -> None:
    limit = TrackerHttp(make_tracker(tmp_path, token=TOKEN)).max_body_bytes
    assert isinstance(limit, BodyLimit)
    head = b"PUT %s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n"
    for target, refused in ((b"/v1/manifests/sha256:ab", False), (b"/v1/metainfo/sha256:ab", True)):
        conn = HttpConnection("10.0.0.7", limit)
        conn.receive(head % (target, MAX_MANIFEST_BYTES))
        assert isinstance(conn.next_request(), Refusal) is refused, target
    conn = HttpConnection("10.0.0.7", limit)
    conn.receive(head % (b"/v1/manifests/sha256:ab", MAX_MANIFEST_BYTES + 65 * 1024 + 1))
    assert isinstance(conn.next_request(), Refusal)


# -- the lease: one node fetches, the others wait and take the body from the shelf ----------


async def test_waiters_on_a_manifest_lease_are_woken_by_the_put(tmp_path: Path) -> None:
    tracker = make_tracker(tmp_path)
    data = body(3)
    digest = str(Digest.of(data))

    def ask(node: str, wait_s: float = 0.0) -> wire.LeaseRequest:
        return wire.LeaseRequest(node, None, wait_s, manifest=True)

    holder = await tracker.acquire_lease(digest, ask("n1"))
    assert holder.status is wire.LeaseStatus.GRANTED and holder.lease_id is not None
    replies: list[wire.LeaseReply] = []
    async with trio.open_nursery() as nursery:
        for node in ("n2", "n3", "n4"):
            nursery.start_soon(
                lambda n: _append(replies, tracker.acquire_lease(digest, ask(n, 20.0))), node
            )
        await trio.testing.wait_all_tasks_blocked()
        assert replies == []  # all three wait on n1's lease
        assert await tracker.put_manifest(digest, put_msg(data, node="n1"))
    assert [r.status for r in replies] == [wire.LeaseStatus.SEEDED] * 3
    assert all(r.metainfo is None for r in replies)
    await tracker.release_lease(digest, wire.LeaseRelease(holder.lease_id, "n1"), identity="n1")
    # A blob request for the same digest knows nothing of the shelf: it is granted.
    blob = await tracker.acquire_lease(digest, wire.LeaseRequest("n5", None, 0.0))
    assert blob.status is wire.LeaseStatus.GRANTED


async def _append(
    into: list[wire.LeaseReply], call: Awaitable[wire.LeaseReply]
) -> None:
    into.append(await call)
