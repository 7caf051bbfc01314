"""The tracker under mutual TLS, as a real process spoken to by real TLS clients.

`harness.tracker.open_tracker(tls_dir=…)` starts `p2preg tracker --tls-dir …
--metrics-listen …`; clients are httpx (and raw sockets) holding certificates
made by `harness.tlscerts`. Every refusal must be counted in
`p2preg_tracker_tls_refusals_total{reason}` and leave the tracker serving the
good client; a good node may do everything, as itself only.
"""

from __future__ import annotations

import re
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote_from_bytes

import httpx
import libtorrent as lt
import pytest
import trio
from cryptography import x509

from harness.procs import clean_env, free_port
from harness.tlscerts import ClusterCA, client_ssl_context, expired_tls_dir, https_client
from harness.tracker import TrackerProcess, open_tracker
from p2preg.core import errors
from p2preg.core.metainfo import Metainfo
from tests.tracker_helpers import blob_meta, file_as_holder
from tracker.client import TrackerClient

# Bounds on waiting for the tracker process to count what a client just saw.
COUNT_WAIT_S = 10.0
RELOAD_WAIT_S = 30.0


@dataclass(frozen=True)
class Certs:
    ca: ClusterCA
    tracker: Path
    n1: Path
    n2: Path
    root: Path


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    ca = ClusterCA.make("test")
    root = tmp_path / "certs"
    return Certs(
        ca,
        ca.tls_dir(root / "tracker", "tracker", "t", ips=["127.0.0.1"]),
        ca.tls_dir(root / "n1", "node", "n1"),
        ca.tls_dir(root / "n2", "node", "n2"),
        root,
    )


@pytest.fixture
def tracker(tmp_path: Path, certs: Certs) -> Iterator[TrackerProcess]:
    with open_tracker(tmp_path / "tracker", tls_dir=certs.tracker) as t:
        yield t


def refusals(t: TrackerProcess) -> dict[str, float]:
    assert t.metrics_url is not None
    text = httpx.get(f"{t.metrics_url}/metrics", timeout=10).text
    found = re.findall(r'^p2preg_tracker_tls_refusals_total\{reason="(\w+)"\} (\S+)$', text, re.M)
    return {reason: float(n) for reason, n in found}


async def counted(t: TrackerProcess, reason: str, before: dict[str, float]) -> None:
    """Wait (bounded) until `reason` went up by exactly one and nothing else moved."""
    with trio.move_on_after(COUNT_WAIT_S):
        while True:
            now = await trio.to_thread.run_sync(refusals, t)
            if now[reason] >= before[reason] + 1:
                break
            await trio.sleep(0.05)
    expected = {**before, reason: before[reason] + 1}
    assert now == expected, f"expected one {reason} refusal"


def announce_url(base: str, meta: Metainfo, n: int, *, left: int = 0) -> str:
    (ih,) = meta.swarm_keys
    return (
        f"{base}/announce?info_hash={quote_from_bytes(ih)}"
        f"&peer_id={quote_from_bytes(bytes([n]) * 20)}&port={7000 + n}"
        f"&uploaded=0&downloaded=0&left={left}&compact=1&numwant=50"
    )


def client(t: TrackerProcess, tls_dir: Path, node: str) -> TrackerClient:
    return TrackerClient(t.url, node=node, http=https_client(tls_dir))


async def serves_the_good_node(t: TrackerProcess, certs: Certs, meta: Metainfo | None) -> None:
    async with https_client(certs.n1, headers={"Connection": "close"}) as http:
        if meta is None:
            assert (await http.get(f"{t.url}/healthz")).status_code == 200
            return
        reply = lt.bdecode((await http.get(announce_url(t.url, meta, 1))).content)
        assert b"failure reason" not in reply, reply


async def test_a_good_node_does_everything_over_mtls_without_a_token(
    tracker: TrackerProcess, certs: Certs, tmp_path: Path
) -> None:
    meta = blob_meta(tmp_path, root=certs.ca.cert_pem)
    n1 = client(tracker, certs.n1, "n1")
    try:
        record = await file_as_holder(n1, meta)
        assert await n1.lookup_metainfo(meta.digest) == record
        digest = blob_meta(tmp_path).digest
        lease = await n1.acquire_lease(digest, size=10)
        assert lease.status == "granted" and lease.lease_id is not None
        renewed = await n1.renew_lease(digest, lease.lease_id, 5)
        assert renewed.bytes_done == 5 and renewed.holder == "n1"
        await n1.release_lease(digest, lease.lease_id)
        assert (await n1.acquire_lease(digest)).lease_id != lease.lease_id  # it was free
    finally:
        await n1._http.aclose()
    async with (
        https_client(certs.n1, headers={"Connection": "close"}) as as_n1,
        https_client(certs.n2, headers={"Connection": "close"}) as http,
    ):
        # libtorrent's way: a new connection per announce, no token in the URL.
        # n1 published the torrent: its left=0 counts as a seeder.
        r = await as_n1.get(announce_url(tracker.url, meta, 1))
        assert r.status_code == 200 and r.headers["connection"] == "close"
        seeder = lt.bdecode(r.content)
        assert seeder[b"complete"] == 1, seeder
        leecher = lt.bdecode((await http.get(announce_url(tracker.url, meta, 2, left=9))).content)
        assert leecher[b"peers"] == bytes([127, 0, 0, 1]) + (7001).to_bytes(2, "big")
        (ih,) = meta.swarm_keys
        scrape = lt.bdecode(
            (await http.get(f"{tracker.url}/scrape?info_hash={quote_from_bytes(ih)}")).content
        )
        assert scrape[b"files"][ih][b"incomplete"] == 1
    # The plain listener: metrics and health only, nothing of the tracker protocol.
    assert tracker.metrics_url is not None
    async with httpx.AsyncClient() as plain:
        assert (await plain.get(f"{tracker.metrics_url}/healthz")).status_code == 200
        metrics = (await plain.get(f"{tracker.metrics_url}/metrics")).content
        assert b"p2preg_tracker_peers 2.0" in metrics
        for path in ("/announce?info_hash=x", "/v1/status", f"/v1/metainfo/{meta.digest}"):
            assert (await plain.get(tracker.metrics_url + path)).status_code == 404, path
    assert set(refusals(tracker).values()) == {0.0}


async def test_a_node_cannot_act_as_another(
    tracker: TrackerProcess, certs: Certs, tmp_path: Path
) -> None:
    meta = blob_meta(tmp_path, root=certs.ca.cert_pem)
    digest = blob_meta(tmp_path).digest
    # n2's certificate, messages naming n1: every one is refused with 403.
    posing = client(tracker, certs.n2, "n1")
    n1, n2 = client(tracker, certs.n1, "n1"), client(tracker, certs.n2, "n2")
    try:
        with pytest.raises(errors.Forbidden, match="names node 'n1'; this connection is 'n2'"):
            await posing.publish_metainfo(meta.digest, meta.size, meta.data)
        with pytest.raises(errors.Forbidden):
            await posing.acquire_lease(digest, size=10)
        with pytest.raises(errors.Forbidden):
            await posing.report_bad(meta.digest, b"x" * 20, meta.size, meta.data, "no")
        assert await n1.lookup_metainfo(meta.digest) is None
        # n1's lease: n2 holding its id (leaked, guessed) can neither renew nor release it.
        lease = await n1.acquire_lease(digest, size=10)
        assert lease.lease_id is not None
        with pytest.raises(errors.Forbidden, match="held by another node"):
            await n2.renew_lease(digest, lease.lease_id, 10)
        with pytest.raises(errors.Forbidden, match="held by another node"):
            await n2.release_lease(digest, lease.lease_id)
        still = await n2.acquire_lease(digest)
        assert still.status == "wait" and still.holder == "n1" and still.bytes_done == 0
        assert (await n1.renew_lease(digest, lease.lease_id, 3)).bytes_done == 3
    finally:
        for c in (posing, n1, n2):
            await c._http.aclose()


def plain_http_to(t: TrackerProcess) -> bytes:
    port = int(t.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /announce?info_hash=x HTTP/1.1\r\nHost: t\r\n\r\n")
        got = b""
        while chunk := s.recv(4096):
            got += chunk
    return got


async def test_every_bad_client_is_refused_counted_and_the_tracker_goes_on(
    tracker: TrackerProcess, certs: Certs, tmp_path: Path
) -> None:
    meta = blob_meta(tmp_path, root=certs.ca.cert_pem)
    async with https_client(certs.n1) as good:
        await file_as_holder(TrackerClient(tracker.url, node="n1", http=good), meta)
    stranger = ClusterCA.make("test")  # same cluster name, another key: not ours
    # A CA the user brings may sign for several clusters: ours signs for "other".
    other_cluster = ClusterCA("other", certs.ca.ca)
    both = certs.ca.cert_pem + stranger.cert_pem
    no_cert = certs.root / "nocert"
    no_cert.mkdir()
    (no_cert / "ca.crt").write_bytes(certs.ca.cert_pem)
    bad = {
        "unknown_ca": stranger.tls_dir(certs.root / "stranger", "node", "n1", trust=both),
        "expired": expired_tls_dir(certs.ca, certs.root / "expired", "node", "n1"),
        "wrong_role": certs.ca.tls_dir(certs.root / "trk", "tracker", "n1"),
        "wrong_cluster": other_cluster.tls_dir(certs.root / "oc", "node", "n1"),
    }
    for reason in ("no_certificate", *bad, "not_tls"):
        before = await trio.to_thread.run_sync(refusals, tracker)
        if reason == "not_tls":
            answer = await trio.to_thread.run_sync(plain_http_to, tracker)
            assert not answer.startswith(b"HTTP/"), answer[:80]
        elif reason == "no_certificate":
            ctx = ssl.create_default_context(cafile=no_cert / "ca.crt")
            async with httpx.AsyncClient(verify=ctx) as http:
                with pytest.raises(httpx.TransportError):
                    await http.get(announce_url(tracker.url, meta, 3))
        elif reason in ("wrong_role", "wrong_cluster"):
            ctx = client_ssl_context(bad[reason])
            async with httpx.AsyncClient(verify=ctx) as http:
                r = await http.get(announce_url(tracker.url, meta, 3))
            assert r.status_code == 403 and b"forbidden" in r.content, (reason, r.content)
        else:
            # The client's own check would stop at its first step (another CA
            # signed the tracker's certificate; the expired one is the client's):
            # trust the tracker's CA so the server's refusal is what is tested.
            ctx = client_ssl_context(bad[reason])
            ctx.load_verify_locations(cadata=certs.ca.cert_pem.decode())
            async with httpx.AsyncClient(verify=ctx) as http:
                with pytest.raises(httpx.TransportError):
                    await http.get(announce_url(tracker.url, meta, 3))
        await counted(tracker, reason, before)
        await serves_the_good_node(tracker, certs, meta)
    # A client that connects and says nothing holds no one else up.
    port = int(tracker.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)):
        await serves_the_good_node(tracker, certs, meta)
    log = tracker.process.log_path.read_text()
    assert "tls: refused 127.0.0.1: expired: certificate has expired" in log
    assert "BEGIN" not in log and "PRIVATE" not in log


def served_serial(t: TrackerProcess, ctx: ssl.SSLContext) -> int:
    port = int(t.url.rsplit(":", 1)[1])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s,
    ):
        der = s.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


async def test_renewed_certificate_files_are_served_without_a_restart(
    tracker: TrackerProcess, certs: Certs, tmp_path: Path
) -> None:
    ctx = client_ssl_context(certs.n1)
    first = served_serial(tracker, ctx)
    certs.ca.tls_dir(certs.tracker, "tracker", "t", ips=["127.0.0.1"])  # what a renewal does
    renewed = x509.load_pem_x509_certificate((certs.tracker / "tls.crt").read_bytes())
    assert renewed.serial_number != first
    with trio.move_on_after(RELOAD_WAIT_S):
        # The tracker looks at its files every few seconds: ask until it shows the new one.
        # Another process's state: nothing to wait on but asking again.
        serial = renewed.serial_number
        while await trio.to_thread.run_sync(served_serial, tracker, ctx) != serial:  # noqa: ASYNC110
            await trio.sleep(0.2)
    assert served_serial(tracker, ctx) == renewed.serial_number
    await serves_the_good_node(tracker, certs, None)
    assert tracker.process.returncode is None


def start(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "p2preg", "tracker", "--data-dir", str(tmp_path / "d"), *args]
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean_env(drop_prefixes=["P2PREG_"]), **(env or {})},
    )


def test_the_tracker_fails_closed_at_start(tmp_path: Path, certs: Certs) -> None:
    port = free_port()
    empty = tmp_path / "empty-token"
    empty.write_text("\n")
    cases = [
        ((f"--listen=198.18.0.1:{port}",), {}, "is beyond loopback and there is no tls_dir"),
        ((f"--listen=0.0.0.0:{port}",), {"P2PREG_TOKEN": "t"}, "beyond loopback"),
        (("--tls-dir", str(certs.tracker)), {"P2PREG_TOKEN": "t"}, "certificates or a token"),
        (("--tls-dir", str(certs.tracker), "--udp"), {}, "udp announces cannot show"),
        ((), {"P2PREG_TOKEN": ""}, "token is empty"),
        (("--token-file", str(empty)), {}, f"token_file {empty} is empty"),
        (("--tls-dir", str(certs.n1)), {}, "a node certificate"),
    ]
    for args, env, message in cases:
        proc = start(tmp_path, f"--listen=127.0.0.1:{port}", *args, env=env)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.count("\n") == 1 and message in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr


def test_an_open_insecure_tracker_says_so_once(tmp_path: Path) -> None:
    with open_tracker(tmp_path / "tracker", insecure=True) as t:
        assert httpx.get(f"{t.url}/healthz", timeout=10).status_code == 200
        log = t.process.log_path.read_text()
    assert log.count("WARNING") == 1 and "--insecure and no token" in log
