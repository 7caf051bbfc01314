"""The node's HTTPS tracker client (tracker/client.py with a ReloadingTLS).

Against the real tracker under mutual TLS (`serve_tracker` in the test's own
trio run, tests/tracker_helpers.py): the client shows the node's certificate and
no token; it talks only to a server whose certificate chains to ca.crt, names
the host it dialled, and carries a `tracker` identity of the node's cluster;
renewed files are shown from the next request on. The one server that is not
our tracker is the impostor a member could run with its own node certificate:
`openssl s_server`, since our tracker refuses to start with one. Every refusal
is the `TrackerUnavailable` the node falls back to upstream on.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from harness.procs import Process, free_port, wait_for_port
from harness.tlscerts import ClusterCA
from p2preg.core import errors
from p2preg.core.digest import Digest
from p2preg.core.tls import ReloadingTLS
from tests.tracker_helpers import blob_meta, file_as_holder, running_tracker
from tracker.client import TrackerClient, open_tracker_client

DIGEST = Digest.of(b"some blob")
HERE = ("127.0.0.1",)


@pytest.fixture
def ca() -> ClusterCA:
    return ClusterCA.make("clienttls")


def _node_tls(ca: ClusterCA, tmp_path: Path, name: str = "n1") -> ReloadingTLS:
    return ReloadingTLS(ca.tls_dir(tmp_path / "node", "node", name), role="node")


def _tracker_tls(ca: ClusterCA, tmp_path: Path, ips: tuple[str, ...] = HERE) -> Path:
    return ca.tls_dir(tmp_path / "tracker-tls", "tracker", "t", ips=ips)


async def test_the_client_shows_the_node_certificate_and_no_token(
    ca: ClusterCA, tmp_path: Path
) -> None:
    tls = _node_tls(ca, tmp_path)
    meta = blob_meta(tmp_path, root=ca.cert_pem)
    sent: list[httpx.Request] = []

    async def record(request: httpx.Request) -> None:
        sent.append(request)

    async with (
        running_tracker(tmp_path, tls_dir=_tracker_tls(ca, tmp_path)) as url,
        open_tracker_client(url, node=tls.identity.name, tls=tls) as client,
    ):
        client._http.event_hooks["request"].append(record)
        assert await client.lookup_metainfo(DIGEST) is None  # the tracker's 404
        # The tracker admitted the certificate: it took the node's metainfo and
        # a lease, held by the certificate's name.
        await file_as_holder(client, meta)
        lease = await client.acquire_lease(DIGEST, size=10)
        assert lease.status == "granted" and lease.holder == "n1"
        assert "token" not in client.announce_url
    assert sent and all("authorization" not in r.headers for r in sent)
    assert all(r.url.scheme == "https" and "token" not in str(r.url) for r in sent)


@contextmanager
def impostor(tls_dir: Path, workdir: Path) -> Iterator[str]:
    """A TLS server any holder of a cluster certificate could run: openssl s_server."""
    openssl = shutil.which("openssl")
    assert openssl is not None, "openssl is part of the test image"
    port = free_port()
    argv = [openssl, "s_server", "-accept", f"127.0.0.1:{port}", "-www", "-quiet",
            "-cert", tls_dir / "tls.crt", "-key", tls_dir / "tls.key"]
    with Process(argv, workdir, name="impostor") as proc:
        wait_for_port("127.0.0.1", port, process=proc)
        yield f"https://127.0.0.1:{port}"


async def test_the_client_refuses_a_member_standing_in_for_the_tracker(
    ca: ClusterCA, tmp_path: Path
) -> None:
    member = ca.tls_dir(tmp_path / "impostor", "node", "impostor", ips=HERE)
    tls = _node_tls(ca, tmp_path)
    with impostor(member, tmp_path) as url:
        async with open_tracker_client(url, node="n1", tls=tls) as client:
            with pytest.raises(errors.TrackerUnavailable) as refused:
                await client.lookup_metainfo(DIGEST)
    assert "p2preg://clienttls/node/impostor, not a tracker" in str(refused.value)


@pytest.mark.parametrize(
    "server", ["a tracker of another CA", "a certificate that does not name 127.0.0.1"]
)
async def test_the_client_talks_only_to_its_cluster_tracker(
    ca: ClusterCA, tmp_path: Path, server: str
) -> None:
    tls_dir = {
        "a tracker of another CA": lambda: _tracker_tls(ClusterCA.make("clienttls"), tmp_path),
        "a certificate that does not name 127.0.0.1": lambda: _tracker_tls(ca, tmp_path, ips=()),
    }[server]()
    tls = _node_tls(ca, tmp_path)
    async with (
        running_tracker(tmp_path, tls_dir=tls_dir) as url,
        open_tracker_client(url, node="n1", tls=tls) as client,
    ):
        with pytest.raises(errors.TrackerUnavailable) as refused:
            await client.lookup_metainfo(DIGEST)
    why = {
        # Same CA name, another key: OpenSSL finds the name and refuses the signature.
        "a tracker of another CA": "TLS: self-signed certificate in certificate chain",
        "a certificate that does not name 127.0.0.1": "TLS: IP address mismatch",
    }[server]
    assert why in str(refused.value)


async def test_renewed_files_are_shown_from_the_next_request(
    ca: ClusterCA, tmp_path: Path
) -> None:
    tls = ReloadingTLS(
        ca.tls_dir(tmp_path / "node", "node", "n1"), role="node", check_interval_s=0
    )
    first, second = blob_meta(tmp_path).digest, blob_meta(tmp_path).digest
    async with (
        running_tracker(tmp_path, tls_dir=_tracker_tls(ca, tmp_path)) as url,
        open_tracker_client(url, node="n1", tls=tls) as client,
    ):
        assert (await client.acquire_lease(first)).holder == "n1"
        ca.tls_dir(tmp_path / "node", "node", "n1-renewed")
        # The message still names n1; the tracker now reads n1-renewed off the
        # certificate the client shows, and says so.
        with pytest.raises(errors.Forbidden, match="this connection is 'n1-renewed'"):
            await client.acquire_lease(second)


def test_a_tls_client_takes_no_token(ca: ClusterCA, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no token"):
        TrackerClient("https://127.0.0.1:1", node="n1", token="x", tls=_node_tls(ca, tmp_path))
