"""Caps on connections that have not shown who they are, with real sockets.

The tracker (serve_tracker in this trio run, real listener, real SQLite) with
3 places per client address and 5 in all, plain and under mutual TLS: silent
connections hold places until they send a request (plain) or finish a
handshake (TLS); past the per-address cap the next connection from that
address is closed unanswered while another address is served; past the total
the next one from anywhere is closed; a place given back is taken again. The
plain metrics listener has places of its own, which is how the test watches.
Client addresses are 127.0.0.x (all of 127/8 is loopback on Linux). A
connection whose client certificate was verified holds no place and stays
open, idle, past the 5 s an anonymous one gets: a node's relay batches reuse it.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import pytest
import trio

from harness.node import metric_value
from harness.procs import free_port
from harness.tlscerts import ClusterCA, client_ssl_context
from p2preg.core.config import HostPort
from tests.tracker_helpers import running_tracker
from tracker import http_listener
from tracker.client import KEEPALIVE_EXPIRY_S
from tracker.http_listener import KEEP_ALIVE_TIMEOUT_S

WAIT_S = 10.0


async def _silent(url: str, source: str) -> trio.SocketStream:
    """A TCP connection from `source` that says nothing."""
    host, port = url.rsplit("/", 1)[-1].rsplit(":", 1)
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect((host, int(port)))
    return trio.SocketStream(sock)


async def _closed_unanswered(stream: trio.SocketStream) -> bool:
    """The tracker hung up without a byte (True), or is still holding it (False)."""
    with trio.move_on_after(2.0):
        try:
            return await stream.receive_some(1) == b""
        except trio.BrokenResourceError:
            return True  # reset: closed all the same
    return False


async def _metric(metrics_url: str, name: str, **labels: str) -> float:
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{metrics_url}/metrics", timeout=10)).text
    return metric_value(text, name, **labels)


async def _gauge_reaches(metrics_url: str, want: float) -> None:
    """Until the tracker counts `want` connections without a place given back (bounded)."""
    with trio.fail_after(WAIT_S):
        for _ in range(int(WAIT_S / 0.02)):
            if await _metric(metrics_url, "p2preg_tracker_preauth_connections") == want:
                return
            await trio.sleep(0.02)
    raise AssertionError(f"never {want} pre-authentication connections")


async def _healthz(url: str, source: str, tls_dir: Path | None) -> int:
    verify = True if tls_dir is None else client_ssl_context(tls_dir)
    transport = httpx.AsyncHTTPTransport(local_address=source, verify=verify)
    async with httpx.AsyncClient(transport=transport) as http:
        return (await http.get(f"{url}/healthz", timeout=10)).status_code


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "mtls"])
async def test_silent_connections_cannot_take_the_port_from_others(
    tmp_path: Path, tls: bool
) -> None:
    settings: dict[str, object] = dict(
        max_preauth_connections=5, max_preauth_connections_per_ip=3,
        metrics_listen=HostPort("127.0.0.1", free_port()),
    )
    node_tls = None
    if tls:
        ca = ClusterCA.make("caps")
        settings["tls_dir"] = ca.tls_dir(tmp_path / "t", "tracker", "t", ips=["127.0.0.1"])
        node_tls = ca.tls_dir(tmp_path / "n", "node", "n")
    metrics = f"http://127.0.0.1:{settings['metrics_listen'].port}"  # type: ignore[attr-defined]
    async with AsyncExitStack() as stack:
        url = await stack.enter_async_context(running_tracker(tmp_path, **settings))

        async def silent(source: str) -> trio.SocketStream:
            stream = await _silent(url, source)
            stack.push_async_callback(stream.aclose)
            return stream

        held = [await silent("127.0.0.1") for _ in range(3)]
        await _gauge_reaches(metrics, 3)
        # The fourth from the same address finds no place ...
        assert await _closed_unanswered(await silent("127.0.0.1"))
        refused = dict(name="p2preg_tracker_connections_refused_total")
        assert await _metric(metrics, **refused, reason="preauth_per_ip") == 1
        # ... while another address is served.
        assert await _healthz(url, "127.0.0.2", node_tls) == 200
        for _ in range(2):
            await silent("127.0.0.2")
        await _gauge_reaches(metrics, 5)
        assert await _closed_unanswered(await silent("127.0.0.3"))
        assert await _metric(metrics, **refused, reason="preauth_total") == 1
        # A place given back is there for the next one.
        await held[0].aclose()
        await _gauge_reaches(metrics, 4)
        assert await _healthz(url, "127.0.0.3", node_tls) == 200


async def test_a_verified_connection_stays_open_past_the_anonymous_keep_alive(
    tmp_path: Path,
) -> None:
    ca = ClusterCA.make("keep")
    metrics_port = free_port()
    tls_dir = ca.tls_dir(tmp_path / "t", "tracker", "t", ips=["127.0.0.1"])
    node_tls = ca.tls_dir(tmp_path / "n", "node", "n")
    metrics = f"http://127.0.0.1:{metrics_port}"
    limits = httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY_S)  # the node's pool
    async with (
        running_tracker(tmp_path, tls_dir=tls_dir, max_preauth_connections_per_ip=1,
                        metrics_listen=HostPort("127.0.0.1", metrics_port)) as url,
        httpx.AsyncClient(verify=client_ssl_context(node_tls), limits=limits) as http,
    ):  # fmt: skip
        assert (await http.get(f"{url}/healthz", timeout=10)).status_code == 200
        handshakes = dict(name="p2preg_tracker_tls_handshakes_total", resumed="false")
        assert await _metric(metrics, **handshakes) == 1
        await _gauge_reaches(metrics, 0)  # the verified connection holds no place ...
        # ... so the one place for this address is free for another client.
        assert await _healthz(url, "127.0.0.1", node_tls) == 200
        await trio.sleep(KEEP_ALIVE_TIMEOUT_S + 1.5)
        assert (await http.get(f"{url}/healthz", timeout=10)).status_code == 200
        assert await _metric(metrics, **handshakes) == 2  # the first connection, reused


async def test_a_verified_connection_is_closed_once_old_so_its_certificate_is_shown_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kept connection would let a certificate shown once outlive its expiry or
    a CA rotation: past its age the next answer says `Connection: close`, and the
    client's next request makes a new handshake."""
    monkeypatch.setattr(http_listener, "MAX_VERIFIED_AGE_S", 1.0)
    ca = ClusterCA.make("age")
    metrics_port = free_port()
    tls_dir = ca.tls_dir(tmp_path / "t", "tracker", "t", ips=["127.0.0.1"])
    node_tls = ca.tls_dir(tmp_path / "n", "node", "n")
    metrics = f"http://127.0.0.1:{metrics_port}"
    handshakes = dict(name="p2preg_tracker_tls_handshakes_total", resumed="false")
    async with (
        running_tracker(tmp_path, tls_dir=tls_dir,
                        metrics_listen=HostPort("127.0.0.1", metrics_port)) as url,
        httpx.AsyncClient(verify=client_ssl_context(node_tls)) as http,
    ):  # fmt: skip
        young = await http.get(f"{url}/healthz", timeout=10)
        assert young.headers.get("connection") != "close"
        await trio.sleep(1.2)
        old = await http.get(f"{url}/healthz", timeout=10)
        assert old.status_code == 200 and old.headers.get("connection") == "close"
        assert await _metric(metrics, **handshakes) == 1  # both on the first connection
        assert (await http.get(f"{url}/healthz", timeout=10)).status_code == 200
        assert await _metric(metrics, **handshakes) == 2
