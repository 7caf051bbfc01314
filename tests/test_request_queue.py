"""A node keeps few requests outstanding with each peer (p2preg/node/requestqueue.py).

libtorrent 2.1 never cancels an end-game copy, so what sits queued on a slower
connection when the end game starts arrives twice (docs/SWARM.md, "Redundant
bytes on shaped links"). Two real libtorrent sessions with the node's settings
on loopback, one seeding a 32 MiB blob to the other: the seeder advertises the
cap as `reqq` in its extended handshake (the leecher's peer log shows it), and
the leecher's queue of requests to it, sampled all through the transfer, never
holds more; on loopback with libtorrent's defaults it held thousands.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path
from typing import Any

import libtorrent as lt

from p2preg.core.digest import Digest
from p2preg.core.metainfo import info_name
from p2preg.node.requestqueue import REQUEST_QUEUE_BLOCKS
from p2preg.node.swarmsettings import session_settings
from tracker.metainfo import make_metainfo

MiB = 1 << 20
SIZE = 32 * MiB
DEADLINE_S = 60.0


def _session(settings: lt.settings_pack) -> Any:
    session = lt.session(settings)
    deadline = time.monotonic() + 10
    while session.listen_port() == 0:
        assert time.monotonic() < deadline, "session did not start listening"
        time.sleep(0.01)
    return session


def _params(meta: bytes, save: Path, *, seed: bool) -> Any:
    atp = lt.add_torrent_params()
    atp.ti = lt.torrent_info(meta)
    atp.save_path = str(save)
    atp.flags &= ~(lt.torrent_flags.auto_managed | lt.torrent_flags.paused)
    if seed:
        atp.flags |= lt.torrent_flags.seed_mode
    return atp


def test_a_peer_is_asked_for_at_most_the_advertised_queue(tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    data = os.urandom(SIZE)
    blob.write_bytes(data)
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())
    meta = make_metainfo(blob, digest, SIZE).data
    seed_dir, leech_dir = tmp_path / "seed", tmp_path / "leech"
    seed_dir.mkdir()
    leech_dir.mkdir()
    os.link(blob, seed_dir / info_name(digest))

    seeder = _session(session_settings("127.0.0.1:0"))
    leech_settings = session_settings("127.0.0.1:0")
    leech_settings["alert_mask"] = int(leech_settings["alert_mask"]) | lt.alert_category.peer_log
    leecher = _session(leech_settings)
    seeding = seeder.add_torrent(_params(meta, seed_dir, seed=True))
    handle = leecher.add_torrent(_params(meta, leech_dir, seed=False))
    handle.connect_peer(("127.0.0.1", seeder.listen_port()))

    most, samples, advertised = 0, 0, []
    deadline = time.monotonic() + DEADLINE_S
    while not handle.status().is_seeding:
        assert time.monotonic() < deadline, "the blob did not cross loopback in time"
        for p in handle.get_peer_info():
            most = max(most, int(p.download_queue_length))
            samples += 1
        for alert in leecher.pop_alerts():
            if isinstance(alert, lt.peer_log_alert) and "EXTENDED_HANDSHAKE" in alert.message():
                advertised += re.findall(r"'reqq': (\d+)", alert.message())
        time.sleep(0.002)
    for alert in leecher.pop_alerts():
        if isinstance(alert, lt.peer_log_alert) and "EXTENDED_HANDSHAKE" in alert.message():
            advertised += re.findall(r"'reqq': (\d+)", alert.message())

    # Both sides' handshakes (ours out, the seeder's in) carry the node's cap.
    assert advertised and set(advertised) == {str(REQUEST_QUEUE_BLOCKS)}
    assert samples > 0
    assert 0 < most <= REQUEST_QUEUE_BLOCKS
    assert int(handle.status().total_payload_download) >= SIZE
    leecher.remove_torrent(handle)
    seeder.remove_torrent(seeding)
