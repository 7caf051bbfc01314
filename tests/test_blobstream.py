"""Blob bodies from a real node: zero-copy over HTTP/1.1, chunks over HTTP/2.

Both paths must give the same bytes for whole blobs and ranges, count them in
the metrics, hold one of `--max-blob-streams` slots while they stream, and
give the slot back when a client hangs up mid-body.
"""

from __future__ import annotations

import hashlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from harness.images import build_image
from harness.node import NodeProcess
from harness.procs import wait_until
from harness.registry import Registry
from harness.skopeo import push
from tests.conftest import MakeNode

pytestmark = pytest.mark.integration

LAYER_BYTES = 24 << 20  # far more than loopback socket buffers hold


@pytest.fixture
def big_blob(registry: Registry, tmp_path: Path) -> tuple[str, str, int]:
    """(repository, digest, size) of a pushed layer of LAYER_BYTES random bytes."""
    layout = build_image(tmp_path / "big", seed="blobstream", layer_sizes=(LAYER_BYTES,))
    image = push(layout, registry.host, "test/big")
    layer = image.manifests[0].layers[0]
    return image.repository, layer.digest, layer.size


@pytest.fixture
def node(registry: Registry, make_node: MakeNode) -> NodeProcess:
    return make_node(f"seed.test={registry.url}", args=("--max-blob-streams", "1"))


@pytest.fixture
def http2() -> Iterator[httpx.Client]:
    with httpx.Client(trust_env=False, timeout=60, http1=False, http2=True) as client:
        yield client


def _served(node: NodeProcess) -> float:
    return node.metric("p2preg_blob_bytes_served_total")


def test_http1_zero_copy_and_http2_chunks_give_the_same_bytes(
    node: NodeProcess, big_blob: tuple[str, str, int], http2: httpx.Client
) -> None:
    repository, digest, size = big_blob
    url = f"{node.url}/v2/{repository}/blobs/{digest}"
    with httpx.Client(trust_env=False, timeout=60) as http1:
        whole = http1.get(url)  # the first GET fetches it from upstream
        assert whole.status_code == 200
        assert "sha256:" + hashlib.sha256(whole.content).hexdigest() == digest
        before = _served(node)
        for client, version in ((http1, "HTTP/1.1"), (http2, "HTTP/2")):
            again = client.get(url)
            assert again.http_version == version
            assert again.content == whole.content
            part = client.get(url, headers={"Range": "bytes=1000000-5999999"})
            assert part.status_code == 206
            assert part.content == whole.content[1000000:6000000]
    assert before == size
    assert _served(node) - before == 2 * (size + 5000000)


def test_streams_are_capped_and_a_hung_up_stream_gives_its_slot_back(
    node: NodeProcess, big_blob: tuple[str, str, int]
) -> None:
    repository, digest, size = big_blob
    path = f"/v2/{repository}/blobs/{digest}"
    with httpx.Client(trust_env=False, timeout=60) as http:
        assert len(http.get(node.url + path).content) == size  # now in the store
    host, port = node.host.split(":")
    request = f"GET {path} HTTP/1.1\r\nHost: {node.host}\r\n\r\n".encode()

    # A client that reads the head and a little of the body, then stalls.
    first = socket.create_connection((host, int(port)), timeout=30)
    first.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    first.sendall(request)
    assert first.recv(4096).startswith(b"HTTP/1.1 200")
    wait_until(
        lambda: node.metric("p2preg_blob_streams_active") == 1, timeout_s=10, what="1 stream"
    )

    # The second stream gets its head but no body while the first holds the slot.
    got: list[int] = []

    def second() -> None:
        with httpx.Client(trust_env=False, timeout=60) as http:
            got.append(len(http.get(node.url + path).content))

    thread = threading.Thread(target=second, daemon=True)
    thread.start()
    wait_until(
        lambda: node.metric("p2preg_blob_streams_waiting") == 1, timeout_s=10, what="1 waiting"
    )
    assert not got and node.metric("p2preg_blob_streams_active") == 1

    first.close()  # hang up mid-body: the slot must come back
    thread.join(30)
    assert got == [size]
    wait_until(
        lambda: node.metric("p2preg_blob_streams_active") == 0, timeout_s=10, what="no stream"
    )
