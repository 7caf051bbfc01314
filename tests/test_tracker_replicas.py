"""Tracker replicas on Redis (tracker/replica.py) as real processes: redis-server,
redis-sentinel and `p2preg tracker --store`.

One replica serves at a time and the others stand by (503, /readyz 503). Killed
(-9), the serving replica's term runs out and a standby takes over with
everything: metainfo, leases, the manifest shelf, the chunk book (a blob's
chunk records, an open chunk dispute), and the peers that announced to the
dead one.
Every replica restarted at once finds the same state. While Redis is away no
replica serves (nodes go upstream), each says why in its log and metrics, and
one serves again by itself when Redis is back. Under Sentinel, a primary killed
mid-term fails over and a replica serves again; a lease granted just before,
which no Redis replica had, is gone with the old primary, and its holder can
then neither renew it, nor release another's, nor define the blob's torrent.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote_from_bytes

import httpx
import libtorrent as lt
import pytest
import trio

from harness.procs import wait_until
from harness.redis import start_redis, start_sentinels, wait_for_failover
from harness.tracker import TrackerProcess
from p2preg.core import errors, wire
from p2preg.core.digest import Digest
from p2preg.core.metainfo import Metainfo
from tests.chunk_helpers import Cut, blob_data
from tests.replica_helpers import metric, ready, replicas, serving
from tracker.client import open_tracker_client
from tracker.metainfo import make_metainfo

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOKEN = "replicas-token"
PASSWORD = "replicas-store-password"
STORE = {"token": TOKEN, "password": PASSWORD}
# Leases held by clients that never renew, across a kill and a restart: what is
# tested is that the store keeps them, not how long a silent holder may keep one
# (tests/test_lease_silence.py, test_lease_grant_ack.py).
KEEP_SILENT = ("--lease-silence-s", "0", "--lease-grant-ack-s", "0")
OCI = "application/vnd.oci.image.manifest.v1+json"
MANIFEST = b'{"schemaVersion": 2, "mediaType": "' + OCI.encode() + b'"}'
MANIFEST_DIGEST = Digest.of(MANIFEST)


def log_of(t: TrackerProcess) -> str:
    return next(t.data_dir.parent.glob("*.log")).read_text()


def announce_raw(url: str, info_hash: bytes, node: str = "n", port: int = 7000,
                 left: int = 1) -> bytes:  # fmt: skip
    query = (f"info_hash={quote_from_bytes(info_hash)}&peer_id={node[0] * 20}&port={port}"
             f"&uploaded=0&downloaded=0&left={left}&node={node}&token={TOKEN}")  # fmt: skip
    return httpx.get(f"{url}/announce?{query}").content


def announce(url: str, info_hash: bytes, node: str, port: int, left: int) -> dict[bytes, object]:
    answer = lt.bdecode(announce_raw(url, info_hash, node, port, left))
    assert isinstance(answer, dict)
    return {k: v for k, v in answer.items() if isinstance(k, bytes)}


def blob(tmp_path: Path, data: bytes | None = None) -> tuple[Digest, int, Metainfo]:
    data = os.urandom(150_000) if data is None else data
    digest = Digest.of(data)
    path = tmp_path / digest.hex
    path.write_bytes(data)
    return digest, len(data), make_metainfo(path, digest, len(data))


def crash(t: TrackerProcess) -> None:
    """SIGKILL: no shutdown, no goodbye; its term must run out by itself."""
    os.kill(t.process.pid, signal.SIGKILL)
    t.process.stop()  # reaps it


def refused_by(t: TrackerProcess) -> httpx.Response:
    return httpx.get(f"{t.url}/v1/status", headers={"Authorization": f"Bearer {TOKEN}"})


def chunk_read(t: TrackerProcess, blob: Digest, query: str) -> httpx.Response:
    return httpx.get(f"{t.url}/v1/chunks/{blob}{query}",
                     headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip


def urls(trackers: Sequence[TrackerProcess]) -> list[str]:
    return [t.url for t in trackers]


async def test_a_standby_takes_over_with_metainfo_leases_and_peers(tmp_path: Path) -> None:
    digest, size, meta = blob(tmp_path)
    leased = Digest.of(b"being fetched from upstream")
    with start_redis(tmp_path / "redis", password=PASSWORD) as server:
        with replicas(tmp_path, server.url(), 2, extra=KEEP_SILENT, **STORE) as trackers:
            first = serving(trackers)
            standby = next(t for t in trackers if t is not first)
            r = refused_by(standby)
            assert r.status_code == 503 and b"standing_by" in r.content
            # What BitTorrent clients read there: a bencoded failure.
            assert b"14:failure reason" in announce_raw(standby.url, b"x" * 20)
            async with (
                open_tracker_client(urls(trackers), node="a", token=TOKEN) as a,
                open_tracker_client(urls(trackers), node="b", token=TOKEN) as b,
            ):
                await a.acquire_lease(digest, size=size)  # the holder defines the torrent
                await a.publish_metainfo(digest, size, meta.data)
                await a.put_manifest(MANIFEST_DIGEST, "127.0.0.1:5000", "app", OCI, MANIFEST)
                assert (await b.acquire_lease(leased, size=10)).status is wire.LeaseStatus.GRANTED
            info_hash = meta.swarm_keys[0]
            announce(first.url, info_hash, "a", 7001, 0)
            wait_until(lambda: server.cli("HKEYS", f"p2preg:p:{digest}") == ["a"], timeout_s=10,
                       what="the peer written to the store")  # fmt: skip
            crash(first)
            killed_at = time.monotonic()
            # Until the dead one's term runs out, the standby says it stands by for
            # another: a node waiting for a lease asks again instead of going upstream.
            async with open_tracker_client(urls(trackers), node="c", token=TOKEN) as c:
                with pytest.raises(errors.StandingBy):
                    await c.acquire_lease(leased)
            took_over = serving(trackers)
            assert took_over is standby
            print(f"a standby served {time.monotonic() - killed_at:.1f} s after the kill")
            assert metric(standby, "p2preg_tracker_terms_total") == 1
            async with open_tracker_client(urls(trackers), node="c", token=TOKEN) as c:
                record = await c.lookup_metainfo(digest)
                assert record is not None and record.metainfo == meta.data
                shelved = await c.get_manifest(MANIFEST_DIGEST)
                assert shelved == wire.ManifestBody(OCI, MANIFEST, ["127.0.0.1:5000/app"])
                waiting = await c.acquire_lease(leased)
                assert waiting.status is wire.LeaseStatus.WAIT and waiting.holder == "b"
                assert (await c.acquire_lease(digest)).status is wire.LeaseStatus.SEEDED
            # The peer that announced to the dead replica is handed out by this one.
            answer = announce(standby.url, info_hash, "c", 7003, 1)
            assert answer[b"peers"] == bytes([127, 0, 0, 1]) + (7001).to_bytes(2, "big")
        # Every replica restarted at once: the state is Redis's, not theirs.
        with replicas(tmp_path, server.url(), 2, first=2, extra=KEEP_SILENT, **STORE) as trackers:
            serving(trackers)
            async with open_tracker_client(urls(trackers), node="c", token=TOKEN) as c:
                record = await c.lookup_metainfo(digest)
                assert record is not None and record.metainfo == meta.data
                assert (await c.acquire_lease(leased)).holder == "b"


async def test_while_redis_is_away_no_replica_serves_and_one_comes_back(tmp_path: Path) -> None:
    digest, size, meta = blob(tmp_path)
    server = start_redis(tmp_path / "redis", password=PASSWORD, persist=True)
    try:
        with replicas(tmp_path, server.url(), 2, **STORE) as trackers:
            leader = serving(trackers)
            async with open_tracker_client(urls(trackers), node="a", token=TOKEN) as a:
                await a.acquire_lease(digest, size=size)
                await a.publish_metainfo(digest, size, meta.data)
            server.stop()
            wait_until(lambda: not any(ready(t) for t in trackers), timeout_s=10,
                       what="every replica to stand by")  # fmt: skip
            async with open_tracker_client(urls(trackers), node="b", token=TOKEN) as b:
                # What a node sees: the tracker is unavailable (no replica stands by for
                # another), so it fetches upstream.
                with trio.fail_after(30), pytest.raises(errors.TrackerUnavailable) as away:
                    await b.acquire_lease(digest)
                assert type(away.value) is errors.TrackerUnavailable
            assert metric(leader, "p2preg_tracker_step_downs_total", why="unreachable") == 1
            assert metric(leader, "p2preg_tracker_leading") == 0
            assert "the store did not answer" in log_of(leader)
            assert all("stands by: it cannot reach the store" in log_of(t) for t in trackers)
            server = server.restart()
            back = serving(trackers)
            async with open_tracker_client([back.url], node="b", token=TOKEN) as b:
                record = await b.lookup_metainfo(digest)
                assert record is not None and record.metainfo == meta.data
    finally:
        server.stop()


async def test_a_sentinel_failover_ends_the_term_and_a_lost_grant_is_fenced(
    tmp_path: Path,
) -> None:
    kept, size, meta = blob(tmp_path)
    lost, lost_size, lost_meta = blob(tmp_path, b"granted just before the primary died")
    with (
        start_redis(tmp_path / "primary", password=PASSWORD) as primary,
        start_redis(tmp_path / "replica", replica_of=primary) as replica,
        start_sentinels(tmp_path / "sentinels", primary) as sentinels,
        replicas(tmp_path, sentinels.url(), 1, **STORE) as trackers,
    ):
        tracker = serving(trackers)
        async with open_tracker_client(urls(trackers), node="a", token=TOKEN) as a:
            await a.acquire_lease(kept, size=size)
            await a.publish_metainfo(kept, size, meta.data)
            # The replica is cut off (stopped, its link closed, so nothing waits in
            # its socket either): the next grant lives on the primary alone.
            os.kill(replica.pid, signal.SIGSTOP)
            try:
                primary.cli("CLIENT", "KILL", "TYPE", "replica")
                grant = await a.acquire_lease(lost, size=lost_size)
                assert grant.status is wire.LeaseStatus.GRANTED and grant.lease_id
                killed_at = time.monotonic()
                primary.kill()
            finally:
                os.kill(replica.pid, signal.SIGCONT)
            wait_for_failover(sentinels, primary, timeout_s=60)
            wait_until(
                lambda: metric(tracker, "p2preg_tracker_terms_total") >= 2 and ready(tracker),
                timeout_s=60,
                what="a new term after the failover",
            )
            took = time.monotonic() - killed_at
            print(f"serving again {took:.1f} s after the primary died")
            record = await a.lookup_metainfo(kept)  # replicated before: it survived
            assert record is not None and record.metainfo == meta.data
            with pytest.raises(errors.LeaseLost):
                await a.renew_lease(lost, grant.lease_id, 5, lost_size)
            async with open_tracker_client(urls(trackers), node="b", token=TOKEN) as b:
                taken = await b.acquire_lease(lost, size=lost_size)
                assert taken.status is wire.LeaseStatus.GRANTED and taken.holder == "b"
                await a.release_lease(lost, grant.lease_id)  # the lost id frees nothing
                assert (await a.acquire_lease(lost)).holder == "b"
                with pytest.raises(errors.Forbidden):
                    await a.publish_metainfo(lost, lost_size, lost_meta.data)



async def test_a_takeover_keeps_chunk_records_and_an_open_chunk_dispute(tmp_path: Path) -> None:
    fetching = Cut.make(tmp_path / "fetching", blob_data())
    data = blob_data()
    honest, lie = Cut.make(tmp_path / "honest", data), Cut.make(tmp_path / "lie", data, lie=True)
    with (
        start_redis(tmp_path / "redis", password=PASSWORD) as server,
        replicas(tmp_path, server.url(), 2, **STORE) as trackers,
    ):
        first = serving(trackers)
        async with (
            open_tracker_client(urls(trackers), node="holder", token=TOKEN) as holder,
            open_tracker_client(urls(trackers), node="evil", token=TOKEN) as evil,
            open_tracker_client(urls(trackers), node="reporter", token=TOKEN) as reporter,
        ):
            await holder.acquire_lease(fetching.blob, size=len(data))
            await fetching.publish(holder, 2)  # mid-blob
            await evil.acquire_lease(lie.blob, size=len(data))
            await lie.publish(evil)
            await reporter.report_chunks(lie.blob, "evil", "the chunks do not hash to the blob")
        # A standby holds no chunk read: it answers at once that another replica serves.
        standby = next(t for t in trackers if t is not first)
        r = chunk_read(standby, fetching.blob, "?have=2&wait=20")
        assert r.status_code == 503 and b"standing_by" in r.content
        crash(first)
        took_over = serving(trackers)
        assert took_over is not first
        async with (
            open_tracker_client(urls(trackers), node="reporter", token=TOKEN) as reporter,
            open_tracker_client(urls(trackers), node="verifier", token=TOKEN) as verifier,
            open_tracker_client(urls(trackers), node="evil", token=TOKEN) as evil,
        ):
            # A waiter mid-blob still reads the list the dead replica was given.
            listing = await reporter.list_chunks(fetching.blob)
            assert listing is not None and listing.open
            assert (listing.publisher, listing.digests) == ("holder", fetching.digests[:2])
            # The dispute stands: its records stay aside, its sides wait, a third verifies.
            aside = await reporter.list_chunks(lie.blob)
            assert aside is not None and (aside.publisher, aside.digests) == ("evil", [])
            assert (await reporter.acquire_lease(lie.blob)).status is wire.LeaseStatus.WAIT
            lease = await verifier.acquire_lease(lie.blob, size=len(data))
            assert lease.status is wire.LeaseStatus.VERIFY
            await verifier.publish_chunk(lie.blob, honest.msg("verifier", 0))
            assert metric(took_over, "p2preg_tracker_disputes_total", outcome="overturned") == 1
            with pytest.raises(errors.Forbidden):  # quarantined, in the store too
                await evil.acquire_lease(Digest.of(b"any other blob"), size=1)
        assert server.cli("SMEMBERS", f"p2preg:kb:{lie.blob}") == ["evil"]
        assert server.cli("HEXISTS", "p2preg:q:evil", "until") == ["1"]
