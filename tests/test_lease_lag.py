"""The lease windows forgive the tracker's own lag: a tracker behind takes no live holder over.

The LeaseBook over a hand-moved clock with a given lag L: a holder silent for
`silence_s` + L - ε keeps its lease, at + ε the next asker takes it over; the
same for a grant not acknowledged within `grant_ack_s` + L. The `LagMeter`
holds the largest oversleep for `hold_s`, bounded. Then a real tracker process
stopped (SIGSTOP) for longer than the silence while its holder keeps renewing
on schedule: after SIGCONT the holder is not taken over by an asker whose
request waited behind the stall, and the lag metrics show the stall.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import pytest
import trio

from harness.node import metric_value
from harness.tracker import open_tracker
from p2preg.core.digest import Digest
from p2preg.core.wire import LeaseReply, LeaseStatus
from tests.tracker_helpers import FakeClock
from tracker.client import TrackerClient
from tracker.lagmeter import LagMeter
from tracker.leases import Granted, Held, LeaseBook, RateRule

D = "sha256:" + "7a" * 32
SIZE = 64 << 20
TTL = 30.0
SILENCE = 2.5
ACK = 0.5
LAG = 3.0
EPS = 0.01
RATE = RateRule(min_bytes_s=256 << 10, window_s=30.0)


def book(clock: FakeClock, lag: float) -> LeaseBook:
    return LeaseBook(
        TTL, clock, rate=RATE, silence_s=SILENCE, grant_ack_s=ACK, lag=lambda: lag
    )


@pytest.mark.parametrize("lag", [0.0, LAG])
def test_a_silent_holder_is_taken_over_only_after_the_silence_plus_the_tracker_lag(
    lag: float,
) -> None:
    clock = FakeClock()
    b = book(clock, lag)
    first = b.acquire(D, "a", SIZE).lease
    b.renew(D, first.lease_id, 1 << 20, SIZE, holder="a")  # acknowledged
    clock.now += SILENCE + lag - EPS
    # Quiet for the plain window: its image's slot is free, the lease still its own.
    assert isinstance(b.acquire(D, "b", SIZE), Held)
    assert b.turned_silent() == ([b.current(D)] if lag else [])
    clock.now += 2 * EPS
    assert b.turned_silent() == [b.current(D)]  # silent: now it may be taken over
    taken = b.acquire(D, "b", SIZE)
    assert isinstance(taken, Granted) and taken.replaced is not None
    assert taken.replaced.holder == "a"
    assert f"lag {lag:.1f} s" in b.why_replaced(first.lease_id)


@pytest.mark.parametrize("lag", [0.0, LAG])
def test_a_grant_is_passed_on_only_after_the_ack_window_plus_the_tracker_lag(lag: float) -> None:
    clock = FakeClock()
    b = book(clock, lag)
    b.acquire(D, "a", SIZE)  # never acknowledged
    clock.now += ACK + lag - EPS
    assert isinstance(b.acquire(D, "b", SIZE), Held)
    clock.now += 2 * EPS
    taken = b.acquire(D, "b", SIZE)
    assert isinstance(taken, Granted) and taken.replaced is not None
    assert not taken.replaced.acked


def test_a_grant_waiting_behind_the_lag_gives_up_its_image_slot_but_keeps_its_lease() -> None:
    """The image's slot goes at the plain window, so its other layers are not held
    back by an acknowledgement waiting in the tracker's queue; the takeover waits
    for the lag, so the holder whose acknowledgement comes late still fetches."""
    clock = FakeClock()
    b = book(clock, LAG)
    first = b.acquire(D, "a", SIZE, group="img").lease
    assert b.fetching("img") == [first]
    clock.now += ACK + EPS
    assert b.fetching("img") == []  # the next layer may start
    assert isinstance(b.acquire(D, "b", SIZE, group="img"), Held)
    acked = b.renew(D, first.lease_id, 0, SIZE, holder="a")  # the ack, read late
    assert b.fetching("img") == [acked] and not b.is_slow(acked)
    clock.now += SILENCE + EPS  # quiet again: the slot goes, the lease stays
    assert b.fetching("img") == [] and isinstance(b.acquire(D, "b", SIZE), Held)


def test_the_lag_is_read_when_judged_so_a_lag_that_passed_forgives_nothing() -> None:
    clock = FakeClock()
    lag = [LAG]
    b = LeaseBook(TTL, clock, rate=RATE, silence_s=SILENCE, lag=lambda: lag[0])
    b.acquire(D, "a", SIZE)
    clock.now += SILENCE + 1.0
    assert isinstance(b.acquire(D, "b", SIZE), Held)
    lag[0] = 0.0  # the tracker caught up and a still said nothing: it is silent
    assert isinstance(b.acquire(D, "b", SIZE), Granted)


@pytest.mark.parametrize("lag", [0.0, LAG])
def test_a_window_kept_up_is_not_slow_when_the_tracker_judges_its_renewal_late(
    lag: float,
) -> None:
    """A renewal run `lag` late makes the window look longer than it was: only a
    tracker that knows it ran late (lag LAG) does not call the holder slow."""
    clock = FakeClock()
    b = book(clock, lag)
    first = b.acquire(D, "a", SIZE).lease
    b.renew(D, first.lease_id, 0, SIZE, holder="a")
    for step in range(1, 3):  # stays alive within the silence, one window's bytes in all
        clock.now += SILENCE - EPS
        b.renew(D, first.lease_id, step << 20, SIZE, holder="a")
    clock.now += RATE.window_s + LAG - 2 * (SILENCE - EPS)
    kept_up = RATE.min_bytes_s * int(RATE.window_s)
    lease = b.renew(D, first.lease_id, kept_up, SIZE, holder="a")
    assert lease.slow is (lag == 0.0)
    assert isinstance(b.acquire(D, "b", SIZE), Granted if lag == 0.0 else Held)


@pytest.mark.parametrize("ack_after", [0.0, ACK - EPS])
def test_the_rate_window_starts_when_the_grant_is_acknowledged(ack_after: float) -> None:
    """A holder fetches nothing until its acknowledgement is answered: a window's
    bytes over the window after it keep up, however late within `grant_ack_s` it came."""
    clock = FakeClock()
    b = LeaseBook(TTL, clock, rate=RATE, grant_ack_s=ACK)
    first = b.acquire(D, "a", SIZE).lease
    clock.now += ack_after
    b.renew(D, first.lease_id, 0, SIZE, holder="a")
    per_half = RATE.min_bytes_s * int(RATE.window_s) // 2
    for half in (1, 2):  # renewed within the TTL
        clock.now += RATE.window_s / 2
        lease = b.renew(D, first.lease_id, half * per_half, SIZE, holder="a")
    assert not lease.slow and lease.mark_at == clock.now
    for _ in (1, 2):  # and a window with nothing is slow, as before
        clock.now += RATE.window_s / 2
        lease = b.renew(D, first.lease_id, lease.bytes_done, SIZE, holder="a")
    assert lease.slow


def test_the_meter_holds_the_largest_oversleep_for_its_hold_and_bounds_it() -> None:
    meter = LagMeter(lambda: 0.0, hold_s=2.5, max_s=30.0, interval_s=0.05)
    assert meter() == 0.0
    meter.record(0.001, 100.0)
    meter.record(4.0, 104.0)  # the loop stopped 4 s
    for n in range(1, 50):  # on time again, every 50 ms for 2.45 s: still forgiven
        meter.record(0.0, 104.0 + n * 0.05)
    assert meter() == 4.0
    meter.record(0.0, 106.6)  # past the hold
    assert meter() == 0.0
    meter.record(-0.5, 106.7)  # a clock that woke early is no negative lag
    assert meter() == 0.0
    meter.record(99.0, 107.0)
    assert meter() == 30.0 and meter.total_s == pytest.approx(103.001)
    with pytest.raises(ValueError):
        LagMeter(lambda: 0.0, hold_s=1.0, max_s=1.0, interval_s=0.0)


# -- a real tracker process, stopped and continued --------------------------------------

STALL_S = 4.0  # > SILENCE


async def _metrics(url: str) -> str:
    async with httpx.AsyncClient(timeout=10, trust_env=False) as http:
        return (await http.get(f"{url}/metrics")).text


async def test_a_holder_renewing_through_a_tracker_stall_is_not_taken_over(
    tmp_path: Path,
) -> None:
    digest = Digest.parse(D)
    args = ["--lease-silence-s", str(SILENCE), "--lease-grant-ack-s", str(ACK)]
    with open_tracker(tmp_path / "tracker", args=args) as t:
        a, b = (TrackerClient(t.url, node=n) for n in ("a", "b"))
        try:
            held = await a.acquire_lease(digest, size=SIZE)
            assert held.status is LeaseStatus.GRANTED and held.lease_id
            lease_id = held.lease_id
            done = 0

            async def renew_on_schedule(stop: trio.Event) -> None:
                nonlocal done
                for _ in range(200):  # a's cadence: every 0.5 s, whatever the tracker does
                    done += 1 << 20
                    await a.renew_lease(digest, lease_id, done, SIZE)
                    with trio.move_on_after(0.5):
                        await stop.wait()
                    if stop.is_set():
                        return

            stop = trio.Event()
            replies: list[LeaseReply] = []

            async def b_asks() -> None:  # a long poll, held at the tracker through the stall
                replies.append(await b.acquire_lease(digest, size=SIZE, wait_s=STALL_S + 15))

            async with trio.open_nursery() as outer:
                outer.start_soon(b_asks)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(renew_on_schedule, stop)
                    await trio.sleep(1.0)
                    os.kill(t.process.pid, signal.SIGSTOP)
                    try:
                        await trio.sleep(STALL_S)
                    finally:
                        os.kill(t.process.pid, signal.SIGCONT)
                    await trio.sleep(1.0)  # a keeps renewing after the stall
                    text = await _metrics(t.url)
                    stop.set()
                assert replies == []  # b still waits: a was never judged silent
                await a.release_lease(digest, lease_id)  # b's long poll is answered now
            assert replies[0].status is LeaseStatus.GRANTED and replies[0].replaced is None
            assert metric_value(text, "p2preg_tracker_lease_replacements_total") == 0
            assert metric_value(text, "p2preg_tracker_lag_seconds") >= STALL_S - 0.5
            assert metric_value(text, "p2preg_tracker_loop_late_seconds_total") >= STALL_S - 0.5
        finally:
            for client in (a, b):
                await client.aclose()
