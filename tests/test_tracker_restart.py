"""`p2preg tracker` as a process: killed and restarted, it keeps metainfo and leases."""

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

from p2preg.core import wire
from p2preg.core.digest import Digest
from tracker.client import open_tracker_client
from tracker.metainfo import make_metainfo

pytestmark = pytest.mark.integration

TOKEN = "restart-token"
P2PREG = [sys.executable, "-m", "p2preg"]


@asynccontextmanager
async def tracker_process(data_dir: Path) -> AsyncIterator[str]:
    env = {**os.environ, "P2PREG_TOKEN": TOKEN, "P2PREG_LEASE_TTL_S": "60"}
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
