"""The node's own endpoints (p2preg/node/admin.py): status, preheat, metrics listener.

Preheat brings a blob into the store without sending it, under the same rules
as a pull (known registry, the repository must hold the blob upstream); the
metrics listener serves /metrics and /healthz and nothing of the registry.
"""

from __future__ import annotations

import httpx
import pytest

from harness.procs import free_port
from harness.registry import Registry
from tests.conftest import MakeNode, PushImage

pytestmark = pytest.mark.integration

SEED_NS = "seed.test"


def test_preheat_fetches_under_the_same_rules_as_a_pull(
    registry: Registry, push_image: PushImage, make_node: MakeNode
) -> None:
    image = push_image(registry, "single")
    other = push_image(registry, "index")
    node = make_node(f"{SEED_NS}={registry.url}")
    blob = max(image.blobs, key=lambda b: b.size)
    base = f"{node.url}/_p2preg/preheat/{image.repository}/blobs/{blob.digest}"
    before = registry.blob_bytes_sent().get(blob.digest, 0)
    r = httpx.post(f"{base}?ns={SEED_NS}", timeout=60)
    assert r.status_code == 200, r.text
    assert r.json() == {"digest": blob.digest, "size": blob.size, "source": "upstream",
                        "seeding": False, "p2p_min_bytes": None}
    registry.settle()
    assert registry.blob_bytes_sent()[blob.digest] == before + blob.size
    again = httpx.post(f"{base}?ns={SEED_NS}", timeout=60).json()
    assert again["source"] == "store"
    # Not through a repository that does not hold it, not for a registry not mirrored.
    stranger = f"{node.url}/_p2preg/preheat/{other.repository}/blobs/{blob.digest}"
    assert httpx.post(f"{stranger}?ns={SEED_NS}", timeout=30).status_code == 404
    assert httpx.post(f"{base}?ns=elsewhere.example", timeout=30).status_code == 403
    manifest = f"{node.url}/_p2preg/preheat/{image.repository}/manifests/latest"
    assert httpx.post(manifest, timeout=30).status_code == 404
    # Only POST preheats; a GET there is no registry endpoint either.
    assert httpx.get(f"{base}?ns={SEED_NS}", timeout=30).status_code == 404
    status = httpx.get(f"{node.url}/_p2preg/status", timeout=10).json()
    assert status["recent"][0]["digest"] == blob.digest
    assert node.metric("p2preg_http_requests_total", route="preheat", status="200") == 2


def test_the_metrics_listener_serves_metrics_and_nothing_of_the_registry(
    registry: Registry, make_node: MakeNode
) -> None:
    port = free_port()
    node = make_node(f"{SEED_NS}={registry.url}", args=("--metrics-listen", f"127.0.0.1:{port}"))
    metrics = f"http://127.0.0.1:{port}"
    assert httpx.get(f"{metrics}/healthz", timeout=10).text == "ok\n"
    text = httpx.get(f"{metrics}/metrics", timeout=10).text
    assert "p2preg_store_budget_bytes" in text
    for path in ("/v2/", f"/v2/x/manifests/latest?ns={SEED_NS}", "/_p2preg/status"):
        assert httpx.get(metrics + path, timeout=10).status_code == 404
    assert httpx.get(f"{node.url}/v2/", timeout=10).status_code == 200
