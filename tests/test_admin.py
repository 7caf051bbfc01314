"""The node's own endpoints (p2preg/node/admin.py): status, preheat, metrics listener.

Preheat brings a blob into the store without sending it, under the same rules
as a pull (known registry, the repository must hold the blob upstream); the
metrics listener serves /metrics and /healthz and nothing of the registry.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from harness.procs import clean_env, free_port
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
    admin = node.admin_headers()
    r = httpx.post(f"{base}?ns={SEED_NS}", timeout=60, headers=admin)
    assert r.status_code == 200, r.text
    assert r.json() == {"digest": blob.digest, "size": blob.size, "source": "upstream",
                        "seeding": False, "p2p_min_bytes": None}
    registry.settle()
    assert registry.blob_bytes_sent()[blob.digest] == before + blob.size
    again = httpx.post(f"{base}?ns={SEED_NS}", timeout=60, headers=admin).json()
    assert again["source"] == "store"
    # Not through a repository that does not hold it, not for a registry not mirrored.
    stranger = f"{node.url}/_p2preg/preheat/{other.repository}/blobs/{blob.digest}"
    assert httpx.post(f"{stranger}?ns={SEED_NS}", timeout=30, headers=admin).status_code == 404
    assert httpx.post(f"{base}?ns=elsewhere.example", timeout=30, headers=admin).status_code == 403
    manifest = f"{node.url}/_p2preg/preheat/{image.repository}/manifests/latest"
    assert httpx.post(manifest, timeout=30, headers=admin).status_code == 404
    # Only POST preheats; a GET there is no registry endpoint either.
    assert httpx.get(f"{base}?ns={SEED_NS}", timeout=30).status_code == 404
    status = httpx.get(f"{node.url}/_p2preg/status", timeout=10, headers=admin).json()
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


def test_preheat_and_repository_names_need_the_admin_token(
    registry: Registry, push_image: PushImage, make_node: MakeNode
) -> None:
    """A local process without the node's admin token cannot preheat, nor learn
    which repositories the node pulled; the token file is the node user's alone."""
    image = push_image(registry, "single")
    node = make_node(f"{SEED_NS}={registry.url}")
    blob = max(image.blobs, key=lambda b: b.size)
    pulled = httpx.get(f"{node.url}/v2/{image.repository}/blobs/{blob.digest}?ns={SEED_NS}",
                       timeout=60)
    assert pulled.status_code == 200
    token = node.admin_token_file.read_text().strip()
    assert len(token) >= 40 and node.admin_token_file.stat().st_mode & 0o777 == 0o600
    base = f"{node.url}/_p2preg/preheat/{image.repository}/blobs/{blob.digest}?ns={SEED_NS}"
    before = registry.blob_bytes_sent().get(blob.digest, 0)
    for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": token},
                    {"Authorization": f"Basic {token}"}):
        r = httpx.post(base, timeout=30, headers=headers)
        assert r.status_code == 401, (headers, r.text)
        assert r.json()["errors"][0]["code"] == "UNAUTHORIZED"
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert "wrong-token" not in r.text and token not in r.text
    registry.settle()
    assert registry.blob_bytes_sent().get(blob.digest, 0) == before
    counts = httpx.get(f"{node.url}/_p2preg/status", timeout=10)
    assert counts.status_code == 200 and counts.json()["full"] is False
    assert counts.json()["fetches"]["upstream"] == 1
    for hidden in (image.repository, blob.digest, registry.url, "recent", "upstreams"):
        assert hidden not in counts.text
    full = httpx.get(f"{node.url}/_p2preg/status", timeout=10,
                     headers={"Authorization": f"Bearer {token}"})
    assert full.json()["full"] is True and image.repository in full.text
    assert node.metric("p2preg_http_requests_total", route="preheat", status="401") == 4


def test_an_empty_or_open_admin_token_file_stops_the_node(
    registry: Registry, tmp_path: Path
) -> None:
    for text, mode, said in (("\n", 0o600, "is empty"), ("t" * 43, 0o644, "other users")):
        path = tmp_path / "admin.token"
        path.write_text(text)
        path.chmod(mode)
        proc = subprocess.run(
            [sys.executable, "-m", "p2preg", "node", "--upstream", f"{SEED_NS}={registry.url}",
             "--data-dir", str(tmp_path / "data"), "--listen", f"127.0.0.1:{free_port()}",
             "--admin-token-file", str(path)],
            capture_output=True, text=True, timeout=60,
            env=clean_env(drop_prefixes=["P2PREG_"]),
        )
        assert proc.returncode == 2 and said in proc.stderr, proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("p2preg node: admin_token_file") and said in last
