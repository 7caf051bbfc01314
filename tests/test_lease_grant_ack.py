"""A grant is provisional until its holder acknowledges it (`lease_grant_ack_s`).

The LeaseBook over a hand-moved clock: a grant with no renewal within the ack
window is passed to the next asker as a silent holder's is (its image's slot
freed, the reason told to the old holder, whose copy may still file the
torrent), at most once per blob per rate window; an acknowledged grant, or one
acknowledged late but before anyone asked, is kept until the silence. Then a
real tracker process and the node's real `Renewals` over the real client: a
holder that renews at once is never passed over, and a waiter handed a grant
that it drops (a node that died with its request held) is passed over within
the ack window, long before a silence set far away.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio

from harness.node import metric_value
from harness.tracker import open_tracker
from p2preg.core.digest import Digest
from p2preg.core.errors import LeaseLost
from p2preg.core.wire import LeaseReply, LeaseStatus
from p2preg.node.holding import Renewals
from p2preg.node.leasewait import FetchAsHolder
from tests.tracker_helpers import FakeClock
from tracker.client import TrackerClient
from tracker.leases import SILENCE_CHECKS, Granted, Held, LeaseBook, RateRule

D = "sha256:" + "6a" * 32
IMAGE = "sha256:" + "22" * 32
SIZE = 64 << 20
TTL = 30.0
SILENCE = 2.5
ACK = 0.5
RATE = RateRule(min_bytes_s=256 << 10, window_s=30.0)


def book(clock: FakeClock, ack_s: float = ACK) -> LeaseBook:
    return LeaseBook(TTL, clock, rate=RATE, silence_s=SILENCE, grant_ack_s=ack_s)


def test_a_grant_not_acknowledged_passes_on_after_the_ack_window_and_frees_its_slot() -> None:
    clock = FakeClock()
    b = book(clock)
    granted = b.acquire(D, "dead", SIZE, group=IMAGE).lease  # into a long poll nobody reads
    assert not granted.acked and b.fetching(IMAGE) == [granted]
    clock.now += ACK - 0.01
    assert isinstance(b.acquire(D, "b", SIZE), Held) and b.turned_silent() == []
    clock.now += 0.01
    assert b.fetching(IMAGE) == []  # the image's next blob may start
    assert b.turned_silent() == [granted]
    taken = b.acquire(D, "b", SIZE, group=IMAGE)
    assert isinstance(taken, Granted) and taken.replaced == granted
    with pytest.raises(LeaseLost, match=r"not acknowledged within 0.5 s \(lease_grant_ack_s\)"):
        b.renew(D, granted.lease_id, 0, SIZE, holder="dead")
    # Only paused after all: the copy it may still finish counts (first torrent wins).
    assert b.passed_from(D, "dead") and b.replacements == 1


def test_an_acknowledged_grant_is_kept_until_the_silence() -> None:
    clock = FakeClock()
    b = book(clock)
    lease = b.acquire(D, "a", SIZE).lease
    clock.now += 0.01
    lease = b.renew(D, lease.lease_id, 0, SIZE, holder="a")  # the node's renewal at once
    assert lease.acked
    clock.now += SILENCE - 0.01
    assert isinstance(b.acquire(D, "b", SIZE), Held) and b.turned_silent() == []
    clock.now += 0.01
    assert isinstance(b.acquire(D, "b", SIZE), Granted)  # the silence rule, as before


def test_a_late_acknowledgement_before_anyone_asked_keeps_the_lease() -> None:
    clock = FakeClock()
    b = book(clock)
    lease = b.acquire(D, "a", SIZE).lease
    clock.now += ACK * 3  # the holder's renewal was slow, and nobody else wanted the blob
    lease = b.renew(D, lease.lease_id, 10, SIZE, holder="a")
    assert lease.acked and not b.is_silent(lease)
    assert isinstance(b.acquire(D, "b", SIZE), Held)
    assert b.replacements == 0


def test_a_second_unacknowledged_grant_is_not_passed_on_within_the_window() -> None:
    clock = FakeClock()
    b = book(clock)
    b.acquire(D, "dead", SIZE)
    clock.now += ACK
    second = b.acquire(D, "b", SIZE)
    assert isinstance(second, Granted)
    for _ in range(10):  # b does not acknowledge either: one handover per window
        clock.now += ACK * 2
        assert isinstance(b.acquire(D, "c", SIZE), Held)
    assert b.replacements == 1


def test_the_checks_follow_the_shorter_span_and_a_restored_lease_counts_as_acknowledged() -> None:
    clock = FakeClock()
    assert book(clock).check_every_s == ACK / SILENCE_CHECKS
    assert book(clock, ack_s=0.0).check_every_s == SILENCE / SILENCE_CHECKS
    assert LeaseBook(TTL, clock).check_every_s == 0.0
    unacked = book(clock).acquire(D, "a", SIZE).lease
    assert not unacked.acked
    other = book(clock)
    other.restore(unacked)  # a standby taking the term: the holder's ack may have gone to the last
    clock.now += ACK * 2
    assert other.turned_silent() == [] and isinstance(other.acquire(D, "b", SIZE), Held)
    # Without an ack window grants are firm at once (older behaviour).
    assert book(clock, ack_s=0.0).acquire(D, "a", SIZE).lease.acked


# -- a real tracker process, the node's real renewals ----------------------------------


async def _replacements(url: str) -> float:
    async with httpx.AsyncClient(timeout=10, trust_env=False) as http:
        text = (await http.get(f"{url}/metrics")).text
    return metric_value(text, "p2preg_tracker_lease_replacements_total")


async def test_a_holder_acks_at_once_and_a_grant_dropped_by_a_waiter_is_passed_over(
    tmp_path: Path,
) -> None:
    digest = Digest.parse(D)
    # The silence set far beyond every wait below: only the ack rule can pass a lease on.
    args = ["--lease-grant-ack-s", str(ACK), "--lease-silence-s", "20"]
    with open_tracker(tmp_path / "tracker", args=args) as t:
        a, dead, b = (TrackerClient(t.url, node=n) for n in ("a", "dead", "b"))
        try:
            held = await a.acquire_lease(digest, size=SIZE)
            assert held.status is LeaseStatus.GRANTED and held.lease_id
            renewals = Renewals(a, digest, FetchAsHolder(held.lease_id, held.ttl_s,
                                                         silence_s=held.silence_s), SIZE)
            assert await renewals.acknowledge()  # as fetch.py does before any upstream byte
            async with trio.open_nursery() as nursery:
                nursery.start_soon(renewals.run)  # the node's own cadence
                # b long-polls for 4 ack windows and is never handed a's live lease.
                reply = await b.acquire_lease(digest, size=SIZE, wait_s=4 * ACK)
                assert reply.status is LeaseStatus.WAIT and reply.holder == "a"
                # dead asks and stays (a long poll); a finishes and releases.
                got: list[LeaseReply] = []

                async def dead_asks() -> None:
                    got.append(await dead.acquire_lease(digest, size=SIZE, wait_s=15))

                nursery.start_soon(dead_asks)
                await trio.sleep(ACK)  # dead's request is held at the tracker
                renewals.stop()
                await a.release_lease(digest, held.lease_id)
            grant = got[0]
            assert grant.status is LeaseStatus.GRANTED and grant.lease_id
            assert await _replacements(t.url) == 0  # a, acknowledging, was never passed over
            # dead drops the answer. b, asking now for at most 10 s (the silence is
            # 20 s), is handed the fetch: the grant was never acknowledged.
            taken = await b.acquire_lease(digest, size=SIZE, wait_s=10)
            assert taken.status is LeaseStatus.GRANTED and taken.replaced == "dead"
            with pytest.raises(LeaseLost, match="not acknowledged"):
                await dead.renew_lease(digest, grant.lease_id, 0, SIZE)
            # A node that was only slow learns it from its acknowledgement, before
            # fetching anything: it waits again (fetch.py), no second upstream copy.
            late = FetchAsHolder(grant.lease_id, grant.ttl_s, silence_s=grant.silence_s)
            assert not await Renewals(dead, digest, late, SIZE).acknowledge()
            assert await _replacements(t.url) == 1
        finally:
            for client in (a, dead, b):
                await client.aclose()
