"""`p2preg preheat`: image references, platform choice, and a cluster made ready for a pull.

The integration test preheats one platform of a multi-platform image on two
nodes of a three-node cluster with K=2, checks with the tracker itself that
every blob has metainfo and two seeders, and then has a real containerd pull
the image through the third node: the seed registry's own log shows that the
pull cost it zero blob bytes, and the other platform's blobs were never
fetched at all. Against a mutual-TLS tracker preheat confirms as a node
(`--tls-dir`), and says in one line when it has no certificate to show.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes

import httpx
import pytest

from harness.containerd import Containerd
from harness.images import OciLayout, PushedImage, build_index
from harness.node import NodeProcess, open_node
from harness.procs import clean_env
from harness.registry import Registry
from harness.skopeo import push
from harness.tlscerts import ClusterCA
from harness.tracker import TrackerProcess, open_tracker
from p2preg.core import wire
from p2preg.node.imagerefs import (
    ImageRef,
    Platform,
    PreheatError,
    parse_image,
    select_manifests,
)
from tracker.announce import decode_scrape

SEED_NS = "seed.test"
MiB = 1 << 20


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("nginx", ImageRef("docker.io", "library/nginx", "latest")),
        ("nginx:1.27", ImageRef("docker.io", "library/nginx", "1.27")),
        ("bitnami/redis:7", ImageRef("docker.io", "bitnami/redis", "7")),
        ("index.docker.io/library/busybox", ImageRef("docker.io", "library/busybox", "latest")),
        ("ghcr.io/org/team/app:1.2", ImageRef("ghcr.io", "org/team/app", "1.2")),
        ("localhost/app", ImageRef("localhost", "app", "latest")),
        ("127.0.0.1:5000/app:v1", ImageRef("127.0.0.1:5000", "app", "v1")),
        (
            "reg.example:5000/a/b@sha256:" + "ab" * 32,
            ImageRef("reg.example:5000", "a/b", "sha256:" + "ab" * 32),
        ),
    ],
)
def test_image_references_read_as_containerd_reads_them(text: str, want: ImageRef) -> None:
    assert parse_image(text) == want


@pytest.mark.parametrize("text", ["Upper/case", "app:bad tag", "app@sha256:short", ""])
def test_bad_image_references_are_refused(text: str) -> None:
    with pytest.raises(PreheatError):
        parse_image(text)


INDEX: dict[str, Any] = {
    "manifests": [
        {"digest": "sha256:amd", "platform": {"os": "linux", "architecture": "amd64"}},
        {"digest": "sha256:arm",
         "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
        {"digest": "sha256:att", "platform": {"os": "unknown", "architecture": "unknown"}},
    ]
}


def test_platforms_pick_manifests_of_an_index() -> None:
    amd, arm = Platform.parse("linux/amd64"), Platform.parse("linux/arm64")
    assert select_manifests(INDEX, [amd]) == ["sha256:amd"]
    assert select_manifests(INDEX, [arm]) == ["sha256:arm"]
    assert select_manifests(INDEX, [Platform.parse("linux/arm64/v8")]) == ["sha256:arm"]
    assert select_manifests(INDEX, [Platform.parse("linux/arm64/v7")]) == []
    assert select_manifests(INDEX, [amd, arm]) == ["sha256:amd", "sha256:arm"]
    # Every real platform, never BuildKit's attestation manifests.
    assert select_manifests(INDEX, None) == ["sha256:amd", "sha256:arm"]
    for bad in ("linux", "linux/", "a/b/c/d"):
        with pytest.raises(PreheatError):
            Platform.parse(bad)


# -- a real cluster ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def index_layout(tmp_path_factory: pytest.TempPathFactory) -> OciLayout:
    return build_index(tmp_path_factory.mktemp("preheat") / "layout", seed="preheat",
                       layer_sizes=(2 * MiB, 3 * MiB))


@pytest.fixture
def cluster(
    registry: Registry, tmp_path: Path
) -> Iterator[tuple[TrackerProcess, list[NodeProcess]]]:
    # One admin token for every node: one `--admin-token-file` preheats them all.
    admin = tmp_path / ADMIN_TOKEN
    admin.write_text("preheat-test-admin-token\n")
    admin.chmod(0o600)
    with ExitStack() as stack:
        tracker = stack.enter_context(open_tracker(tmp_path / "tracker"))
        nodes = []
        for i in range(3):
            # Every blob through the swarm, configs too: "zero upstream bytes" is exact.
            args = ("--tracker", tracker.url, "--peer-host", "127.0.0.1", "--peer-port", "0",
                    "--node-name", f"node{i}", "--p2p-min-bytes", "0",
                    "--admin-token-file", str(admin))
            nodes.append(stack.enter_context(
                open_node(tmp_path / f"node{i}", [f"{SEED_NS}={registry.url}"], args=args,
                          name=f"node{i}")
            ))
        yield tracker, nodes


ADMIN_TOKEN = "admin.token"


def _p2preg(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2preg", *args], capture_output=True, text=True, timeout=300,
        env=clean_env(drop_prefixes=["P2PREG_"], COLUMNS="160"),
    )


def _preheat(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return _p2preg("preheat", "--admin-token-file", str(tmp_path / ADMIN_TOKEN), *args)


def _seeders(tracker: TrackerProcess, digest: str) -> tuple[bool, int]:
    r = httpx.get(f"{tracker.url}/v1/metainfo/{digest}", timeout=10)
    if r.status_code == 404:
        return False, 0
    ih = wire.decode(wire.MetainfoRecord, r.content).info_hashes[0]
    stats = decode_scrape(
        httpx.get(f"{tracker.url}/scrape?info_hash={quote_from_bytes(ih, safe='')}").content
    )
    return True, stats[ih].complete if ih in stats else 0


def _blob_bytes(registry: Registry, image: PushedImage) -> dict[str, int]:
    registry.settle()
    sent = registry.blob_bytes_sent()
    return {b.digest: sent.get(b.digest, 0) for b in image.blobs}


@pytest.mark.integration
@pytest.mark.slow
def test_after_a_preheat_the_next_pull_costs_the_seed_no_blob_bytes(
    registry: Registry, index_layout: OciLayout, tmp_path: Path,
    cluster: tuple[TrackerProcess, list[NodeProcess]],
    containerd_factory: Callable[..., Containerd],
) -> None:
    tracker, nodes = cluster
    image = push(index_layout, registry.host, "team/app")
    amd64, arm64 = image.for_platform("linux/amd64"), image.for_platform("linux/arm64")
    ref = f"{SEED_NS}/{image.repository}:{image.tag}"

    proc = _preheat(tmp_path, ref, "--node", nodes[0].url, "--node", nodes[1].url,
                   "--seeders", "2", "--platform", "linux/amd64", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["ready"] is True
    rows = {b["digest"]: b for b in result["blobs"]}
    assert set(rows) == {b.digest for b in amd64.blobs}
    for row in rows.values():
        assert row["metainfo"] and row["swarmed"] and row["seeders"] >= 2, row
        assert sorted(row["fetched"]) == sorted([nodes[0].url, nodes[1].url])
    assert "blobs on 2 node(s)" in proc.stderr  # the progress bar

    # The tracker agrees, asked directly.
    for blob in amd64.blobs:
        has_metainfo, seeders = _seeders(tracker, blob.digest)
        assert has_metainfo and seeders >= 2, blob
    # The preheat cost the seed one copy of each amd64 blob, and nothing of arm64.
    before = _blob_bytes(registry, image)
    for blob in amd64.blobs:
        assert before[blob.digest] == blob.size, blob
    for blob in arm64.blobs:
        assert before[blob.digest] == 0, blob

    # The third node was not preheated; containerd pulls through it.
    hosts = tmp_path / "certs.d"
    wrote = _p2preg("containerd-config", "--registry", f"{SEED_NS}={registry.url}",
                    "--node", nodes[2].url, "--hosts-dir", str(hosts),
                    "--containerd-config", str(tmp_path / "absent.toml"), "--ctr-only")
    assert wrote.returncode == 0, wrote.stderr
    daemon = containerd_factory()
    daemon.pull(ref, hosts, platform="linux/amd64")
    assert daemon.is_unpacked(amd64)
    assert _blob_bytes(registry, image) == before  # zero blob bytes for this pull
    assert nodes[2].metric("p2preg_upstream_blob_bytes_total") == 0
    assert nodes[2].metric("p2preg_peer_blob_bytes_total") >= sum(b.size for b in amd64.blobs)


@pytest.mark.integration
@pytest.mark.slow
def test_preheat_says_when_the_cluster_is_not_ready(
    registry: Registry, index_layout: OciLayout, tmp_path: Path,
    cluster: tuple[TrackerProcess, list[NodeProcess]],
) -> None:
    _, nodes = cluster
    image = push(index_layout, registry.host, "team/app")
    ref = f"{SEED_NS}/{image.repository}:{image.tag}"
    # One node cannot make three seeders: the tracker counts one, and it says so.
    proc = _preheat(tmp_path, ref, "--node", nodes[0].url, "--seeders", "3",
                   "--platform", "linux/arm64", "--confirm-timeout-s", "2")
    assert proc.returncode == 1
    assert "not ready" in proc.stdout and "3 seeder(s)" in proc.stdout
    for blob in image.for_platform("linux/arm64").blobs:
        assert blob.digest[:19] in proc.stdout
    # A second run finds everything in the node's store already.
    again = _preheat(tmp_path, ref, "--node", nodes[0].url, "--platform", "linux/arm64", "--json")
    assert again.returncode == 0, again.stderr
    for row in json.loads(again.stdout)["blobs"]:
        assert row["fetched"] == {nodes[0].url: "store"} and row["seeders"] >= 1
    missing = _preheat(tmp_path, f"{SEED_NS}/team/nothing:here", "--node", nodes[0].url)
    assert missing.returncode == 1 and "404" in missing.stderr
    other = _preheat(tmp_path, ref, "--node", nodes[0].url, "--platform", "linux/s390x")
    assert other.returncode == 1 and "no manifest for platform linux/s390x" in other.stderr


def test_the_token_comes_from_the_environment_or_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import argparse

    from p2preg.node.preheat import read_token

    for var in ("P2PREG_TRACKER_TOKEN", "P2PREG_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    assert read_token(argparse.Namespace()) is None
    monkeypatch.setenv("P2PREG_TOKEN", "from-tracker-env")
    assert read_token(argparse.Namespace()) == "from-tracker-env"
    monkeypatch.setenv("P2PREG_TRACKER_TOKEN", "from-node-env")
    assert read_token(argparse.Namespace()) == "from-node-env"
    (tmp_path / "t").write_text("from-file\n")
    assert read_token(argparse.Namespace(token_file=str(tmp_path / "t"))) == "from-file"


@pytest.mark.integration
@pytest.mark.slow
def test_preheat_confirms_with_a_mutual_tls_tracker_as_a_node(
    registry: Registry, index_layout: OciLayout, tmp_path: Path
) -> None:
    image = push(index_layout, registry.host, "team/app")
    ref = f"{SEED_NS}/{image.repository}:{image.tag}"
    ca = ClusterCA.make("preheat")
    tracker_tls = ca.tls_dir(tmp_path / "certs" / "t", "tracker", "t", ips=["127.0.0.1"])
    node_tls = ca.tls_dir(tmp_path / "certs" / "n", "node", "node0")
    with (
        open_tracker(tmp_path / "tracker", tls_dir=tracker_tls) as tracker,
        open_node(tmp_path / "node0", [f"{SEED_NS}={registry.url}"], tls_dir=node_tls,
                  args=("--tracker", tracker.url, "--peer-host", "127.0.0.1", "--peer-port",
                        "0", "--peer-ssl-port", "0", "--p2p-min-bytes", "0")) as node,
    ):
        run = ("preheat", ref, "--node", node.url, "--platform", "linux/amd64",
               "--admin-token-file", str(node.admin_token_file))
        # The tracker comes from the node's status: https, and no certificate to show.
        blind = _p2preg(*run, "--json")
        assert blind.returncode == 1, blind.stderr
        problem = json.loads(blind.stdout)["problem"]
        assert problem.startswith(f"the tracker {tracker.url} wants a client certificate")
        # Named, it is a one-line error before anything is fetched.
        named = _p2preg(*run, "--tracker", tracker.url)
        assert named.returncode == 2 and named.stderr.count("\n") == 1, named.stderr
        assert "give --tls-dir DIR" in named.stderr
        # With the node's certificate: confirmed by the tracker, blob by blob.
        proc = _p2preg(*run, "--json", "--tls-dir", str(node_tls))
        assert proc.returncode == 0, proc.stderr
        rows = json.loads(proc.stdout)["blobs"]
        assert {r["digest"] for r in rows} == {
            b.digest for b in image.for_platform("linux/amd64").blobs
        }
        assert all(r["metainfo"] and r["seeders"] >= 1 for r in rows), rows
