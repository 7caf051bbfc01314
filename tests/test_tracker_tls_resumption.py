"""Which mutual-TLS announces resume a TLS session, counted by the real tracker.

Every HTTPS announce is a new connection; a full handshake costs the tracker
~1.6 ms of CPU, a resumed one about a third less (docs/BENCHMARKS.md). The
tracker counts admitted handshakes in
`p2preg_tracker_tls_handshakes_total{resumed}`. Shown here against a real
`p2preg tracker --tls-dir`:

- it resumes a client that offers its last session (TLS 1.3 tickets), still
  knowing the client by the certificate of the first handshake: the answer
  names its peer;
- libtorrent 2.1.1, announcing an SSL torrent three times as a node does,
  offers no session: every announce is a full handshake. docs/TRACKER.md's
  capacity arithmetic rests on that; should a libtorrent start resuming, this
  test fails and the arithmetic is to be redone.
"""

from __future__ import annotations

import re
import socket
import ssl
import time
from pathlib import Path
from typing import cast
from urllib.parse import quote_from_bytes

import httpx
import libtorrent as lt
import pytest
import trio

from harness.tlscerts import ClusterCA, client_ssl_context, https_client
from harness.tracker import TrackerProcess, open_tracker
from p2preg.core.metainfo import Metainfo
from p2preg.node.peertls import write_dh_params
from tests.tracker_helpers import blob_meta, file_as_holder
from tracker.client import TrackerClient

pytestmark = pytest.mark.integration

ANNOUNCES = 3
WAIT_S = 20.0  # bound on each wait for libtorrent or the tracker


def handshakes(t: TrackerProcess) -> dict[str, float]:
    assert t.metrics_url is not None
    text = httpx.get(f"{t.metrics_url}/metrics", timeout=10).text
    found = re.findall(
        r'^p2preg_tracker_tls_handshakes_total\{resumed="(\w+)"\} (\S+)$', text, re.M
    )
    return {resumed: float(n) for resumed, n in found}


def announces(t: TrackerProcess) -> float:
    """Announces the tracker answered, every event and transport."""
    assert t.metrics_url is not None
    text = httpx.get(f"{t.metrics_url}/metrics", timeout=10).text
    return sum(
        float(n) for n in re.findall(r"^p2preg_tracker_announces_total\{.*\} (\S+)$", text, re.M)
    )


def _announce(
    port: int, ctx: ssl.SSLContext, meta: Metainfo, session: ssl.SSLSession | None, peer: int
) -> tuple[bytes, ssl.SSLSession | None, bool]:
    """One announce on a new connection: (answer, the session to offer next, resumed)."""
    query = (
        f"info_hash={quote_from_bytes(meta.swarm_keys[0], safe='')}"
        f"&peer_id=-PY0001-{peer:012d}&port={7000 + peer}&left=5&compact=1"
    )
    with (
        socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1", session=session) as tls,
    ):
        tls.sendall(f"GET /announce?{query} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        answer = b""
        for _ in range(100):  # an answer is a few hundred bytes
            chunk = tls.recv(65536)
            if not chunk:
                break
            answer += chunk
        return answer, tls.session, bool(tls.session_reused)


def _setup(tmp_path: Path) -> tuple[ClusterCA, Path, Path, Path]:
    ca = ClusterCA.make("test")
    root = tmp_path / "certs"
    tracker = ca.tls_dir(root / "tracker", "tracker", "t", ips=["127.0.0.1"])
    return ca, tracker, ca.tls_dir(root / "n1", "node", "n1"), ca.tls_dir(root / "n2", "node", "n2")


async def _publish(t: TrackerProcess, node: Path, meta: Metainfo) -> None:
    async with https_client(node) as http:
        await file_as_holder(TrackerClient(t.url, node="n1", http=http), meta)


def test_a_client_offering_its_session_is_resumed_and_still_known(tmp_path: Path) -> None:
    ca, tracker_dir, n1, n2 = _setup(tmp_path)
    meta = blob_meta(tmp_path, root=ca.cert_pem)
    with open_tracker(tmp_path / "t", tls_dir=tracker_dir) as t:
        trio.run(_publish, t, n1, meta)
        port = int(t.url.rsplit(":", 1)[1])
        _announce(port, client_ssl_context(n2), meta, None, 2)  # n2 in the swarm, a peer for n1
        before = handshakes(t)
        ctx, session, reused = client_ssl_context(n1), None, []
        for _ in range(ANNOUNCES):
            answer, session, was = _announce(port, ctx, meta, session, 1)
            reused.append(was)
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
            # n1 (by its certificate, even when resumed) gets n2's peer, never its own.
            body = cast(dict[bytes, bytes], lt.bdecode(answer.split(b"\r\n\r\n", 1)[1]))
            peers = body[b"peers"]
            assert peers == socket.inet_aton("127.0.0.1") + (7002).to_bytes(2, "big")
        assert reused == [False] + [True] * (ANNOUNCES - 1)
        after = handshakes(t)
        assert after["true"] - before["true"] == ANNOUNCES - 1
        assert after["false"] - before["false"] == 1


def _libtorrent_announces(t: TrackerProcess, n1: Path, meta: Metainfo, save: Path) -> int:
    """A node's way: SSL torrent, certificate, then the tracker; announce ANNOUNCES times."""
    ses = lt.session(
        {
            "listen_interfaces": "127.0.0.1:0s",
            "enable_dht": False,
            "enable_lsd": False,
            "enable_upnp": False,
            "enable_natpmp": False,
            "alert_mask": lt.alert_category.tracker | lt.alert_category.error,
        }
    )
    atp = lt.add_torrent_params()
    atp.ti = lt.torrent_info(meta.data)
    atp.save_path = str(save)
    atp.flags &= ~(lt.torrent_flags.auto_managed | lt.torrent_flags.paused)
    handle = ses.add_torrent(atp)
    dh = write_dh_params(save)
    handle.set_ssl_certificate(str(n1 / "tls.crt"), str(n1 / "tls.key"), str(dh))
    handle.add_tracker({"url": f"{t.url}/announce", "tier": 0})
    replies = 0
    for n in range(ANNOUNCES):
        if n:
            handle.force_reannounce(0, -1, lt.reannounce_flags_t.ignore_min_interval)
        deadline = time.monotonic() + WAIT_S
        while replies <= n and time.monotonic() < deadline:
            ses.wait_for_alert(100)
            for alert in ses.pop_alerts():
                assert not isinstance(alert, lt.tracker_error_alert), alert.message()
                replies += isinstance(alert, lt.tracker_reply_alert)
    return replies


def test_libtorrent_shakes_hands_in_full_for_every_announce(tmp_path: Path) -> None:
    ca, tracker_dir, n1, _ = _setup(tmp_path)
    meta = blob_meta(tmp_path, root=ca.cert_pem)
    save = tmp_path / "save"
    save.mkdir()
    with open_tracker(tmp_path / "t", tls_dir=tracker_dir) as t:
        trio.run(_publish, t, n1, meta)
        before = handshakes(t)
        assert _libtorrent_announces(t, n1, meta, save) == ANNOUNCES
        # The session's `stopped` on the way out is one more announce, one more handshake.
        announced, after = announces(t), handshakes(t)
        assert announced >= ANNOUNCES
        assert after["false"] - before["false"] == announced
        assert after["true"] == before["true"] == 0
