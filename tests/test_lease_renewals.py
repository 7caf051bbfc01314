"""A lease holder's renewals (p2preg/node/holding.py `Renewals`): cadence, span and timeout.

The node's real pull path over the fakes of tests/fakes.py on trio's MockClock
(no socket, no thread): a holder renews every third of the tracker's
`lease_silence_s`, the first at once (the grant's acknowledgement), until it
releases the lease (the upstream fetch, the publish and the wait for its first
announce), each renewal with a timeout of its own, and one lost to a hung
tracker is followed at once, so the tracker never hears silence from a live
holder. Then the real `TrackerClient` against a tracker that accepts and never
answers, beside a real one: the renewal's own short timeout moves it on.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from p2preg.core.wire import LeaseStatus
from p2preg.node.fetch import SwarmSettings
from tests.fakes import FakeTrackerServer, FakeUpstream, blob, open_pull_node
from tests.tracker_helpers import blob_meta, running_tracker
from tracker.client import TrackerClient

REPO = "team/app"
SETTINGS = SwarmSettings(min_bytes=1024, stall_s=30.0, max_hash_failures=4, lease_wait_max_s=60.0)
SILENCE = 3.0
RENEW = SILENCE / 3


async def test_a_holder_renews_every_third_of_the_silence_from_the_grant_to_the_release(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    digest, data = blob()  # 5 chunks of the fake upstream, 1 s each
    upstream = FakeUpstream({(REPO, digest): data}, delay_s=1.0)
    server = FakeTrackerServer(silence_s=SILENCE)
    server.announce_wait_s = 4.0  # the first announce is acknowledged 4 s after the publish
    async with open_pull_node(tmp_path / "a", server, name="a", settings=SETTINGS) as a:
        start = trio.current_time()
        await a.blobs.ensure(upstream, REPO, digest)
        fetched_at = trio.current_time()
        await trio.sleep(10)
        seen = len(server.renewals)
        await trio.sleep(10)
        assert len(server.renewals) == seen  # released: no renewal after it
    assert server.leases.current(str(digest)) is None and server.leases.replacements == 0
    periodic = [(at, done, timeout) for at, done, timeout in server.renewals if timeout]
    # At once (the grant's acknowledgement), then every third of the silence,
    # each with 1.5 renewals' time to be answered.
    assert [at - start for at, _, _ in periodic] == pytest.approx(
        [RENEW * n for n in range(len(periodic))]
    )
    assert {timeout for _, _, timeout in periodic} == {1.5 * RENEW}
    # Through the fetch, then the 4 s wait for the announce, until the release.
    assert periodic[-1][0] >= fetched_at + 3 * RENEW
    dones = [done for _, done, _ in server.renewals]
    assert dones == sorted(dones) and dones[-1] == len(data)
    # The one renewal without the short timeout reports the last byte, at once.
    assert [(at, done) for at, done, timeout in server.renewals if timeout is None] == [
        (pytest.approx(fetched_at), len(data))
    ]


async def test_a_renewal_lost_to_a_hung_tracker_is_followed_at_once_and_the_lease_kept(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    digest, data = blob()
    upstream = FakeUpstream({(REPO, digest): data}, delay_s=1.0)
    server = FakeTrackerServer(silence_s=SILENCE)
    server.hang_renewals = 1  # the first renewal (the ack) hangs for its whole timeout
    async with open_pull_node(tmp_path / "a", server, name="a", settings=SETTINGS) as a:
        start = trio.current_time()
        await a.blobs.ensure(upstream, REPO, digest)
    times = [at - start for at, _, _ in server.renewals]
    # Hung at once, given up at 1.5 s and sent again right then, not a renewal later.
    assert times[:3] == pytest.approx([0.0, RENEW * 1.5, RENEW * 2.5])
    # So the tracker heard the holder 1.5 s after the grant, within the silence.
    assert times[1] < SILENCE
    assert server.leases.replacements == 0 and a.fetches("upstream") == 1


async def test_a_renewal_to_a_tracker_that_hangs_moves_on_after_its_own_short_timeout(
    tmp_path: Path,
) -> None:
    meta = blob_meta(tmp_path)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")  # accepts, never answers
    port = listeners[0].socket.getsockname()[1]
    hung = f"http://127.0.0.1:{port}"
    moves: list[str] = []
    async with running_tracker(tmp_path, lease_silence_s=SILENCE) as url:
        holder = TrackerClient(url, node="n1")
        # The client's own timeout is an hour: only the renewal's gets it going.
        both = TrackerClient([hung, url], node="n1", timeout_s=3600, on_failover=moves.append)
        try:
            lease = await holder.acquire_lease(meta.digest, size=meta.size)
            assert lease.status is LeaseStatus.GRANTED and lease.lease_id
            assert lease.silence_s == SILENCE
            with trio.fail_after(60):
                reply = await both.renew_lease(
                    meta.digest, lease.lease_id, 1000, meta.size, timeout_s=0.5
                )
        finally:
            await holder.aclose()
            await both.aclose()
    assert reply.status is LeaseStatus.GRANTED and reply.bytes_done == 1000
    assert moves == ["unreachable"] and both.base_url == url
    for listener in listeners:
        await listener.aclose()
