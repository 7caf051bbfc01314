"""Pinned images on a real node (p2preg/node/pins.py), against a real seed registry.

A node with a small store budget pins image A (`p2preg preheat --pin`), is
restarted, and then pulls enough other images through its facade to evict
everything it does not pin: A's manifest, config and layers are all still in
the store and served, while the first other image is gone. `p2preg unpin`
makes A evictable again, and the next pulls evict it. A pin that does not fit
beside the others is refused in one line (the CLI exits 2, the endpoint
answers an OCI error) and nothing is evicted for it; a pin from the node's
config cannot be removed at runtime, and the error says why, and it goes at
the first start without it in the config.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.images import OCI_MANIFEST, OciLayout, PushedImage, build_image
from harness.node import NodeProcess, open_node
from harness.procs import clean_env
from harness.registry import Registry
from harness.skopeo import push

pytestmark = pytest.mark.integration

SEED_NS = "seed.test"
KiB = 1024
# About two and a half of the small images below (each ~ 300 KiB).
BUDGET = 800_000
ADMIN = "pins-test-admin-token"


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, OciLayout]:
    base = tmp_path_factory.mktemp("pins")
    small = {
        name: build_image(base / name, seed=f"pins-{name}", layer_sizes=(150 * KiB, 150 * KiB))
        for name in "abcdefg"
    }
    big = build_image(base / "big", seed="pins-big", layer_sizes=(300 * KiB, 300 * KiB))
    return {**small, "big": big}


@pytest.fixture
def images(registry: Registry, layouts: dict[str, OciLayout]) -> dict[str, PushedImage]:
    return {name: push(layout, registry.host, f"pins/{name}") for name, layout in layouts.items()}


@pytest.fixture
def admin_file(tmp_path: Path) -> Path:
    path = tmp_path / "admin.token"
    path.write_text(ADMIN + "\n")
    path.chmod(0o600)
    return path


def _node(
    tmp_path: Path, registry: Registry, admin_file: Path, *args: str
) -> AbstractContextManager[NodeProcess]:
    return open_node(
        tmp_path / "node", [f"{SEED_NS}={registry.url}"],
        args=("--store-max-bytes", str(BUDGET), "--admin-token-file", str(admin_file), *args),
    )


def _p2preg(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2preg", *args], capture_output=True, text=True, timeout=300,
        env=clean_env(drop_prefixes=["P2PREG_"], COLUMNS="200"),
    )


def _ref(image: PushedImage) -> str:
    return f"{SEED_NS}/{image.repository}:{image.tag}"


def _digests(image: PushedImage) -> list[str]:
    """Everything a pin of the image holds: its manifest, config and layers."""
    return [image.digest, *(b.digest for b in image.blobs)]


def _stored(node: NodeProcess) -> set[str]:
    return {f"sha256:{p.name}" for p in (node.data_dir / "blobs" / "sha256").iterdir()}


def _get(node: NodeProcess, image: PushedImage, what: str) -> bytes:
    r = httpx.get(f"{node.url}/v2/{image.repository}/{what}?ns={SEED_NS}", timeout=60,
                  headers={"Accept": OCI_MANIFEST})
    assert r.status_code == 200, (what, r.status_code, r.text[:300])
    return r.content


def _pull(node: NodeProcess, image: PushedImage) -> None:
    """What a client pulls: the manifest by tag, then each blob, each checked."""
    body = _get(node, image, f"manifests/{image.tag}")
    assert "sha256:" + hashlib.sha256(body).hexdigest() == image.digest
    for blob in image.blobs:
        data = _get(node, image, f"blobs/{blob.digest}")
        assert "sha256:" + hashlib.sha256(data).hexdigest() == blob.digest


def _status(node: NodeProcess) -> dict[str, Any]:
    r = httpx.get(f"{node.url}/_p2preg/status", timeout=10,
                  headers={"Authorization": f"Bearer {ADMIN}"})
    doc: dict[str, Any] = r.json()
    return doc


@pytest.mark.slow
def test_a_pinned_image_survives_eviction_pressure_and_a_restart(
    registry: Registry, images: dict[str, PushedImage], admin_file: Path, tmp_path: Path
) -> None:
    a = images["a"]
    with _node(tmp_path, registry, admin_file) as node:
        proc = _p2preg("preheat", "--pin", "--node", node.url, "--admin-token-file",
                       str(admin_file), _ref(a))
        # A plain mirror (no tracker) is "not ready" for a swarm; the pin is made first.
        assert proc.returncode == 1 and "the nodes have no tracker" in proc.stdout, proc.stderr
        assert set(_digests(a)) <= _stored(node)
        shown = _p2preg("status", "--node", node.url, "--admin-token-file", str(admin_file))
        assert shown.returncode == 0, shown.stderr
        assert "pinned images" in shown.stdout and _ref(a) in shown.stdout
        assert a.digest[:19] in shown.stdout and "preheat --pin" in shown.stdout
    assert (node.data_dir / "pins.json").exists()

    with _node(tmp_path, registry, admin_file) as node:  # the same data dir: a restart
        (pin,) = _status(node)["pins"]
        size = sum(b.size for b in a.blobs) + len(_get(node, a, f"manifests/{a.digest}"))
        assert pin["image"] == _ref(a) and pin["digest"] == a.digest and pin["bytes"] == size
        assert pin["held_bytes"] == size and pin["source"] == "runtime"
        for name in "bcd":
            _pull(node, images[name])
        stored = _stored(node)
        assert set(_digests(a)) <= stored  # every byte of A stayed
        assert not {b.digest for b in images["b"].blobs} & stored  # while B went whole
        assert node.metric("p2preg_store_evictions") >= 2
        assert node.metric("p2preg_store_pinned_bytes") == size
        assert node.metric("p2preg_store_bytes") <= BUDGET
        _pull(node, a)  # and A is served from the store
        assert _get(node, a, f"manifests/{a.digest}")

        gone = _p2preg("unpin", "--node", node.url, "--admin-token-file", str(admin_file),
                       _ref(a))
        assert gone.returncode == 0 and "unpinned" in gone.stdout, gone.stderr
        assert _status(node)["pins"] == []
        for name in "efg":
            _pull(node, images[name])
        assert not {b.digest for b in a.blobs} & _stored(node)  # now eviction may take A
        assert node.metric("p2preg_store_pinned_bytes") == 0
    assert b'"pins": []' in (node.data_dir / "pins.json").read_bytes()


@pytest.mark.slow
def test_a_pin_that_does_not_fit_is_refused_and_a_config_pin_stays(
    registry: Registry, images: dict[str, PushedImage], admin_file: Path, tmp_path: Path
) -> None:
    a, big = images["a"], images["big"]
    with _node(tmp_path, registry, admin_file, "--pinned-images", _ref(a)) as node:
        for _ in range(200):  # the config pin is made in the background at start
            if _status(node)["pins"]:
                break
            time.sleep(0.1)
        (pin,) = _status(node)["pins"]
        assert pin["source"] == "config" and pin["held_bytes"] == pin["bytes"]
        _pull(node, images["b"])
        before, evictions = _stored(node), node.metric("p2preg_store_evictions")

        proc = _p2preg("preheat", "--pin", "--node", node.url, "--admin-token-file",
                       str(admin_file), _ref(big))
        assert proc.returncode == 2, (proc.stdout, proc.stderr)
        (line,) = proc.stderr.strip().splitlines()
        assert f"cannot pin {_ref(big)}" in line and "store budget is 800000 bytes" in line
        r = httpx.post(f"{node.url}/_p2preg/pins", params={"image": _ref(big)}, timeout=30,
                       headers={"Authorization": f"Bearer {ADMIN}"})
        assert r.status_code == 507 and r.json()["errors"][0]["code"] == "DENIED"
        # Nothing was evicted for it, and none of its blobs fetched.
        assert before <= _stored(node)
        assert node.metric("p2preg_store_evictions") == evictions
        assert not {b.digest for b in big.blobs} & _stored(node)
        assert len(_status(node)["pins"]) == 1

        r = httpx.delete(f"{node.url}/_p2preg/pins", params={"image": _ref(a)}, timeout=30,
                         headers={"Authorization": f"Bearer {ADMIN}"})
        assert r.status_code == 409 and "pinned_images" in r.json()["errors"][0]["message"]
        proc = _p2preg("unpin", "--node", node.url, "--admin-token-file", str(admin_file),
                       _ref(a))
        assert proc.returncode == 1 and "cannot be unpinned at runtime" in proc.stderr
        # Without the admin token a local process can neither pin nor unpin.
        for method in ("POST", "DELETE"):
            r = httpx.request(method, f"{node.url}/_p2preg/pins", params={"image": _ref(a)})
            assert r.status_code == 401
        assert set(_digests(a)) <= _stored(node)
    # Taken out of the config, the pin goes at the next start.
    with _node(tmp_path, registry, admin_file) as node:
        assert _status(node)["pins"] == []
        assert node.metric("p2preg_store_pinned_bytes") == 0
