"""The node's HTTPS tracker client (tracker/client.py with a ReloadingTLS).

Against a tiny trio HTTPS server that requires client certificates
(tests/fixtures/tls_tracker.py): the client shows the node's certificate and
no token; it talks only to a server whose certificate chains to ca.crt, names
the host it dialled, and carries a `tracker` identity of the node's cluster;
renewed files are shown from the next request on. Every refusal is the
`TrackerUnavailable` the node falls back to upstream on.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.tlscerts import ClusterCA
from p2preg.core import errors
from p2preg.core.digest import Digest
from p2preg.core.tls import ReloadingTLS
from tests.fixtures.tls_tracker import server_tls_dir, tiny_tracker
from tracker.client import TrackerClient, open_tracker_client

DIGEST = Digest.of(b"some blob")


@pytest.fixture
def ca() -> ClusterCA:
    return ClusterCA.make("clienttls")


def _node_tls(ca: ClusterCA, tmp_path: Path, name: str = "n1") -> ReloadingTLS:
    return ReloadingTLS(ca.tls_dir(tmp_path / "node", "node", name), role="node")


async def test_the_client_shows_the_node_certificate_and_no_token(
    ca: ClusterCA, tmp_path: Path
) -> None:
    tls = _node_tls(ca, tmp_path)
    with tiny_tracker(server_tls_dir(ca, tmp_path / "t", ips=("127.0.0.1",))) as server:
        async with open_tracker_client(server.url, node=tls.identity.name, tls=tls) as client:
            assert await client.lookup_metainfo(DIGEST) is None  # the stand-in's 404
            assert "token" not in client.announce_url
    (seen,) = server.seen
    assert seen.identity == "p2preg://clienttls/node/n1"
    assert seen.path == f"/v1/metainfo/{DIGEST}".encode()
    assert b"authorization" not in seen.headers


@pytest.mark.parametrize(
    "server",
    [
        "a node's certificate, not a tracker's",
        "a tracker of another CA",
        "a certificate that does not name 127.0.0.1",
    ],
)
async def test_the_client_talks_only_to_its_cluster_tracker(
    ca: ClusterCA, tmp_path: Path, server: str
) -> None:
    here = ("127.0.0.1",)
    tls_dir = {
        "a node's certificate, not a tracker's": lambda: server_tls_dir(
            ca, tmp_path / "t", role="node", name="impostor", ips=here
        ),
        "a tracker of another CA": lambda: server_tls_dir(
            ClusterCA.make("clienttls"), tmp_path / "t", ips=here
        ),
        "a certificate that does not name 127.0.0.1": lambda: server_tls_dir(ca, tmp_path / "t"),
    }[server]()
    tls = _node_tls(ca, tmp_path)
    with tiny_tracker(tls_dir) as stand_in:
        async with open_tracker_client(stand_in.url, node="n1", tls=tls) as client:
            with pytest.raises(errors.TrackerUnavailable) as refused:
                await client.lookup_metainfo(DIGEST)
    why = {
        "a node's certificate, not a tracker's": "p2preg://clienttls/node/impostor, not a tracker",
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
    with tiny_tracker(server_tls_dir(ca, tmp_path / "t", ips=("127.0.0.1",))) as server:
        async with open_tracker_client(server.url, node="n1", tls=tls) as client:
            await client.lookup_metainfo(DIGEST)
            ca.tls_dir(tmp_path / "node", "node", "n1-renewed")
            await client.lookup_metainfo(DIGEST)
    assert [s.identity for s in server.seen] == [
        "p2preg://clienttls/node/n1",
        "p2preg://clienttls/node/n1-renewed",
    ]


def test_a_tls_client_takes_no_token(ca: ClusterCA, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no token"):
        TrackerClient("https://127.0.0.1:1", node="n1", token="x", tls=_node_tls(ca, tmp_path))
