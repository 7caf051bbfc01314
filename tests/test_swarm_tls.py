"""The node's swarm over TLS (p2preg/node/swarm.py, peertls.py): real libtorrent sessions.

Two nodes' `Swarm`s with certificates from one cluster CA move a blob over their
SSL ports, finding each other through the real tracker under mutual TLS
(`serve_tracker` in the test's trio run), which admits only node certificates
of its cluster: so the announces showed the node's certificate. A bare
libtorrent session holding the metainfo — with no certificate, another CA's,
an expired one, or speaking plain BitTorrent — gets no byte from a node, and
the node counts the refused handshake. Real time here: libtorrent runs its own
threads.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes

import libtorrent as lt
import pytest
import trio

from harness.node import metric_value
from harness.tlscerts import ClusterCA, expired_tls_dir, https_client
from p2preg.core.digest import Digest
from p2preg.core.metainfo import Metainfo
from p2preg.core.tls import ReloadingTLS
from p2preg.node.metrics import NodeMetrics
from p2preg.node.peertls import PeerTLS, listen_interfaces, write_dh_params
from p2preg.node.relay import open_relay
from p2preg.node.swarm import Swarm, open_swarm
from tests.tracker_helpers import file_as_holder, running_tracker
from tracker.client import open_tracker_client
from tracker.metainfo import make_metainfo

pytestmark = pytest.mark.slow

SIZE = 3 << 20


@pytest.fixture
def ca() -> ClusterCA:
    return ClusterCA.make("swarmtls")


@asynccontextmanager
async def tls_tracker(tmp_path: Path, ca: ClusterCA, meta: Metainfo) -> AsyncIterator[str]:
    """The real tracker under mutual TLS, holding `meta` (it refuses unknown info-hashes)."""
    tls_dir = ca.tls_dir(tmp_path / "tracker-tls", "tracker", "t", ips=["127.0.0.1"])
    async with running_tracker(tmp_path, tls_dir=tls_dir) as url:
        publisher = ReloadingTLS(ca.tls_dir(tmp_path / "pub-tls", "node", "pub"), role="node")
        async with open_tracker_client(url, node="pub", tls=publisher) as client:
            await file_as_holder(client, meta)
        yield url


async def _tracker_view(
    url: str, tls_dir: Path, meta: Metainfo
) -> tuple[set[int], dict[str, float], str]:
    """What a third node learns from the tracker: the peers' ports, its refusals, metrics."""
    (ih,) = meta.swarm_keys
    query = (f"info_hash={quote_from_bytes(ih)}&peer_id={'-XX0000-' + '9' * 12}&port=9"
             "&uploaded=0&downloaded=0&left=1&compact=1&numwant=50")
    async with https_client(tls_dir, headers={"Connection": "close"}) as http:
        peers = lt.bdecode((await http.get(f"{url}/announce?{query}")).content)[b"peers"]
        metrics = (await http.get(f"{url}/metrics")).text
    ports = {int.from_bytes(peers[i + 4 : i + 6], "big") for i in range(0, len(peers), 6)}
    found = re.findall(r'^p2preg_tracker_tls_refusals_total\{reason="(\w+)"\} (\S+)$',
                       metrics, re.M)
    return ports, {r: float(n) for r, n in found}, metrics


def _blob(tmp_path: Path, ca: ClusterCA) -> tuple[Path, Metainfo]:
    data = os.urandom(SIZE)
    path = tmp_path / "verified-blob"
    path.write_bytes(data)
    return path, make_metainfo(path, Digest.of(data), SIZE, root=ca.cert_pem)


@asynccontextmanager
async def tls_swarm(
    tmp_path: Path,
    ca: ClusterCA,
    name: str,
    tracker_url: str | None,
    metrics: NodeMetrics,
    issuer: ClusterCA | None = None,
) -> AsyncIterator[tuple[Swarm, PeerTLS]]:
    """A node's swarm; its certificate is `issuer`'s (default `ca`'s), of `issuer`'s
    cluster. Its announces go through its relay and a tracker client showing that
    certificate, as a node's do (None: no tracker, a closed port)."""
    tls_dir = (issuer or ca).tls_dir(tmp_path / f"{name}-tls", "node", name)
    tls = PeerTLS(
        ReloadingTLS(tls_dir, role="node"),
        tmp_path / name,
    )
    listen = listen_interfaces("127.0.0.1", 0, 0, tls=True)
    as_node = ReloadingTLS(tls_dir, role="node")
    async with (
        open_tracker_client(tracker_url or "https://127.0.0.1:9", node=name, tls=as_node) as client,
        open_relay(client, metrics) as relay,
        open_swarm(tmp_path / name, listen, relay.url, metrics, tls=tls) as swarm,
    ):
        relay.attach(swarm)
        yield swarm, tls


def test_with_tls_only_the_ssl_interface_is_opened() -> None:
    assert listen_interfaces("0.0.0.0", 6881, 6882, tls=True) == "0.0.0.0:6882s"
    assert listen_interfaces("0.0.0.0", 6881, 6882, tls=False) == "0.0.0.0:6881"
    assert listen_interfaces("::", 6881, 6882, tls=True) == "[::]:6882s"


async def test_two_nodes_with_certificates_from_one_ca_move_a_blob_over_the_ssl_port(
    tmp_path: Path, ca: ClusterCA
) -> None:
    path, meta = _blob(tmp_path, ca)
    a_metrics, b_metrics = NodeMetrics(), NodeMetrics()
    viewer = ca.tls_dir(tmp_path / "c-tls", "node", "c")
    with trio.fail_after(60):
        async with (
            tls_tracker(tmp_path, ca, meta) as url,
            tls_swarm(tmp_path, ca, "a", url, a_metrics) as (a, _),
            tls_swarm(tmp_path, ca, "b", url, b_metrics) as (b, _),
        ):
            a.seed(meta, path)
            assert await a.wait_announced(meta.digest, 20)
            got = await b.download(meta, stall_s=20, max_hash_failures=2)
            assert got.read_bytes() == path.read_bytes()
            assert b.peer_bytes(meta.digest) >= SIZE
            # The tracker took both announces (it takes none without a node
            # certificate of its cluster), each with the port peers reach it on,
            # and refused no connection of theirs.
            assert await b.wait_announced(meta.digest, 20)
            ports, refusals, _ = await _tracker_view(url, viewer, meta)
            assert {a.listen_port, b.listen_port} <= ports
            assert set(refusals.values()) == {0.0}
    assert a_metrics.registry.get_sample_value("p2preg_peer_tls_refusals_total") == 0


def _bare_session(meta: Metainfo, save: Path, cert_dir: Path | None) -> tuple[Any, Any]:
    """An outsider's libtorrent session holding the metainfo, and its torrent."""
    ses = lt.session({
        "listen_interfaces": "127.0.0.1:0,127.0.0.1:0s",
        "enable_dht": False, "enable_lsd": False, "enable_upnp": False, "enable_natpmp": False,
        "enable_outgoing_utp": False, "enable_incoming_utp": False,
        "allow_multiple_connections_per_ip": True,
    })
    atp = lt.add_torrent_params()
    atp.ti = lt.torrent_info(meta.data)
    atp.save_path = str(save)
    atp.flags &= ~(lt.torrent_flags.auto_managed | lt.torrent_flags.paused)
    handle = ses.add_torrent(atp)
    if cert_dir is not None:
        dh = write_dh_params(save)
        handle.set_ssl_certificate(str(cert_dir / "tls.crt"), str(cert_dir / "tls.key"), str(dh))
    return ses, handle


async def until(ready: Callable[[], bool], interval_s: float = 0.05) -> None:
    """Poll; the test's fail_after bounds it."""
    while not ready():  # noqa: ASYNC110  (no event: libtorrent's threads change it)
        await trio.sleep(interval_s)


def _refusals(metrics: NodeMetrics) -> float:
    return metrics.registry.get_sample_value("p2preg_peer_tls_refusals_total") or 0.0


@pytest.mark.parametrize("who", ["no certificate", "another CA", "expired"])
async def test_a_bare_session_with_the_metainfo_gets_no_byte(
    tmp_path: Path, ca: ClusterCA, who: str
) -> None:
    path, meta = _blob(tmp_path, ca)
    cert_dir = {
        "no certificate": None,
        "another CA": ClusterCA.make("swarmtls").tls_dir(tmp_path / "x", "node", "x"),
        "expired": expired_tls_dir(ca, tmp_path / "x", "node", "x"),
    }[who]
    metrics = NodeMetrics()
    with trio.fail_after(60):
        async with tls_swarm(tmp_path, ca, "a", None, metrics) as (a, _):
            a.seed(meta, path)
            save = tmp_path / "outsider"
            save.mkdir()
            ses, handle = _bare_session(meta, save, cert_dir)
            handle.connect_peer(("127.0.0.1", a.listen_port))
            # The node refused the handshake, and counted it; the outsider then
            # holds a failed peer and no piece.
            await until(lambda: _refusals(metrics) >= 1)
            status = handle.status()
            assert status.total_payload_download == 0 and status.num_pieces == 0
            del ses


def test_plain_bittorrent_to_the_ssl_port_gets_no_handshake(tmp_path: Path, ca: ClusterCA) -> None:
    path, meta = _blob(tmp_path, ca)

    async def run() -> bytes:
        async with tls_swarm(tmp_path, ca, "a", None, NodeMetrics()) as (a, _):
            a.seed(meta, path)
            port = a.listen_port
            return await trio.to_thread.run_sync(_plain_handshake, port, meta)

    reply = trio.run(run)
    assert b"BitTorrent protocol" not in reply
    assert reply[:1] in (b"", b"\x15")  # nothing, or a TLS alert record


def _plain_handshake(port: int, meta: Metainfo) -> bytes:
    hello = b"\x13BitTorrent protocol" + bytes(8) + meta.swarm_keys[0] + b"-XX0000-" + bytes(12)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(hello)
        got = b""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until the node closes the connection
            try:
                chunk = s.recv(4096)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            got += chunk
        return got


async def test_renewed_certificate_files_reach_every_torrent(
    tmp_path: Path, ca: ClusterCA
) -> None:
    """A renewal is set again on a running torrent: its next announce shows the new
    certificate. The first one names another cluster (the same CA signs for it),
    which the tracker refuses; the renewed one is of the tracker's cluster."""
    path, meta = _blob(tmp_path, ca)
    viewer = ca.tls_dir(tmp_path / "c-tls", "node", "c")
    elsewhere = ClusterCA("elsewhere", ca.ca)
    with trio.fail_after(60):
        async with (
            tls_tracker(tmp_path, ca, meta) as url,
            tls_swarm(
                tmp_path, ca, "a", url, NodeMetrics(), issuer=elsewhere
            ) as (a, peer_tls),
        ):
            a.seed(meta, path)
            refusals: dict[str, float] = {}
            while not refusals.get("wrong_cluster"):
                a.reannounce(meta.digest)
                await trio.sleep(0.2)
                ports, refusals, _ = await _tracker_view(url, viewer, meta)
            assert a.listen_port not in ports
            before = peer_tls.generation
            renewed = ca.tls_dir(tmp_path / "a-tls", "node", "a")
            await until(lambda: peer_tls.generation != before)  # stats every 5 s
            # a holds the verified blob: it says so, so its left=0 counts as a seeder.
            as_a = ReloadingTLS(renewed, role="node")
            async with open_tracker_client(url, node="a", tls=as_a) as client:
                await client.confirm_seed(meta.digest, meta.info_hash_v2)
            # The swarm's watcher sets it within a second; until then announces
            # still show the old certificate.
            while a.listen_port not in ports:
                a.reannounce(meta.digest)
                await trio.sleep(0.2)
                ports, _, metrics = await _tracker_view(url, viewer, meta)
            assert metric_value(metrics, "p2preg_tracker_seeders") == 1

