"""Real libtorrent sessions form a swarm through the tracker and move a blob.

Two sessions on loopback, TCP only, no DHT/LSD/UPnP/NAT-PMP, private torrents
(so no PEX): the only way the leecher can find the seeder is the peer list our
tracker hands out. Alerts are pumped with `set_alert_fd` on a pipe and
`trio.lowlevel.wait_readable` (DESIGN.md: never `set_alert_notify`).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import libtorrent as lt
import pytest
import trio

from p2preg.core.digest import Digest
from p2preg.core.metainfo import info_name
from tests.tracker_helpers import running_tracker
from tracker.client import open_tracker_client
from tracker.metainfo import make_metainfo

pytestmark = pytest.mark.integration

TOKEN = "swarm-secret"
BLOB_BYTES = 3 * 1024 * 1024 + 12345


class Session:
    """One libtorrent session whose alerts arrive through a pipe."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.ses = lt.session(
            {
                "listen_interfaces": "127.0.0.1:0",
                "enable_dht": False,
                "enable_lsd": False,
                "enable_upnp": False,
                "enable_natpmp": False,
                "enable_incoming_utp": False,
                "enable_outgoing_utp": False,
                "allow_multiple_connections_per_ip": True,
                "alert_mask": lt.alert_category.error
                | lt.alert_category.status
                | lt.alert_category.tracker
                | lt.alert_category.peer
                | lt.alert_category.connect,
                "user_agent": f"p2preg-test/{name}",
            }
        )
        self._r, w = os.pipe()
        os.set_blocking(self._r, False)
        self._w = w
        self.ses.set_alert_fd(w)
        self.alerts: list[lt.alert] = []

    @property
    def port(self) -> int:
        return int(self.ses.listen_port())

    async def wait_for(self, match: Callable[[lt.alert], bool], timeout_s: float) -> lt.alert:
        """The first alert that `match`es; read it before the next `wait_for`.

        libtorrent frees alerts at the next `pop_alerts`: the ones kept from the
        last batch are looked at before popping, and dropped when a batch comes.
        """
        with trio.fail_after(timeout_s):
            while True:
                for alert in self.alerts:
                    if match(alert):
                        self.alerts.remove(alert)
                        return alert
                self.alerts = list(self.ses.pop_alerts())
                for alert in self.alerts:
                    if isinstance(alert, lt.tracker_error_alert):
                        raise AssertionError(f"{self.name}: tracker error: {alert.message()}")
                if any(match(alert) for alert in self.alerts):
                    continue
                await trio.lowlevel.wait_readable(self._r)
                with suppress(BlockingIOError):
                    os.read(self._r, 4096)

    def close(self) -> None:
        self.ses.set_alert_fd(-1)
        del self.ses
        os.close(self._r)
        os.close(self._w)


@asynccontextmanager
async def open_session(name: str) -> AsyncIterator[Session]:
    session = Session(name)
    try:
        yield session
    finally:
        session.close()


@asynccontextmanager
async def swarm_tracker(tmp_path: Path) -> AsyncIterator[str]:
    """The shared in-process tracker, announcing often enough for a short test."""
    async with running_tracker(
        tmp_path, token=TOKEN, announce_interval_s=2, min_announce_interval_s=1, peer_ttl_s=10
    ) as url:
        yield url


def add_torrent(
    session: Session, metainfo: bytes, save_path: Path, tracker_url: str
) -> lt.torrent_handle:
    params = lt.add_torrent_params()
    params.ti = lt.torrent_info(metainfo)
    params.save_path = str(save_path)
    params.trackers = [tracker_url]
    return session.ses.add_torrent(params)


@pytest.mark.parametrize("transport,hybrid", [("http", False), ("udp", True)])
async def test_swarm_forms_through_tracker_and_moves_the_blob(
    tmp_path: Path, transport: str, hybrid: bool
) -> None:
    blob = os.urandom(BLOB_BYTES)
    digest = Digest.of(blob)
    seed_dir, leech_dir = tmp_path / "seed", tmp_path / "leech"
    seed_dir.mkdir()
    leech_dir.mkdir()
    (seed_dir / info_name(digest)).write_bytes(blob)
    meta = make_metainfo(seed_dir / info_name(digest), digest, len(blob), hybrid=hybrid)

    async with (
        swarm_tracker(tmp_path) as base_url,
        open_tracker_client(base_url, node="seeder", token=TOKEN) as client,
        open_tracker_client(base_url, node="leecher", token=TOKEN) as leecher_client,
        open_session("seeder") as seeder,
        open_session("leecher") as leecher,
    ):
        await client.acquire_lease(digest, size=len(blob))  # the holder defines the torrent
        await client.publish_metainfo(digest, len(blob), meta.data)
        url = client.announce_url if transport == "http" else client.udp_announce_url
        # The node name rides along: the tracker keeps one peer per node in a swarm.
        assert url.endswith(f"/announce?token={TOKEN}&node=seeder")
        leecher_url = (
            leecher_client.announce_url if transport == "http" else leecher_client.udp_announce_url
        )

        seed_handle = add_torrent(seeder, meta.data, seed_dir, url)
        await seeder.wait_for(lambda a: isinstance(a, lt.torrent_finished_alert), 20)
        seed_handle.force_reannounce()
        # The seeder is a seeder in the tracker's eyes before the leecher asks.
        await seeder.wait_for(
            lambda a: isinstance(a, lt.tracker_reply_alert) and seed_handle.status().is_seeding,
            20,
        )

        add_torrent(leecher, meta.data, leech_dir, leecher_url)
        reply = await leecher.wait_for(lambda a: isinstance(a, lt.tracker_reply_alert), 20)
        assert reply.num_peers >= 1
        connected = await leecher.wait_for(
            lambda a: isinstance(a, lt.peer_connect_alert | lt.incoming_connection_alert), 20
        )
        # The two met through the tracker, which hands each the other: either the
        # leecher reached the seeder's port, or the seeder reached the leecher's.
        if isinstance(connected, lt.peer_connect_alert):
            assert connected.endpoint[1] == seeder.port
        else:
            dialled = await seeder.wait_for(lambda a: isinstance(a, lt.peer_connect_alert), 20)
            assert dialled.endpoint[1] == leecher.port
        await leecher.wait_for(lambda a: isinstance(a, lt.torrent_finished_alert), 30)

    assert (leech_dir / info_name(digest)).read_bytes() == blob
