"""`TrackerClient` over several trackers (tracker/client.py): which one answers, in what order.

Real tracker processes on loopback (independent SQLite trackers, one token),
killed with SIGKILL by pid, and a port nobody listens on. What must hold: the
first tracker that answers takes every request and stays current (sticky, one
failover counted per move); a dead one is passed over once round the list; a
4xx is an answer (raised, no move), a 5xx moves on; a held lease request whose
tracker dies is asked again of the next one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import trio

from harness.node import metric_value
from harness.procs import free_port, http_get
from harness.tracker import TrackerProcess, open_tracker
from p2preg.core import errors, wire
from tests.fixtures.cluster import kill9, wait_for
from tests.tracker_helpers import blob_meta
from tracker.client import TrackerClient

pytestmark = [pytest.mark.integration]

TOKEN = "failover-token"


def _metric(tracker: TrackerProcess, name: str) -> float:
    return metric_value(http_get(f"{tracker.url}/metrics").text, name)


@pytest.fixture
def trackers(tmp_path: Path) -> Iterator[tuple[TrackerProcess, TrackerProcess]]:
    with ExitStack() as stack:
        a = stack.enter_context(open_tracker(tmp_path / "a", token=TOKEN, name="tracker-a"))
        b = stack.enter_context(open_tracker(tmp_path / "b", token=TOKEN, name="tracker-b"))
        yield a, b


def _client(urls: list[str], moves: list[str], node: str = "n1") -> TrackerClient:
    return TrackerClient(urls, node=node, token=TOKEN, on_failover=moves.append)


async def test_the_first_tracker_that_answers_takes_every_request_until_it_dies(
    trackers: tuple[TrackerProcess, TrackerProcess], tmp_path: Path
) -> None:
    a, b = trackers
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    moves: list[str] = []
    client = _client([dead, a.url, b.url], moves)
    try:
        first, second = blob_meta(tmp_path, 50_000), blob_meta(tmp_path, 60_000)
        assert await client.lookup_metainfo(first.digest) is None  # a 404 from a
        assert (moves, client.base_url) == (["unreachable"], a.url)
        lease = await client.acquire_lease(first.digest, size=first.size)
        assert lease.status is wire.LeaseStatus.GRANTED
        await client.publish_metainfo(first.digest, first.size, first.data)
        assert await client.lookup_metainfo(first.digest) is not None
        # Sticky: the dead one was not tried again, b saw nothing.
        assert moves == ["unreachable"] and client.base_url == a.url
        assert _metric(a, "p2preg_tracker_lease_grants_total") == 1
        assert _metric(b, "p2preg_tracker_lease_grants_total") == 0
        assert _metric(b, "p2preg_tracker_metainfo") == 0

        await trio.to_thread.run_sync(kill9, a.process)
        lease = await client.acquire_lease(second.digest, size=second.size)
        assert lease.status is wire.LeaseStatus.GRANTED
        assert (moves, client.base_url) == (["unreachable", "unreachable"], b.url)
        assert _metric(b, "p2preg_tracker_lease_grants_total") == 1
    finally:
        await client.aclose()


async def test_a_4xx_is_an_answer_and_a_5xx_moves_on(tmp_path: Path) -> None:
    # a holds one metainfo at most: its next publish is 503 limit_reached.
    config = tmp_path / "small.toml"
    config.write_text("max_metainfo = 1\n")
    with (
        open_tracker(tmp_path / "a", token=TOKEN, args=("--config", str(config))) as a,
        open_tracker(tmp_path / "b", token=TOKEN) as b,
    ):
        moves: list[str] = []
        client = _client([a.url, b.url], moves)
        only_b = TrackerClient(b.url, node="n1", token=TOKEN)
        try:
            filled, refused, moved = (blob_meta(tmp_path, n) for n in (40_000, 50_000, 60_000))
            # Not the lease holder: a's 403 is its answer, b is not asked.
            with pytest.raises(errors.Forbidden):
                await client.publish_metainfo(refused.digest, refused.size, refused.data)
            with pytest.raises(errors.LeaseLost):
                await client.renew_lease(refused.digest, "no-such-lease", 0)
            assert (moves, client.base_url) == ([], a.url)
            await client.acquire_lease(filled.digest, size=filled.size)
            await client.publish_metainfo(filled.digest, filled.size, filled.data)
            # The holder on both (independent trackers): a is full, b files it.
            await client.acquire_lease(moved.digest, size=moved.size)
            await only_b.acquire_lease(moved.digest, size=moved.size)
            record = await client.publish_metainfo(moved.digest, moved.size, moved.data)
            assert record.digest == str(moved.digest)
            assert (moves, client.base_url) == (["server_error"], b.url)
            assert _metric(a, "p2preg_tracker_metainfo") == 1
            assert _metric(b, "p2preg_tracker_metainfo") == 1
        finally:
            await client.aclose()
            await only_b.aclose()


async def test_a_held_lease_request_whose_tracker_dies_is_asked_of_the_next(
    trackers: tuple[TrackerProcess, TrackerProcess], tmp_path: Path
) -> None:
    a, b = trackers
    meta = blob_meta(tmp_path, 50_000)
    holder = TrackerClient(a.url, node="holder", token=TOKEN)
    moves: list[str] = []
    waiter = _client([a.url, b.url], moves, node="waiter")
    replies: list[wire.LeaseReply] = []
    try:
        taken = await holder.acquire_lease(meta.digest, size=meta.size)
        assert taken.status is wire.LeaseStatus.GRANTED

        async def wait_for_the_lease() -> None:
            replies.append(await waiter.acquire_lease(meta.digest, size=meta.size, wait_s=20))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_for_the_lease)
            await trio.to_thread.run_sync(
                wait_for, lambda: _metric(a, "p2preg_tracker_long_polls") == 1, 20,
                "a to hold the lease request",
            )
            assert not replies
            await trio.to_thread.run_sync(kill9, a.process)
        # b has no holder for it: the waiter gets the lease there.
        assert [r.status for r in replies] == [wire.LeaseStatus.GRANTED]
        assert (moves, waiter.base_url) == (["unreachable"], b.url)
    finally:
        await holder.aclose()
        await waiter.aclose()
