"""Per-identity quotas and caps (tracker/quotas.py): the books over a clock, then
the same rules through the route table over a coordinator on a MemoryStore.

What these show: an identity past its rate is refused (429 `rate_limited`,
spending nothing) while every other identity is served as before; a bucket
refills with time and is forgotten once full; a request costs by its size;
past a long-poll cap a lease request is answered at once, not refused; past a
pre-authentication cap a connection finds no place, per address and in all.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from p2preg.core import errors, wire
from p2preg.core.config import ConfigError, HostPort
from p2preg.core.digest import Digest
from p2preg.core.pki import Identity
from tests.tracker_helpers import FakeClock, blob_meta, make_tracker
from tracker.config import TrackerConfig
from tracker.http_protocol import Request
from tracker.http_routes import TrackerHttp
from tracker.quotas import (
    COST_UNIT_BYTES,
    PRUNE_FLOOR,
    Kind,
    LongPolls,
    PreAuthConnections,
    Rate,
    RateBook,
    request_cost,
)

D = str(Digest.of(b"a blob"))


def _book(clock: FakeClock, refused: list[str] | None = None) -> RateBook:
    rates = {Kind.PUBLISH: Rate(2.0, 4), Kind.REPORT: Rate(1.0, 1), Kind.LEASE: Rate(10.0, 20)}
    return RateBook(rates, clock, (refused if refused is not None else []).append)


def test_a_burst_then_the_rate_and_nobody_elses_tokens_are_touched() -> None:
    clock, refused = FakeClock(), []
    book = _book(clock, refused)
    for _ in range(4):
        book.take(Kind.PUBLISH, "flood")
    with pytest.raises(errors.RateLimited, match=r"'flood' is over its publish quota.*0\.5 s"):
        book.take(Kind.PUBLISH, "flood")
    assert refused == ["publish"]
    # Another identity, and another kind of the same identity, are untouched.
    for _ in range(4):
        book.take(Kind.PUBLISH, "honest")
    book.take(Kind.LEASE, "flood")
    # A refusal spent nothing: half a second later exactly one more fits.
    clock.now += 0.5
    book.take(Kind.PUBLISH, "flood")
    with pytest.raises(errors.RateLimited):
        book.take(Kind.PUBLISH, "flood")
    assert refused == ["publish", "publish"]


def test_rate_limited_reads_as_the_tracker_unavailable_for_this() -> None:
    # A node falls back on TrackerUnavailable; the client maps the code back.
    assert issubclass(errors.RateLimited, errors.TrackerUnavailable)
    assert errors.BY_CODE["rate_limited"] is errors.RateLimited
    assert errors.RateLimited.status == 429


def test_requests_cost_by_size_and_one_that_cannot_fit_is_an_error() -> None:
    assert request_cost(0) == 1 and request_cost(COST_UNIT_BYTES - 1) == 1
    assert request_cost(1024 * 1024) == 17
    clock = FakeClock()
    book = _book(clock)
    book.take(Kind.LEASE, "a", cost=15)
    with pytest.raises(errors.RateLimited):
        book.take(Kind.LEASE, "a", cost=6)
    book.take(Kind.LEASE, "a", cost=5)
    with pytest.raises(ValueError, match="can never fit"):
        book.take(Kind.REPORT, "a", cost=2)


def test_full_buckets_are_forgotten_so_memory_follows_active_identities() -> None:
    clock = FakeClock()
    book = _book(clock)
    for n in range(PRUNE_FLOOR - 1):
        book.take(Kind.REPORT, f"node-{n}")
    assert len(book) == PRUNE_FLOOR - 1
    clock.now += 1.0  # every report bucket (1/s, burst 1) is full again
    book.take(Kind.REPORT, "one-more")
    assert len(book) <= 1
    # Forgetting a full bucket changes nothing: it starts full again.
    book.take(Kind.REPORT, "node-1")
    with pytest.raises(errors.RateLimited):
        book.take(Kind.REPORT, "node-1")


def test_long_polls_past_a_cap_are_answered_at_once_not_refused() -> None:
    shortened: list[None] = []
    polls = LongPolls(per_identity=2, total=3, shortened=lambda: shortened.append(None))
    with polls.hold("a", 10.0) as w1, polls.hold("a", 10.0) as w2:
        assert (w1, w2, polls.held("a"), polls.total) == (10.0, 10.0, 2, 2)
        with polls.hold("a", 10.0) as w3:
            assert w3 == 0.0  # a's own cap
        with polls.hold("b", 5.0) as w4:
            assert w4 == 5.0
            with polls.hold("c", 5.0) as w5:
                assert w5 == 0.0  # everyone's cap
        with polls.hold("c", 0.0) as w6:
            assert w6 == 0.0  # not a long poll: nothing counted
    assert (polls.total, polls.held("a"), len(shortened)) == (0, 0, 2)


def test_preauth_places_per_address_and_in_all() -> None:
    refused: list[str] = []
    book = PreAuthConnections(total=3, per_ip=2, refused=refused.append)
    a1, a2 = book.admit("10.0.0.1"), book.admit("10.0.0.1")
    assert a1 is not None and a2 is not None
    assert book.admit("10.0.0.1") is None
    b1 = book.admit("10.0.0.2")
    assert b1 is not None
    assert book.admit("10.0.0.3") is None
    assert refused == ["preauth_per_ip", "preauth_total"]
    a1.release()
    a1.release()  # a second release gives back nothing more
    assert (book.total, book.held("10.0.0.1")) == (2, 1)
    assert book.admit("10.0.0.3") is not None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"quota_lease_per_s": 0}, "quota_lease_per_s must be > 0"),
        ({"quota_publish_burst": 16}, "quota_publish_burst must be ≥ 17"),
        ({"metainfo_idle_expiry_s": 3599}, "at least twice seeder_announce_interval_s"),
        ({"pinned_digests": ("sha256:nothex",)}, "pinned_digests"),
        ({"max_preauth_connections_per_ip": 9, "max_preauth_connections": 8}, "per_ip"),
        ({"max_long_polls_per_identity": 0}, "max_long_polls_per_identity"),
    ],
)
def test_bad_quota_settings_are_clear_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrackerConfig(listen=HostPort("127.0.0.1", 0), **kwargs)  # type: ignore[arg-type]


# -- through the routes -------------------------------------------------------------


def _request(path: str, message: wire.Message, who: str | None = None) -> Request:
    identity = None if who is None else Identity("test", "node", who)
    return Request(b"POST", path.encode(), (), wire.encode(message), "10.0.0.7", identity)


def _lease(node: str, digest: str = D, wait_s: float = 0.0) -> Request:
    return _request(f"/v1/leases/{digest}", wire.LeaseRequest(node, 10, wait_s), node)


async def test_a_tracker_full_for_one_identity_is_open_for_the_others(tmp_path: Path) -> None:
    tracker = make_tracker(tmp_path, quota_lease_per_s=0.001, quota_lease_burst=3)
    http = TrackerHttp(tracker)
    for n in range(3):
        ok = await http.handle(_lease("flood", str(Digest.of(b"%d" % n))))
        assert ok.status == 200
    refused = await http.handle(_lease("flood", str(Digest.of(b"more"))))
    assert refused.status == 429
    reply = wire.decode(wire.ErrorReply, refused.body)
    assert reply.error == "rate_limited" and "'flood' is over its lease quota" in reply.message
    # The others are served as if nothing happened: granted, then told to wait.
    granted = wire.decode(wire.LeaseReply, (await http.handle(_lease("honest"))).body)
    waiting = wire.decode(wire.LeaseReply, (await http.handle(_lease("other"))).body)
    assert granted.status is wire.LeaseStatus.GRANTED and granted.holder == "honest"
    assert waiting.status is wire.LeaseStatus.WAIT
    text = tracker.metrics.render().decode()
    assert 'p2preg_tracker_quota_refusals_total{kind="lease"} 1.0' in text


async def test_a_forged_big_metainfo_costs_more_than_an_honest_one(tmp_path: Path) -> None:
    tracker = make_tracker(tmp_path, quota_publish_per_s=0.001, quota_publish_burst=17)
    http = TrackerHttp(tracker)
    meta = blob_meta(tmp_path)
    # Only the holder of the digest's upstream lease files its first torrent.
    await tracker.acquire_lease(str(meta.digest), wire.LeaseRequest("a", meta.size))
    honest = wire.PublishMetainfo("a", meta.size, meta.data)
    put = _request(f"/v1/metainfo/{meta.digest}", honest, "a")
    put = Request(b"PUT", put.target, (), put.body, put.client_ip, put.identity)
    assert (await http.handle(put)).status == 201
    # A body of a MiB costs 17 tokens: 16 are left, so it is refused before it is parsed.
    big = wire.PublishMetainfo("a", meta.size, b"x" * (1024 * 1024))
    forged = _request(f"/v1/metainfo/{meta.digest}", big, "a")
    answer = await http.handle(Request(b"PUT", forged.target, (), forged.body, "10.0.0.7",
                                       forged.identity))
    assert answer.status == 429
    text = tracker.metrics.render().decode()
    assert 'p2preg_tracker_metainfo_rejected_total{code="invalid_metainfo"}' not in text


async def test_past_its_long_poll_cap_an_identity_is_answered_at_once(tmp_path: Path) -> None:
    tracker = make_tracker(tmp_path, max_long_polls_per_identity=1, max_long_polls=2)
    http = TrackerHttp(tracker)
    assert (await http.handle(_lease("holder"))).status == 200  # the others wait for it
    held: list[str] = []

    async def poll(node: str) -> None:
        await http.handle(_lease(node, wait_s=20.0))
        held.append(node)  # reached only if the poll ended

    async with trio.open_nursery() as nursery:
        nursery.start_soon(poll, "a")
        await trio.testing.wait_all_tasks_blocked()
        assert tracker.quotas.long_polls.total == 1
        # a's second poll is answered now, while its first is still held ...
        again = await http.handle(_lease("a", wait_s=20.0))
        assert wire.decode(wire.LeaseReply, again.body).status is wire.LeaseStatus.WAIT
        # ... and b still gets its long poll.
        nursery.start_soon(poll, "b")
        await trio.testing.wait_all_tasks_blocked()
        assert tracker.quotas.long_polls.total == 2 and held == []
        text = tracker.metrics.render().decode()
        assert "p2preg_tracker_long_polls 2.0" in text
        assert "p2preg_tracker_long_polls_shortened_total 1.0" in text
        nursery.cancel_scope.cancel()
    assert tracker.quotas.long_polls.total == 0
