"""`p2preg limits` against real node processes: the upstream cap set at runtime holds.

A node started without caps and a real docker registry on loopback; `p2preg
limits set --upstream 256KiB` (a subprocess, as an operator types it) changes
the running node, and two 1.5 MiB layers pulled through it at once then share
that cap: together they take at least 10 s if it holds. The one assertion on
time is the upper bound on the rate (≤ 1.3 times the cap). Also: what `show`
prints, the one-line refusal of a bad rate, and the admin token it needs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from harness.images import build_image
from harness.node import NodeProcess
from harness.procs import clean_env
from harness.registry import Registry
from harness.skopeo import push
from tests.conftest import MakeNode

pytestmark = pytest.mark.integration

SEED_NS = "seed.test"
CAP = 256 * 1024
BOUND = 1.3


def limits(
    node: NodeProcess, *args: str, token: Path | None = None
) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "p2preg", "limits", *args, "--node", node.url]
    argv += ["--admin-token-file", str(token or node.admin_token_file)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60,
                          env=clean_env(drop_prefixes=["P2PREG_"]))


def test_limits_set_caps_the_upstream_of_a_running_node_across_concurrent_fetches(
    registry: Registry, make_node: MakeNode, tmp_path: Path
) -> None:
    layout = build_image(tmp_path / "image", seed="limits", layer_sizes=(1536 << 10, 1536 << 10))
    image = push(layout, registry.host, "team/capped")
    layers = [b for b in image.blobs if b.size > 1 << 20]
    assert len(layers) == 2
    node = make_node(f"{SEED_NS}={registry.url}")

    shown = limits(node, "show", "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["caps"] == {
        "peer_upload": 0, "peer_download": 0, "upstream_download": 0
    }
    changed = limits(node, "set", "--upstream", "256KiB")
    assert changed.returncode == 0, changed.stderr
    assert "256 KiB/s" in changed.stdout

    def pull(digest: str) -> int:
        url = f"{node.url}/v2/{image.repository}/blobs/{digest}?ns={SEED_NS}"
        r = httpx.get(url, timeout=120)
        assert r.status_code == 200
        return len(r.content)

    started = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        got = sum(pool.map(pull, [b.digest for b in layers]))
    took = time.monotonic() - started
    assert got == sum(b.size for b in layers)
    assert got / took <= BOUND * CAP, f"{got / took / CAP:.2f} times the upstream cap"
    assert node.metric("p2preg_rate_limit_bytes_per_second", direction="upstream_download") == CAP
    assert node.metric("p2preg_rate_bytes_per_second", direction="upstream_download") <= (
        BOUND * CAP
    )
    assert node.metric("p2preg_rate_limit_bytes_per_second", direction="peer_upload") == 0


def test_a_bad_rate_or_no_admin_token_changes_nothing(
    registry: Registry, make_node: MakeNode, tmp_path: Path
) -> None:
    node = make_node(f"{SEED_NS}={registry.url}", args=("--peer-upload-limit-bytes-s", "80Mbit"))
    for args, said in (
        (("--upstream", "10Mb"), "--upstream: expected a rate"),
        (("--peer-download", "fast"), "--peer-download: expected a rate"),
        ((), "give --peer-upload, --peer-download or --upstream"),
    ):
        r = limits(node, "set", *args)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("p2preg limits: ") and said in lines[0]
    wrong = tmp_path / "wrong.token"
    wrong.write_text("not-the-token\n")
    wrong.chmod(0o600)
    r = limits(node, "set", "--upstream", "1MiB", token=wrong)
    assert r.returncode == 1 and "401" in r.stderr and "not-the-token" not in r.stderr
    assert httpx.get(f"{node.url}/_p2preg/limits", timeout=10).status_code == 401
    # The node's own check too, for a client that skips the command's.
    bad = httpx.put(f"{node.url}/_p2preg/limits", params={"upstream_download": "10Mb"},
                    headers=node.admin_headers(), timeout=10)
    assert bad.status_code == 400 and "10Mb" in bad.json()["errors"][0]["message"]
    unknown = httpx.put(f"{node.url}/_p2preg/limits", params={"sideways": 1},
                        headers=node.admin_headers(), timeout=10)
    assert unknown.status_code == 400
    shown = json.loads(limits(node, "show", "--json").stdout)
    assert shown["caps"] == {"peer_upload": 10_000_000, "peer_download": 0, "upstream_download": 0}
    assert shown["swarm"] is False
