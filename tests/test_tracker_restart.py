"""`p2preg tracker` as a process: killed and restarted, it keeps metainfo and leases, and
the chunk book: a blob's chunk records and an open chunk dispute with its bars."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import quote_from_bytes

import httpx
import libtorrent as lt
import pytest
import trio

from p2preg.core import errors, wire
from p2preg.core.digest import Digest
from tests.chunk_helpers import Cut, blob_data
from tracker.client import open_tracker_client
from tracker.metainfo import make_metainfo

pytestmark = pytest.mark.integration

TOKEN = "restart-token"
P2PREG = [sys.executable, "-m", "p2preg"]


@asynccontextmanager
async def tracker_process(data_dir: Path, **extra: str) -> AsyncIterator[str]:
    env = {**os.environ, "P2PREG_TOKEN": TOKEN, "P2PREG_LEASE_TTL_S": "60", **extra}
    args = [*P2PREG, "tracker", "--listen", "127.0.0.1:0", "--data-dir", str(data_dir)]
    proc = await trio.lowlevel.open_process(args, env=env, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    try:
        seen = b""
        with trio.fail_after(20):
            while (m := re.search(rb"serving on (http://\S+)", seen)) is None:
                chunk = await proc.stderr.receive_some(4096)
                assert chunk, f"tracker exited: {seen.decode(errors='replace')}"
                seen += chunk
        yield m.group(1).decode()
    finally:
        # SIGKILL: a crash, not a clean shutdown; durability must not depend on one.
        proc.send_signal(signal.SIGKILL)
        with trio.fail_after(10):
            await proc.wait()
        await proc.stderr.aclose()


async def test_restart_keeps_metainfo_and_leases_and_the_swarm_reforms(tmp_path: Path) -> None:
    data = os.urandom(150_000)
    digest = Digest.of(data)
    (tmp_path / "blob").write_bytes(data)
    meta = make_metainfo(tmp_path / "blob", digest, len(data))
    leased = Digest.of(b"being fetched from upstream")
    data_dir = tmp_path / "state"

    async with (
        tracker_process(data_dir) as url,
        open_tracker_client(url, node="a", token=TOKEN) as a,
    ):
        await a.acquire_lease(digest, size=len(data))  # the holder defines the torrent
        await a.publish_metainfo(digest, len(data), meta.data)
        lease = await a.acquire_lease(leased, size=10)
        assert lease.status is wire.LeaseStatus.GRANTED

    async with (
        tracker_process(data_dir) as url,
        open_tracker_client(url, node="b", token=TOKEN) as b,
        httpx.AsyncClient() as http,
    ):
        record = await b.lookup_metainfo(digest)
        assert record is not None and record.metainfo == meta.data
        waiting = await b.acquire_lease(leased)
        assert waiting.status is wire.LeaseStatus.WAIT and waiting.holder == "a"
        # Peers were not kept; the next announces form the swarm again.
        ih = quote_from_bytes(meta.swarm_keys[0])
        base = f"{url}/announce?info_hash={ih}&uploaded=0&downloaded=0&token={TOKEN}"
        await http.get(f"{base}&peer_id={'s' * 20}&port=7001&left=0&node=a")
        r = await http.get(f"{base}&peer_id={'l' * 20}&port=7002&left=1&node=b")
        answer = lt.bdecode(r.content)
        assert answer[b"peers"] == bytes([127, 0, 0, 1]) + (7001).to_bytes(2, "big")
        # a published it (kept with the metainfo): its left=0 still counts as a seeder.
        assert answer[b"complete"] == 1


async def test_restart_mid_chunk_dispute_keeps_the_records_the_dispute_and_its_bars(
    tmp_path: Path,
) -> None:
    data = blob_data()
    honest, lie = Cut.make(tmp_path / "honest", data), Cut.make(tmp_path / "lie", data, lie=True)
    blob = honest.blob
    data_dir = tmp_path / "state"
    # A short quarantine: what stops the liar after it ends is the bar alone.
    env = {"P2PREG_DISPUTE_QUARANTINE_S": "1"}

    async with tracker_process(data_dir, **env) as url, open_tracker_client(
        url, node="evil", token=TOKEN
    ) as evil:
        assert (await evil.acquire_lease(blob, size=len(data))).status is wire.LeaseStatus.GRANTED
        await lie.publish(evil, 2)
    # Killed mid-blob: a waiter still reads the list, and the holder goes on filing.
    async with tracker_process(data_dir, **env) as url, open_tracker_client(
        url, node="evil", token=TOKEN
    ) as evil, open_tracker_client(url, node="reporter", token=TOKEN) as reporter:
        listing = await reporter.list_chunks(blob)
        assert listing is not None and listing.open
        assert (listing.publisher, listing.digests) == ("evil", lie.digests[:2])
        await evil.publish_chunk(blob, lie.msg("evil", 2))
        await reporter.report_chunks(blob, "evil", "the chunks do not hash to the blob")
        aside = await reporter.list_chunks(blob)  # set aside: only their cut is named
        assert aside is not None and (aside.digests, aside.open) == ([], False)
    # Killed mid-dispute: the records stay aside, the sides wait, a third node verifies.
    async with tracker_process(data_dir, **env) as url, open_tracker_client(
        url, node="reporter", token=TOKEN
    ) as reporter, open_tracker_client(url, node="verifier", token=TOKEN) as verifier:
        aside = await reporter.list_chunks(blob)
        assert aside is not None and (aside.publisher, aside.digests) == ("evil", [])
        assert (await reporter.acquire_lease(blob)).status is wire.LeaseStatus.WAIT
        lease = await verifier.acquire_lease(blob, size=len(data))
        assert lease.status is wire.LeaseStatus.VERIFY and lease.lease_id is not None
        await verifier.publish_chunk(blob, honest.msg("verifier", 0))  # differs: convicts
        await verifier.release_lease(blob, lease.lease_id)
    # Killed after the verdict: the liar, out of quarantine, is still barred from the blob.
    async with tracker_process(data_dir, **env) as url, open_tracker_client(
        url, node="evil", token=TOKEN
    ) as evil:
        with trio.fail_after(30):
            while True:
                try:
                    retaken = await evil.acquire_lease(blob, size=len(data))
                    break
                except errors.Forbidden:  # quarantined a second more
                    await trio.sleep(0.2)
        assert retaken.status is wire.LeaseStatus.GRANTED
        with pytest.raises(errors.Forbidden, match="lost a chunk dispute"):
            await evil.publish_chunk(blob, lie.msg("evil", 0))


def test_bad_configuration_exits_with_status_2(tmp_path: Path) -> None:
    env = {**os.environ, "P2PREG_NOT_A_KEY": "1"}
    result = subprocess.run(
        [*P2PREG, "tracker", "--data-dir", str(tmp_path)], env=env, capture_output=True, timeout=30
    )
    assert result.returncode == 2
    assert b"unknown environment variable P2PREG_NOT_A_KEY" in result.stderr
    result = subprocess.run(
        [*P2PREG, "tracker", "--listen", "nowhere", "--data-dir", str(tmp_path)],
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 2 and b"HOST:PORT" in result.stderr
