"""kubelet's pull path: containerd's CRI image service, through the node or around it.

kubelet does not pull with `ctr --hosts-dir`: it calls
`/runtime.v1.ImageService/PullImage` on containerd's socket, and the CRI
plugin reads hosts.toml only from its registry `config_path`. Here a real
containerd (Debian's 1.6) runs with its CRI plugin enabled and that path set
as `p2preg containerd-config` asks, and harness/cri.py sends the calls kubelet
sends: the image lands in the `k8s.io` namespace, and the seed registry sees
only the node (which seeds the layer to the tracker's swarm). The same daemon
without `config_path` still pulls, straight from the registry: the node saves
nothing, and `p2preg status` and `p2preg_containerd_config_ok` say so.
The codec is checked on its own against bytes worked out by hand.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from harness import cri
from harness.containerd import CRI_NAMESPACE, Containerd, open_containerd
from harness.images import PushedImage, build_image
from harness.node import NodeProcess, open_node
from harness.procs import clean_env, free_port, http_get, wait_until
from harness.registry import Registry
from harness.skopeo import push
from harness.tracker import open_tracker
from tests.conftest import PushImage

MiB = 1 << 20
TOKEN = "cri-pull-test-token"
BYPASS = "kubelet pulls bypass the node"

# -- the codec ---------------------------------------------------------------------


def test_varints_as_the_protobuf_encoding_spells_them() -> None:
    assert cri.varint(0) == b"\x00" and cri.varint(1) == b"\x01"
    assert cri.varint(150) == b"\x96\x01"  # the encoding guide's own example
    assert cri.varint(300) == b"\xac\x02"
    assert cri.varint((1 << 64) - 1) == b"\xff" * 9 + b"\x01"
    with pytest.raises(ValueError):
        cri.varint(-1)
    with pytest.raises(ValueError):
        cri.varint(1 << 64)


def test_a_pull_request_is_the_message_kubelet_sends() -> None:
    pod = cri.PodMeta(name="web-0", namespace="shop", uid="u1", attempt=2, labels={"app": "web"})
    got = cri.encode_pull_image_request("r.test/a:1", auth=("bob", "pw"), pod=pod)
    image_spec = b"\x0a\x0ar.test/a:1"  # ImageSpec.image (1)
    auth = b"\x0a\x03bob" + b"\x12\x02pw"  # AuthConfig.username (1), .password (2)
    metadata = b"\x0a\x05web-0" + b"\x12\x02u1" + b"\x1a\x04shop" + b"\x20\x02"
    labels = b"\x32\x0a" + b"\x0a\x03app" + b"\x12\x03web"  # map entry: key 1, value 2
    sandbox = b"\x0a" + bytes([len(metadata)]) + metadata + labels
    want = (
        b"\x0a" + bytes([len(image_spec)]) + image_spec
        + b"\x12" + bytes([len(auth)]) + auth
        + b"\x1a" + bytes([len(sandbox)]) + sandbox
    )  # fmt: skip
    assert got == want
    # Without credentials or a pod only the image goes on the wire.
    assert cri.encode_pull_image_request("r.test/a:1") == b"\x0a\x0c" + image_spec
    with pytest.raises(ValueError):
        cri.encode_pull_image_request("")


def test_replies_are_read_and_bad_ones_refused() -> None:
    image = (
        b"\x0a\x08sha256:1"  # id
        + b"\x12\x08r.test/a" + b"\x12\x0ar.test/a:2"  # repo_tags, twice
        + b"\x1a\x0ar.test/a@x"  # repo_digests
        + b"\x20\xac\x02"  # size 300
        + b"\x40\x01"  # pinned (8), a field the reader does not need
        + b"\x49" + bytes(8)  # a fixed64 field 9 no CRI version has: skipped
    )
    status = b"\x0a" + bytes([len(image)]) + image + b"\x12\x00"
    assert cri.decode_image(status) == cri.CriImage(
        "sha256:1", ("r.test/a", "r.test/a:2"), ("r.test/a@x",), 300
    )
    assert cri.decode_image(b"") is None  # ImageStatus of an image containerd lacks
    assert cri.decode_pull_image_response(b"\x0a\x08sha256:9") == "sha256:9"
    assert [i.id for i in cri.decode_list_images_response(status + status)] == ["sha256:1"] * 2
    for bad in (b"\x0a\x05abc", b"\x0a", b"\x08" + b"\xff" * 11, b"\x0b", b"\x0d\x00"):
        with pytest.raises(cri.CriError):
            cri.decode_fields(bad)
    with pytest.raises(cri.CriError):
        cri.decode_pull_image_response(b"")


# -- real containerd ---------------------------------------------------------------


def test_a_config_path_without_the_cri_plugin_is_refused(tmp_path: Path) -> None:
    # ctr ignores config_path: asking for one without CRI would test nothing.
    with pytest.raises(ValueError, match="needs cri=True"), open_containerd(
        tmp_path / "c", cri_hosts_dir=tmp_path / "certs.d"
    ):
        pass
    assert not (tmp_path / "c").exists()


def _p2preg(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2preg", *map(str, args)], capture_output=True, text=True,
        timeout=60, env=clean_env(drop_prefixes=["P2PREG_"]),
    )  # fmt: skip


def _node_toml(
    tmp_path: Path, registry: Registry, daemon: Containerd, hosts: Path
) -> tuple[Path, int]:
    """The node's config (the registry under its own name, this host's containerd to
    watch) and its port, which `p2preg containerd-config` reads from `listen`."""
    path, port = tmp_path / "node.toml", free_port()
    path.write_text(
        f'listen = "127.0.0.1:{port}"\nupstream = ["{registry.url}"]\n'
        f'containerd_config = "{daemon.config_path}"\ncontainerd_hosts_dir = "{hosts}"\n'
    )
    return path, port


def _agents_since(registry: Registry, seen: int) -> list[tuple[str, str]]:
    """(kind, user agent) of every manifest and blob request the registry served since."""
    registry.settle()
    out = []
    for r in registry.served_requests()[seen:]:
        kind = "blob" if r.blob else "manifest" if r.manifest else None
        if kind is not None:
            out.append((kind, r.user_agent))
    return out


def _pulled(daemon: Containerd, image: PushedImage, image_id: str) -> None:
    """The image is kubelet's: in `k8s.io`, with the id CRI gave, its layers unpacked."""
    manifest = image.manifests[0]
    assert image_id == manifest.config.digest
    kubelets = daemon.in_namespace(CRI_NAMESPACE)
    assert image.reference in kubelets.images()
    assert kubelets.is_unpacked(manifest)
    with cri.open_image_service(daemon.address) as service:
        status = service.image_status(image.reference)
        assert status is not None and status.id == image_id
        assert image.reference in status.repo_tags
        repo = image.reference.rpartition(":")[0]
        assert f"{repo}@{manifest.digest}" in status.repo_digests
        assert image_id in {i.id for i in service.list_images()}


def _status(node: NodeProcess, daemon: Containerd, hosts: Path) -> dict[str, object]:
    proc = _p2preg("status", "--node", node.url, "--json", "--containerd-config",
                   daemon.config_path, "--hosts-dir", hosts)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    finding = json.loads(proc.stdout)["containerd"]
    assert isinstance(finding, dict)
    return finding


@pytest.mark.integration
def test_a_kubelet_pull_goes_through_the_node(
    registry: Registry, tmp_path: Path, containerd_factory: Callable[..., Containerd]
) -> None:
    # One layer big enough for the swarm, so the node seeds it to the tracker.
    layout = build_image(tmp_path / "layout", seed="cri", layer_sizes=(64 << 10, 2 * MiB))
    image = push(layout, registry.host, "team/cri")
    hosts = tmp_path / "certs.d"
    daemon = containerd_factory(cri=True, cri_hosts_dir=hosts)
    node_toml, port = _node_toml(tmp_path, registry, daemon, hosts)
    # The command reads this daemon's config, finds config_path set, writes the files.
    wrote = _p2preg("containerd-config", "--config", node_toml, "--hosts-dir", hosts,
                    "--containerd-config", daemon.config_path)  # fmt: skip
    assert wrote.returncode == 0, wrote.stderr
    assert f"reads hosts.toml from {hosts}" in wrote.stdout and "WARNING" not in wrote.stderr
    assert (hosts / registry.host / "hosts.toml").is_file()

    with open_tracker(tmp_path / "tracker", token=TOKEN) as tracker:
        args = ("--config", str(node_toml), "--tracker", tracker.url,
                "--peer-host", "127.0.0.1", "--peer-port", "0")  # fmt: skip
        with open_node(tmp_path / "node", [], args=args, port=port,
                       env={"P2PREG_TRACKER_TOKEN": TOKEN}) as node:  # fmt: skip
            seen = len(registry.served_requests())
            with cri.open_image_service(daemon.address) as service:
                # kubelet asks first, then pulls with the pod's sandbox config.
                assert service.image_status(image.reference) is None
                image_id = service.pull_image(image.reference, pod=cri.PodMeta(name="web-0"))
            _pulled(daemon, image, image_id)
            served = node.metric("p2preg_http_requests_total", route="blob", status="200")
            assert served >= len(image.blobs)
            assert node.metric("p2preg_upstream_blob_bytes_total") == sum(
                b.size for b in image.blobs
            )
            agents = _agents_since(registry, seen)
            # The manifest and every blob were asked by the node; containerd asked nothing.
            assert {kind for kind, _ in agents} == {"manifest", "blob"}, agents
            assert not any("containerd" in agent for _, agent in agents), agents
            wait_until(lambda: node.metric("p2preg_blobs_seeded") >= 1, timeout_s=30,
                       what="the node to seed the 2 MiB layer")  # fmt: skip
            finding = _status(node, daemon, hosts)
            assert finding["ok"] is True and finding["add"] == [], finding
            assert node.metric("p2preg_containerd_config_ok") == 1
            # Without flags status takes the node's word (it reads the daemon's config),
            # not this machine's /etc/containerd, as in a pod where that is not the host's.
            bare = _p2preg("status", "--node", node.url, "--json")
            assert bare.returncode == 0, bare.stderr
            assert json.loads(bare.stdout)["containerd"] == finding


@pytest.mark.integration
def test_without_config_path_kubelet_pulls_bypass_the_node_and_status_says_so(
    registry: Registry, push_image: PushImage, tmp_path: Path,
    containerd_factory: Callable[..., Containerd],
) -> None:
    image = push_image(registry, "single")
    hosts = tmp_path / "certs.d"
    daemon = containerd_factory(cri=True)  # no config_path: Debian's containerd as shipped
    node_toml, port = _node_toml(tmp_path, registry, daemon, hosts)
    key = f'plugins."io.containerd.grpc.v1.cri".registry.config_path = "{hosts}"'
    args = ("containerd-config", "--config", node_toml, "--hosts-dir", hosts,
            "--containerd-config", daemon.config_path)  # fmt: skip
    refused = _p2preg(*args)
    assert refused.returncode == 2 and key in refused.stderr and not hosts.exists()
    # Written all the same (an operator who forced it): files kubelet never reads.
    assert _p2preg(*args, "--ctr-only").returncode == 0
    assert (hosts / registry.host / "hosts.toml").is_file()

    with open_node(tmp_path / "node", [], args=("--config", str(node_toml)), port=port) as node:
        finding = _status(node, daemon, hosts)
        assert finding["ok"] is False and finding["add"] == [key], finding
        assert BYPASS in str(finding["reason"]), finding
        table = _p2preg("status", "--node", node.url, "--containerd-config", daemon.config_path,
                        "--hosts-dir", hosts)  # fmt: skip
        assert "NO: they bypass the node" in table.stdout and BYPASS in table.stdout
        assert node.metric("p2preg_containerd_config_ok") == 0
        # Not a reason to restart the node's pod.
        assert http_get(f"{node.url}/healthz").status_code == 200
        # And it is so: the pull works, straight from the registry, the node unasked.
        seen = len(registry.served_requests())
        with cri.open_image_service(daemon.address) as service:
            image_id = service.pull_image(image.reference)
        _pulled(daemon, image, image_id)
        agents = _agents_since(registry, seen)
        assert agents and all("containerd" in agent for _, agent in agents), agents
        assert node.metric("p2preg_http_requests_total", route="blob", status="200") == 0
        assert node.metric("p2preg_upstream_blob_bytes_total") == 0
