"""Seeders announce rarely, leechers often: the real tracker's answers, and libtorrent obeying them.

The tracker runs as its own process (the harness) for the answers over HTTP
and UDP; a libtorrent session with the node's settings (p2preg/node/swarm.py)
seeds a blob through an in-process tracker with a short seeders' interval, and
its announces are timed from its own alerts. The only times asserted are the
intervals the protocol returned: nothing here waits on the machine's speed.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from urllib.parse import quote_from_bytes, urlsplit

import httpx
import libtorrent as lt
import pytest
import trio

from harness.tracker import open_tracker
from p2preg.core.metainfo import Metainfo, info_name
from p2preg.node.swarmsettings import session_settings
from tests.tracker_helpers import blob_meta, blob_path, file_as_holder, running_tracker
from tracker import udp
from tracker.client import open_tracker_client
from tracker.intervals import AnnounceIntervals

pytestmark = pytest.mark.integration

# A re-announce may come this much before the interval told (see the last test).
SLACK_S = 1.25
LONG = AnnounceIntervals(interval_s=60, seeder_interval_s=1800, peer_ttl_s=150).bounds()


async def _file(url: str, meta: Metainfo) -> None:
    async with open_tracker_client(url, node="n1") as client:
        await file_as_holder(client, meta)


def _http_interval(url: str, ih: bytes, node: str, left: int, event: str = "") -> int:
    query = (
        f"info_hash={quote_from_bytes(ih)}&peer_id={node:-<20}&port=7001&uploaded=0"
        f"&downloaded=0&left={left}&compact=1&node={node}&event={event}"
    )
    r = httpx.get(f"{url}/announce?{query}", timeout=10, trust_env=False)
    answer = lt.bdecode(r.content)
    assert b"failure reason" not in answer, answer
    assert answer[b"min interval"] == 15
    return int(answer[b"interval"])


def _udp_interval(url: str, ih: bytes, node: str, left: int, event: int = 0) -> int:
    """One BEP 15 connect and announce naming `node` in its BEP 41 URL data."""
    address = ("127.0.0.1", urlsplit(url).port or 0)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(10)
        sock.sendto(struct.pack(">QII", udp.PROTOCOL_ID, 0, 1), address)
        _, _, cid = struct.unpack(">IIQ", sock.recv(2048))
        url_data = f"/announce?node={node}".encode()
        packet = struct.pack(
            ">QII20s20sQQQIIIiH", cid, 1, 2, ih, f"{node:-<20}".encode(), 0, left, 0, event,
            0, 0, -1, 7002,
        ) + bytes([2, len(url_data)]) + url_data + b"\x00"
        sock.sendto(packet, address)
        action, tid, interval = struct.unpack_from(">III", sock.recv(2048))
    assert (action, tid) == (1, 2)
    return int(interval)


def test_the_tracker_process_tells_seeders_the_long_interval_over_http_and_udp(
    tmp_path: Path,
) -> None:
    meta = blob_meta(tmp_path)
    ih = meta.swarm_keys[0]
    with open_tracker(tmp_path / "tracker") as tracker:
        trio.run(_file, tracker.url, meta)
        for transport, interval_of in (("http", _http_interval), ("udp", _udp_interval)):
            seeder, leecher = f"s-{transport}", f"l-{transport}"
            # A seeder the tracker has not seen: short; from then on, long.
            assert interval_of(tracker.url, ih, seeder, 0) == 60
            for _ in range(3):
                assert LONG[0] <= interval_of(tracker.url, ih, seeder, 0) <= LONG[1]
            assert interval_of(tracker.url, ih, leecher, 100) == 60
            assert interval_of(tracker.url, ih, leecher, 100) == 60
        # A leecher that completes: short for that answer, long after it.
        assert _http_interval(tracker.url, ih, "l-http", 0, "completed") == 60
        assert LONG[0] <= _http_interval(tracker.url, ih, "l-http", 0) <= LONG[1]
        assert LONG == (1620, 1980)


class Seeder:
    """A libtorrent session with the node's settings; when it announced, by its alerts."""

    def __init__(self) -> None:
        self.ses = lt.session(session_settings("127.0.0.1:0"))
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        self.ses.set_alert_fd(self._w)
        self.announces: list[float] = []
        self.replies = 0

    async def until_announces(self, count: int, timeout_s: float) -> None:
        with trio.fail_after(timeout_s):
            while len(self.announces) < count:
                for alert in self.ses.pop_alerts():
                    if isinstance(alert, lt.tracker_announce_alert):
                        self.announces.append(trio.current_time())
                    elif isinstance(alert, lt.tracker_reply_alert):
                        self.replies += 1
                    elif isinstance(alert, lt.tracker_error_alert):
                        raise AssertionError(f"tracker error: {alert.message()}")
                await trio.lowlevel.wait_readable(self._r)
                with suppress(BlockingIOError):
                    os.read(self._r, 4096)

    def close(self) -> None:
        self.ses.set_alert_fd(-1)
        del self.ses
        os.close(self._r)
        os.close(self._w)


@asynccontextmanager
async def open_seeder() -> AsyncIterator[Seeder]:
    seeder = Seeder()
    try:
        yield seeder
    finally:
        seeder.close()


async def test_a_seeding_session_reannounces_no_sooner_than_told(tmp_path: Path) -> None:
    # Leechers 6 s (above the node's min_announce_interval of 5 s), seeders 12 s ±10 %.
    settings = dict(
        announce_interval_s=6, min_announce_interval_s=1, peer_ttl_s=20,
        seeder_announce_interval_s=12,
    )
    short = 6
    long_low, _ = AnnounceIntervals(
        interval_s=6, seeder_interval_s=12, peer_ttl_s=20
    ).bounds()
    meta = blob_meta(tmp_path, 300_000)
    save = tmp_path / "seed"
    save.mkdir()
    os.link(blob_path(tmp_path, meta.digest), save / info_name(meta.digest))
    async with (
        running_tracker(tmp_path, **settings) as url,
        open_tracker_client(url, node="seeder") as client,
        open_seeder() as seeder,
    ):
        await file_as_holder(client, meta)
        params = lt.add_torrent_params()
        params.ti = lt.torrent_info(meta.data)
        params.save_path = str(save)
        params.trackers = [client.announce_url]
        # As the node seeds a verified blob (swarm.py).
        params.flags &= ~(lt.torrent_flags.auto_managed | lt.torrent_flags.paused)
        params.flags |= lt.torrent_flags.seed_mode
        seeder.ses.add_torrent(params)
        # started (news: 6 s), then as a known seeder (11-13 s), then once more.
        await seeder.until_announces(3, timeout_s=120)
        first, second, third = seeder.announces[:3]
    assert seeder.replies >= 2
    # libtorrent keeps announce times in whole seconds (time_point32), so it may
    # fire up to 1 s before the fraction; alerts are read within milliseconds.
    gaps = (second - first, third - second)
    assert gaps[0] >= short - SLACK_S, gaps
    assert gaps[1] >= long_low - SLACK_S, gaps
