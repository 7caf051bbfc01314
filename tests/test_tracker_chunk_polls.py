"""`GET /v1/chunks/<blob>?have=N&wait=S` as a long poll, against a tracker process.

A waiter that already knows N chunks is held until the holder files the next
one, and answered with it: one request, not one per interval (the tracker's
`p2preg_tracker_chunk_polls_total` counts every read of the list). Held reads
count against the long-poll caps of lease requests: one identity past
`max_long_polls_per_identity` is answered at once, with what there is. A
tracker running behind asks readers to pace their next read.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import trio

from harness.node import metric_value
from harness.tracker import TrackerProcess, open_tracker
from p2preg.core import wire
from p2preg.node import chunkfollow
from tests.chunk_helpers import SIZE, Cut, blob_data
from tracker import chunk_torrents
from tracker.client import TrackerClient, open_tracker_client

pytestmark = pytest.mark.integration

TOKEN = "chunk-polls-token"


def _metric(t: TrackerProcess, name: str, **labels: str) -> float:
    text = httpx.get(f"{t.url}/metrics", timeout=10, trust_env=False).text
    assert f"# HELP {name} " in text, name
    return metric_value(text, name, **labels)


def _polls(t: TrackerProcess) -> float:
    return sum(_metric(t, "p2preg_tracker_chunk_polls_total", answer=a)
               for a in ("at_once", "news", "timed_out"))  # fmt: skip


async def _until(check: Callable[[], bool]) -> None:
    for _ in range(600):  # 30 s at most
        if check():
            return
        await trio.sleep(0.05)
    raise AssertionError("the tracker never held the reads")


@asynccontextmanager
async def _one_chunk_filed(
    tmp_path: Path,
) -> AsyncIterator[tuple[TrackerProcess, Cut, TrackerClient, TrackerClient]]:
    """A tracker where `holder` holds the blob's lease and filed its first chunk, and
    a `waiter` to read the list."""
    cut = Cut.make(tmp_path / "chunks", blob_data())
    with open_tracker(tmp_path / "tracker", token=TOKEN) as t:
        async with (
            open_tracker_client(t.url, node="holder", token=TOKEN) as holder,
            open_tracker_client(t.url, node="waiter", token=TOKEN) as waiter,
        ):
            await holder.acquire_lease(cut.blob, size=SIZE)
            await cut.publish(holder, 1)
            yield t, cut, holder, waiter


async def test_a_waiter_learns_the_next_chunk_from_one_held_request(tmp_path: Path) -> None:
    async with _one_chunk_filed(tmp_path) as (t, cut, holder, waiter):
        first = await waiter.list_chunks(cut.blob, have=0, wait_s=20)
        assert first is not None and first.digests == cut.digests[:1]
        assert _metric(t, "p2preg_tracker_chunk_polls_total", answer="at_once") == 1
        got: list[wire.ChunkList | None] = []
        async with trio.open_nursery() as nursery:

            async def follow() -> None:
                got.append(await waiter.list_chunks(cut.blob, have=1, wait_s=20))

            nursery.start_soon(follow)
            await _until(lambda: _metric(t, "p2preg_tracker_long_polls") == 1)
            await holder.publish_chunk(cut.blob, cut.msg("holder", 1))
        assert got[0] is not None and got[0].digests == cut.digests[:2]
        # Two reads in all: the first, and the held one the new chunk answered.
        assert _polls(t) == 2
        assert _metric(t, "p2preg_tracker_chunk_polls_total", answer="news") == 1
        # Nothing new within the wait: held, then answered with what there is.
        same = await waiter.list_chunks(cut.blob, have=2, wait_s=1)
        assert same is not None and same.digests == cut.digests[:2]
        assert _metric(t, "p2preg_tracker_chunk_polls_total", answer="timed_out") == 1


async def test_held_chunk_reads_are_bounded_per_identity(tmp_path: Path) -> None:
    cut = Cut.make(tmp_path / "chunks", blob_data())
    config = tmp_path / "tracker.toml"
    config.write_text("max_long_polls_per_identity = 2\n")
    with open_tracker(tmp_path / "tracker", token=TOKEN, args=["--config", str(config)]) as t:
        async with open_tracker_client(t.url, node="holder", token=TOKEN) as holder:
            await holder.acquire_lease(cut.blob, size=SIZE)
            await cut.publish(holder, 1)
            answers: list[wire.ChunkList | None] = []
            async with trio.open_nursery() as nursery:

                async def wait_for_more() -> None:
                    answers.append(await holder.list_chunks(cut.blob, have=1, wait_s=20))

                for _ in range(2):
                    nursery.start_soon(wait_for_more)
                await _until(lambda: _metric(t, "p2preg_tracker_long_polls") == 2)
                # A third from the same identity (the same address, without TLS) is
                # not held: answered at once with the one chunk there is.
                third = await holder.list_chunks(cut.blob, have=1, wait_s=20)
                assert third is not None and third.digests == cut.digests[:1]
                assert _metric(t, "p2preg_tracker_long_polls_shortened_total") == 1
                assert _metric(t, "p2preg_tracker_long_polls") == 2  # still held
                await holder.publish_chunk(cut.blob, cut.msg("holder", 1))
            assert [a.digests if a else None for a in answers] == [cut.digests[:2]] * 2


async def test_a_tracker_running_behind_asks_readers_to_pace_their_next_read(
    tmp_path: Path,
) -> None:
    # Every waiter reads the list again as each chunk is filed: at 10,000 nodes that
    # is more reads than one core answers. A tracker that runs behind (here: stopped
    # for 0.6 s, as a starved or paused process is) says so in `retry_after_s`, and
    # nodes wait that long before their next read (p2preg/node/chunkfollow.py).
    async with _one_chunk_filed(tmp_path) as (t, cut, _holder, waiter):
        keeping_up = await waiter.list_chunks(cut.blob, have=0, wait_s=0)
        assert keeping_up is not None and keeping_up.retry_after_s == 0.0
        os.kill(t.process.pid, signal.SIGSTOP)
        try:
            await trio.sleep(0.6)
        finally:
            os.kill(t.process.pid, signal.SIGCONT)
        behind = await waiter.list_chunks(cut.blob, have=0, wait_s=0)
        assert behind is not None and behind.digests == cut.digests[:1]
        assert 0.5 <= behind.retry_after_s <= chunk_torrents.READ_PACE_MAX_S


def test_a_node_paces_its_reads_as_the_tracker_asks_within_bounds() -> None:
    listing = wire.ChunkList("holder", SIZE, 4 << 20, [], [], True)
    assert chunkfollow.read_pace(listing) == 0.0
    assert chunkfollow.read_pace(replace(listing, retry_after_s=1.5)) == 1.5
    # A tracker cannot hold a node's reads back past the node's own bound.
    assert chunkfollow.read_pace(replace(listing, retry_after_s=1e9)) == chunkfollow.READ_PACE_MAX_S
    for bad in (-1.0, float("nan")):
        assert chunkfollow.read_pace(replace(listing, retry_after_s=bad)) == 0.0
    # Off the wire: a tracker that sends no pace (an older one) means none.
    old = wire.encode(listing)
    assert wire.decode(wire.ChunkList, old).retry_after_s == 0.0
