"""Seed confirmations waiting for a lease request to ride (tracker/confirm_rides.py).

A confirmation that a lease request takes within the hold, and that the reply
names, is done: nothing goes alone. One no request took in time, one the reply
does not name (an older tracker, a refusal) and one whose request failed goes
alone, so the caller ends as the plain call would: taken, or the call's error.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio
import trio.testing

from p2preg.core import errors
from p2preg.core.digest import Digest
from tracker.confirm_rides import HOLD_S, ConfirmRides, Ride

A, B, C = Digest.of(b"a"), Digest.of(b"b"), Digest.of(b"c")


class Alone:
    """The call a confirmation makes alone: recorded with its riders, raising `fails`
    if set (for `only` that confirmation, if named), else naming the riders `takes`
    says (all of them by default; None: an older tracker's empty answer)."""

    def __init__(
        self,
        fails: Exception | None = None,
        takes: Callable[[Ride], bool] | None = None,
        *,
        older: bool = False,
        only: Digest | None = None,
    ) -> None:
        self.sent: list[Digest] = []
        self.carried: list[list[Digest]] = []
        self.fails = fails
        self.takes = takes
        self.older = older
        self.only = only  # `fails` for this confirmation alone

    async def __call__(
        self, digest: Digest, info_hash: bytes, riders: list[Ride]
    ) -> list[str] | None:
        self.sent.append(digest)
        self.carried.append([r.digest for r in riders])
        if self.fails is not None and self.only in (None, digest):
            raise self.fails
        if self.older:
            return None
        return [str(r.digest) for r in riders if self.takes is None or self.takes(r)]


async def board_two(nursery: trio.Nursery, rides: ConfirmRides) -> list[Ride]:
    """Confirm A and B, then a lease request boards them half a hold later."""
    nursery.start_soon(rides.confirm, A, b"ha")
    nursery.start_soon(rides.confirm, B, b"hb")
    await trio.sleep(HOLD_S / 2)
    return rides.board()


async def test_a_confirmation_no_request_takes_goes_alone_after_the_hold(
    autojump_clock: trio.testing.MockClock,
) -> None:
    alone = Alone()
    rides = ConfirmRides(alone)
    await rides.confirm(A, b"ha")
    assert alone.sent == [A]
    assert trio.current_time() == pytest.approx(HOLD_S)
    assert rides.board() == []  # it left the queue


async def test_confirmations_ride_the_next_request_and_are_done_when_named(
    autojump_clock: trio.testing.MockClock,
) -> None:
    alone = Alone()
    rides = ConfirmRides(alone)
    async with trio.open_nursery() as nursery:
        boarded = await board_two(nursery, rides)
        assert sorted((r.digest, r.info_hash) for r in boarded) == sorted([(A, b"ha"), (B, b"hb")])
        await trio.sleep(10 * HOLD_S)  # a long poll: they wait for its answer, not alone
        assert alone.sent == []
        rides.land(boarded, [str(A), str(B)])
    assert alone.sent == []


@pytest.mark.parametrize(
    "confirmed",
    [None, [str(A)]],  # an older tracker, or one that took A only (B refused)
)
async def test_what_the_reply_does_not_name_goes_alone(
    autojump_clock: trio.testing.MockClock, confirmed: list[str] | None
) -> None:
    alone = Alone()
    rides = ConfirmRides(alone)
    async with trio.open_nursery() as nursery:
        rides.land(await board_two(nursery, rides), confirmed)
    assert sorted(alone.sent) == sorted([B] if confirmed else [A, B])


async def test_a_failed_request_sends_its_riders_alone_and_their_errors_reach_the_caller(
    autojump_clock: trio.testing.MockClock,
) -> None:
    alone = Alone(errors.NotFound("no metainfo"))
    rides = ConfirmRides(alone)

    async def request_fails() -> None:
        await trio.sleep(HOLD_S / 2)
        rides.land(rides.board(), None)  # no answer

    async with trio.open_nursery() as nursery:
        nursery.start_soon(request_fails)
        with pytest.raises(errors.NotFound):
            await rides.confirm(A, b"ha")
    assert alone.sent == [A]


async def test_with_a_tracker_that_names_no_riders_confirmations_go_alone_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # An older tracker's lease replies carry no `confirmed`: nothing rides there.
    alone = Alone()
    rides = ConfirmRides(alone)
    rides.replied(None)
    await rides.confirm(A, b"ha")
    assert alone.sent == [A] and trio.current_time() == 0
    assert rides.board() == []
    rides.replied([])  # a tracker that takes riders (none this time): they wait again
    async with trio.open_nursery() as nursery:
        boarded = await board_two(nursery, rides)
        assert sorted(r.digest for r in boarded) == sorted([A, B])
        rides.land(boarded, [str(A), str(B)])
    assert alone.sent == [A]


async def last_layers(rides: ConfirmRides, first: Digest, *others: Digest) -> None:
    """A pull's last layers, with nothing left to ask for: `first` is confirmed, the
    `others` a quarter of a hold later; returns when every confirmation ended."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rides.confirm, first, b"h" + first.hex.encode())
        await trio.sleep(HOLD_S / 4)
        for digest in others:
            nursery.start_soon(rides.confirm, digest, b"h" + digest.hex.encode())


async def test_a_confirmation_that_goes_alone_carries_every_other_one_waiting(
    autojump_clock: trio.testing.MockClock,
) -> None:
    alone = Alone()
    rides = ConfirmRides(alone)
    await last_layers(rides, A, B, C)
    # A's hold ended first: one call, B and C in it, named taken; none went on its own.
    assert alone.sent == [A] and sorted(alone.carried[0]) == sorted([B, C])
    assert trio.current_time() == pytest.approx(HOLD_S)
    assert rides.board() == []


async def test_riders_a_confirmation_call_does_not_name_go_alone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The tracker refused C (say, an unknown torrent): C goes alone and learns why.
    alone = Alone(takes=lambda ride: ride.digest != C)
    await last_layers(ConfirmRides(alone), A, B, C)
    assert alone.sent == [A, C] and alone.carried[1] == []
    assert sorted(alone.carried[0]) == sorted([B, C])


async def test_an_older_tracker_s_empty_answer_sends_each_rider_alone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    alone = Alone(older=True)
    rides = ConfirmRides(alone)
    await last_layers(rides, A, B)
    assert alone.sent == [A, B] and alone.carried == [[B], []]
    # Having learned that, a confirmation alone there carries no others.
    await last_layers(rides, C, A)
    assert alone.sent[2:] == [C, A] and alone.carried[2:] == [[], []]


async def test_a_failed_confirmation_sends_the_ones_it_carried_alone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    alone = Alone(errors.NotFound("no metainfo"), only=A)
    rides = ConfirmRides(alone)

    async def a_fails() -> None:
        with pytest.raises(errors.NotFound):  # A's own error reaches A's caller
            await rides.confirm(A, b"ha")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(a_fails)
        await trio.sleep(HOLD_S / 4)
        nursery.start_soon(rides.confirm, B, b"hb")
    assert alone.sent == [A, B] and alone.carried == [[B], []]  # B, alone, taken
