"""`p2preg status`: what a real node and a real tracker report, as tables and as JSON.

A node fetches blobs from a real seed registry (alone, then in a swarm with a
token-protected tracker); `p2preg status` run as a command shows its store,
bytes by source, peers and recent fetches, and the tracker's swarms and
seeders, and refuses to show the tracker's blob list without the token. Over
mutual TLS it shows a node's certificate (`--tls-dir`), and says in one line
what is missing or refused.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from harness.images import build_image
from harness.node import open_node
from harness.procs import clean_env, free_port, wait_until
from harness.registry import Registry
from harness.skopeo import push
from harness.tlscerts import ClusterCA
from harness.tracker import open_tracker
from p2preg.core import wire
from tests.conftest import MakeNode, PushImage

pytestmark = pytest.mark.integration

SEED_NS = "seed.test"
MiB = 1 << 20
TOKEN = "status-test-token"


def _status(*args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = clean_env(drop_prefixes=["P2PREG_"], COLUMNS="200")
    if token is not None:
        env["P2PREG_TRACKER_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "p2preg", "status", *args],
        capture_output=True, text=True, timeout=60, env=env,
    )


def test_a_nodes_store_bytes_and_recent_fetches(
    registry: Registry, push_image: PushImage, make_node: MakeNode
) -> None:
    image = push_image(registry, "single")
    node = make_node(f"{SEED_NS}={registry.url}")
    for blob in image.blobs:
        url = f"{node.url}/v2/{image.repository}/blobs/{blob.digest}?ns={SEED_NS}"
        assert httpx.get(url, timeout=30).status_code == 200

    admin = ("--admin-token-file", str(node.admin_token_file))
    proc = _status("--node", node.url, "--json", *admin)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)["node"]
    total = sum(b.size for b in image.blobs)
    assert doc["swarm"] is None
    assert doc["store"]["blobs"] >= len(image.blobs) and doc["store"]["bytes"] >= total
    assert (doc["bytes"]["from_peers"], doc["bytes"]["from_upstream"]) == (0, total)
    assert doc["fetches"]["upstream"] == len(image.blobs)
    assert {r["digest"] for r in doc["recent"]} == {b.digest for b in image.blobs}
    assert all(r["source"] == "upstream" and r["repository"] == image.repository
               for r in doc["recent"])
    assert doc["upstreams"] == [{"ns": SEED_NS, "url": registry.url}]

    text = _status("--node", node.url, *admin)
    assert text.returncode == 0, text.stderr
    out = text.stdout
    assert f"({node.url})" in out and "off: no tracker configured" in out
    assert "from upstream" in out and "recent blob fetches" in out
    for blob in image.blobs:
        assert blob.digest[:19] in out

    # Without the admin token: counts only, no repository, digest or upstream.
    bare = _status("--node", node.url, "--admin-token-file", "/dev/null/none")
    assert bare.returncode != 0 and "cannot read admin token file" in bare.stderr
    counts = _status("--node", node.url)
    assert counts.returncode == 0, counts.stderr
    assert "need the admin token" in counts.stdout
    assert image.repository not in counts.stdout and registry.url not in counts.stdout


def test_a_swarming_node_and_the_tracker(registry: Registry, tmp_path: Path) -> None:
    layout = build_image(tmp_path / "layout", seed="status", layer_sizes=(2 * MiB,))
    image = push(layout, registry.host, "team/app")
    (layer,) = image.manifests[0].layers
    with open_tracker(tmp_path / "tracker", token=TOKEN) as tracker:
        args = ("--tracker", tracker.url, "--peer-host", "127.0.0.1", "--peer-port", "0",
                "--node-name", "status-node")
        with open_node(tmp_path / "node", [f"{SEED_NS}={registry.url}"], args=args,
                       env={"P2PREG_TRACKER_TOKEN": TOKEN}) as node:
            url = f"{node.url}/v2/{image.repository}/blobs/{layer.digest}"
            assert httpx.get(url, timeout=60).status_code == 200

            def seeded() -> bool:
                proc = _status("--tracker", tracker.url, "--json", token=TOKEN)
                return proc.returncode == 0 and json.loads(proc.stdout)["tracker"]["seeders"] == 1

            wait_until(seeded, timeout_s=20, what="the tracker to count the node as a seeder")
            proc = _status("--node", node.url, "--tracker", tracker.url, "--json",
                           "--admin-token-file", str(node.admin_token_file), token=TOKEN)
            assert proc.returncode == 0, proc.stderr
            both = json.loads(proc.stdout)
            swarm = both["node"]["swarm"]
            assert swarm["tracker"] == tracker.url and swarm["seeding"] == 1
            assert both["node"]["node"] == "status-node"
            t = both["tracker"]
            assert (t["swarms"], t["peers"], t["seeders"], t["metainfo"]) == (1, 1, 1, 1)
            (row,) = t["busiest"]
            assert row == {"digest": layer.digest, "size": layer.size, "seeders": 1,
                           "leechers": 0, "completed": 0, "published_by": "status-node"}

            text = _status("--node", node.url, "--tracker", tracker.url, token=TOKEN)
            assert text.returncode == 0, text.stderr
            assert "seeding 1 blobs" in text.stdout and "busiest swarms" in text.stdout
            assert layer.digest[:19] in text.stdout and "status-node" in text.stdout

            # The list of blobs is the cluster's business only.
            refused = _status("--tracker", tracker.url)
            assert refused.returncode == 1 and "token" in refused.stderr
            r = httpx.get(f"{tracker.url}/v1/status", timeout=10)
            assert r.status_code == 401
            assert wire.decode(wire.ErrorReply, r.content).error == "unauthorized"
            bad = httpx.get(f"{tracker.url}/v1/status?limit=x",
                            headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
            assert bad.status_code == 400


def test_of_several_trackers_the_first_that_answers_is_shown(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with open_tracker(tmp_path / "tracker", token=TOKEN) as tracker:
        proc = _status("--tracker", dead, "--tracker", tracker.url, token=TOKEN)
        assert proc.returncode == 0, proc.stderr
        assert f"tracker {tracker.url}" in proc.stdout and dead not in proc.stdout
    gone = _status("--tracker", dead, "--tracker", tracker.url, token=TOKEN)
    # One line per tracker given up, then the error naming both.
    *moved, error = gone.stderr.splitlines()
    assert gone.returncode == 1 and error.startswith(f"p2preg status: tracker {dead}: ")
    assert f"; tracker {tracker.url}: " in error and len(moved) == 1
    mixed = _status("--tracker", dead, "--tracker", "https://127.0.0.1:1", token=TOKEN)
    assert mixed.returncode != 0 and "mix http and https" in mixed.stderr


def test_an_unreachable_node_is_a_clear_error() -> None:
    proc = _status("--node", f"http://127.0.0.1:{free_port()}")
    assert proc.returncode == 1 and proc.stderr.startswith("p2preg status:")


def test_the_tracker_over_mutual_tls_shows_itself_to_a_node_certificate(
    registry: Registry, tmp_path: Path
) -> None:
    layout = build_image(tmp_path / "layout", seed="status-tls", layer_sizes=(2 * MiB,))
    image = push(layout, registry.host, "team/app")
    (layer,) = image.manifests[0].layers
    ca = ClusterCA.make("status")
    tracker_tls = ca.tls_dir(tmp_path / "certs" / "t", "tracker", "t", ips=["127.0.0.1"])
    node_tls = ca.tls_dir(tmp_path / "certs" / "n", "node", "status-node")
    with open_tracker(tmp_path / "tracker", tls_dir=tracker_tls) as tracker:
        args = ("--tracker", tracker.url, "--peer-host", "127.0.0.1", "--peer-port", "0",
                "--peer-ssl-port", "0")
        with open_node(tmp_path / "node", [f"{SEED_NS}={registry.url}"], args=args,
                       tls_dir=node_tls) as node:
            url = f"{node.url}/v2/{image.repository}/blobs/{layer.digest}"
            assert httpx.get(url, timeout=60).status_code == 200
            mine = ("--tracker", tracker.url, "--json", "--tls-dir", str(node_tls))

            def seeded() -> bool:
                proc = _status(*mine)
                return proc.returncode == 0 and json.loads(proc.stdout)["tracker"]["seeders"] == 1

            wait_until(seeded, timeout_s=20, what="the tracker to count the node as a seeder")
            (row,) = json.loads(_status(*mine).stdout)["tracker"]["busiest"]
            assert row["digest"] == layer.digest and row["published_by"] == "status-node"

            # Without a certificate, with another CA's, beside a token: one line each.
            stranger_ca = ClusterCA.make("status")
            stranger = stranger_ca.tls_dir(tmp_path / "certs" / "s", "node", "s",
                                           trust=stranger_ca.cert_pem + ca.cert_pem)
            token_file = tmp_path / "token"
            token_file.write_text("a-token\n")
            cases = [
                ((), 2, f"the tracker {tracker.url} wants a client certificate: give --tls-dir"),
                (("--tls-dir", str(stranger)), 1, "refuses this node's certificate"),
                (("--tls-dir", str(tmp_path / "absent")), 2, "absent: not a directory"),
                (("--tls-dir", str(node_tls), "--token-file", str(token_file)), 2,
                 "give --tls-dir or --token-file, not both"),
            ]
            for extra, status, message in cases:
                proc = _status("--tracker", tracker.url, *extra)
                assert proc.returncode == status, (extra, proc.stderr)
                assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
                assert "Traceback" not in proc.stderr and "PRIVATE" not in proc.stderr
