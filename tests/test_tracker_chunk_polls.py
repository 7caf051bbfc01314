"""`GET /v1/chunks/<blob>?have=N&wait=S` as a long poll, against a tracker process.

A waiter that already knows N chunks is held until the holder files the next
one, and answered with it: one request, not one per interval (the tracker's
`p2preg_tracker_chunk_polls_total` counts every read of the list). Held reads
count against the long-poll caps of lease requests: one identity past
`max_long_polls_per_identity` is answered at once, with what there is.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import trio

from harness.node import metric_value
from harness.tracker import TrackerProcess, open_tracker
from p2preg.core import wire
from tests.chunk_helpers import SIZE, Cut, blob_data
from tracker.client import open_tracker_client

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


async def test_a_waiter_learns_the_next_chunk_from_one_held_request(tmp_path: Path) -> None:
    cut = Cut.make(tmp_path / "chunks", blob_data())
    with open_tracker(tmp_path / "tracker", token=TOKEN) as t:
        async with (
            open_tracker_client(t.url, node="holder", token=TOKEN) as holder,
            open_tracker_client(t.url, node="waiter", token=TOKEN) as waiter,
        ):
            await holder.acquire_lease(cut.blob, size=SIZE)
            await cut.publish(holder, 1)
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
