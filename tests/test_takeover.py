"""p2preg/node/takeover.py: when the tracker client moves on, the node announces again.

On trio's autojump clock, with the swarm's `reannounce_recent` played by a
function that records when it was called: a move gives three announces, at 2,
5 and 10 s; moves while a round runs give one more round, not one each; and
nothing is announced without a move. (The whole path, with a tracker replica
killed mid-pull, is tests/test_tracker_replicas_fanout.py.)
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from p2preg.node.takeover import REANNOUNCE_AFTER_S, RECENT_S, Moves, reannounce_after_moves


async def test_moves_announce_again_in_rounds(autojump_clock: trio.testing.MockClock) -> None:
    calls: list[tuple[float, float]] = []
    moves = Moves()

    def reannounce(within_s: float) -> int:
        calls.append((trio.current_time(), within_s))
        return 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reannounce_after_moves, moves, reannounce)
        await trio.sleep(30)
        assert calls == []  # no move, no announce
        start = trio.current_time()
        moves.note()
        await trio.sleep(0.5)
        moves.note()  # while the round runs: one more round
        moves.note()
        await trio.sleep(60)
        nursery.cancel_scope.cancel()
    second = start + REANNOUNCE_AFTER_S[-1]
    want = [start + a for a in REANNOUNCE_AFTER_S] + [second + a for a in REANNOUNCE_AFTER_S]
    assert [when for when, _ in calls] == pytest.approx(want, abs=0.01)
    assert {within for _, within in calls} == {RECENT_S}
