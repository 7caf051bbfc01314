"""Tests of the harness itself (harness/), against the real docker-registry,
skopeo and containerd: they show that the harness starts these, pushes what it
says it pushes, that containerd really pulls through a hosts.toml mirror entry,
and that a launcher given a network namespace runs its process there.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from harness.containerd import (
    CLOSED_SERVER,
    Containerd,
    chain_id,
    open_containerd,
    write_hosts_toml,
)
from harness.images import (
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    OciLayout,
    PushedImage,
    PushFormat,
    build_image,
    build_index,
)
from harness.netns import open_lab, unavailable_reason
from harness.nginx import open_nginx
from harness.node import open_node
from harness.procs import (
    Process,
    ProcessError,
    WaitTimeout,
    free_port,
    http_get,
    wait_for_port,
    wait_until,
)
from harness.prometheus import PromQLError, open_prometheus, write_config
from harness.registry import Registry, open_registry
from harness.skopeo import push, skopeo
from harness.tracker import open_tracker
from tests.conftest import ImageVariant, PushImage
from tests.fixtures.token_issuer import (
    TokenIssuer,
    decode_jwt_unverified,
    open_token_issuer,
    parse_scope,
)

ACCEPT = ", ".join([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST])


def _client() -> httpx.Client:
    return httpx.Client(trust_env=False, timeout=30.0)


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- procs -------------------------------------------------------------------


def test_process_error_carries_log_tail(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "print('boom: bad config', flush=True); raise SystemExit(3)"]
    proc = Process(argv, tmp_path, name="dies")
    with proc, pytest.raises(ProcessError, match="boom: bad config") as info:
        wait_until(lambda: False, timeout_s=10.0, what="never", process=proc)
    assert "exited with 3" in str(info.value)


def test_process_stop_escalates_to_sigkill(tmp_path: Path) -> None:
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(60)"
    )
    proc = Process([sys.executable, "-c", code], tmp_path, name="stubborn", term_grace_s=0.5)
    with proc:
        wait_until(lambda: "ready" in proc.log_tail(), timeout_s=10.0, what="ready", process=proc)
    assert proc.returncode == -9


def test_free_port_with_udp_is_free_for_both(tmp_path: Path) -> None:
    port = free_port(udp=True)
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind(("127.0.0.1", port))


def test_process_pipes_stdio_and_pins_cpus(tmp_path: Path) -> None:
    code = "import os, sys; print(sorted(os.sched_getaffinity(0)), sys.stdin.readline().strip())"
    with Process([sys.executable, "-c", code], tmp_path, cpus="0", pipe_stdio=True) as proc:
        proc.stdin.write(b"hello\n")
        proc.stdin.flush()
        assert proc.stdout.readline().decode().strip() == "[0] hello"


# -- network namespaces --------------------------------------------------------


@pytest.mark.integration
def test_tracker_and_node_run_inside_a_namespace(tmp_path: Path) -> None:
    """Launchers given `netns` start there, keep the program's own pid, and are asked there."""
    reason = unavailable_reason()
    assert reason is None, reason
    with open_lab(f"p2pht-{os.getpid()}", subnet="198.18.1.0/24") as lab:
        host = lab.add_host("h", 2)
        assert host.netns is not None
        ns_inode = os.stat(f"/run/netns/{host.netns}").st_ino
        with open_tracker(
            tmp_path / "tracker", host=host.addr, port=6969, netns=host.netns, insecure=True
        ) as tracker:
            pid = tracker.process.pid
            assert b"tracker" in Path(f"/proc/{pid}/cmdline").read_bytes()
            assert os.stat(f"/proc/{pid}/ns/net").st_ino == ns_inode
            assert http_get(f"{tracker.url}/healthz", netns=host.netns).status_code == 200
            args = ["--tracker", tracker.url, "--peer-host", host.addr, "--peer-port", "6881"]
            with open_node(
                tmp_path / "node",
                ["seed.test=http://127.0.0.1:9"],
                args=args,
                netns=host.netns,
                insecure=True,
            ) as node:
                assert os.stat(f"/proc/{node.process.pid}/ns/net").st_ino == ns_inode
                assert "p2preg_" in node.metrics()
            # A loopback port inside the namespace is not the machine's.
            with pytest.raises(WaitTimeout):
                wait_for_port("127.0.0.1", 1, timeout_s=0.3, netns=host.netns)


@pytest.mark.integration
def test_registry_nginx_and_containerd_run_inside_a_namespace(tmp_path: Path) -> None:
    reason = unavailable_reason()
    assert reason is None, reason
    blob = tmp_path / "blob.bin"
    blob.write_bytes(b"p2preg" * 1000)
    with open_lab(f"p2pht-{os.getpid()}", subnet="198.18.1.0/24") as lab:
        host = lab.add_host("h", 2)
        assert host.netns is not None
        ns_inode = os.stat(f"/run/netns/{host.netns}").st_ino
        with (
            open_registry(
                tmp_path / "registry", host=host.addr, port=5000, netns=host.netns
            ) as reg,
            open_nginx(
                tmp_path / "nginx", blob, addr=host.addr, port=8080, netns=host.netns
            ) as ngx,
            open_containerd(tmp_path / "containerd", netns=host.netns) as daemon,
        ):
            for pid in (reg.process.pid, ngx.pid, daemon.process.pid):
                assert os.stat(f"/proc/{pid}/ns/net").st_ino == ns_inode
            assert http_get(f"{reg.url}/v2/", netns=host.netns).status_code == 200
            assert http_get(ngx.url, netns=host.netns).content == blob.read_bytes()
            assert "Version" in daemon.ctr("version").stdout


# -- images (no processes) ---------------------------------------------------


def test_layouts_are_deterministic_and_seed_dependent(tmp_path: Path) -> None:
    a = build_image(tmp_path / "a", seed=7, layer_sizes=(1000, 5000))
    b = build_image(tmp_path / "b", seed=7, layer_sizes=(1000, 5000))
    c = build_image(tmp_path / "c", seed=8, layer_sizes=(1000, 5000))
    assert a.digest == b.digest
    assert [x.digest for x in a.blobs] == [x.digest for x in b.blobs]
    assert not {x.digest for x in a.blobs} & {x.digest for x in c.blobs}


def test_index_platforms_have_distinct_layers(tmp_path: Path) -> None:
    idx = build_index(tmp_path / "i", seed=1, layer_sizes=(1000,))
    amd64, arm64 = idx.manifests
    assert (amd64.platform, arm64.platform) == ("linux/amd64", "linux/arm64")
    assert amd64.layers[0].digest != arm64.layers[0].digest
    doc = json.loads(idx.blob_path(idx.digest).read_bytes())
    assert [m["digest"] for m in doc["manifests"]] == [amd64.digest, arm64.digest]


def test_layers_are_tar_gz_matching_config_diff_ids(tmp_path: Path) -> None:
    layout = build_image(tmp_path / "l", seed=3, layer_sizes=(10_000, 20_000))
    (m,) = layout.manifests
    config = json.loads(layout.blob_path(m.config.digest).read_bytes())
    assert config["rootfs"]["diff_ids"] == list(m.diff_ids)
    for layer, diff_id, size in zip(m.layers, m.diff_ids, (10_000, 20_000), strict=True):
        blob = layout.blob_path(layer.digest).read_bytes()
        assert (_sha256(blob), len(blob)) == (layer.digest, layer.size)
        raw = gzip.decompress(blob)
        assert _sha256(raw) == diff_id
        with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
            sizes = {i.name: i.size for i in tar.getmembers() if i.isfile()}
        assert len(sizes) >= 2
        assert size in sizes.values()


def test_parse_scope() -> None:
    assert parse_scope("repository:a/b:pull,push registry:catalog:*") == [
        {"type": "repository", "name": "a/b", "actions": ["pull", "push"]},
        {"type": "registry", "name": "catalog", "actions": ["*"]},
    ]


# -- registry ----------------------------------------------------------------


@pytest.mark.integration
def test_registry_answers_v2(registry: Registry) -> None:
    with _client() as client:
        resp = client.get(f"{registry.url}/v2/")
    assert resp.status_code == 200
    assert resp.headers["Docker-Distribution-Api-Version"] == "registry/2.0"
    assert registry.host == f"127.0.0.1:{registry.port}"


def _check_pushed(registry: Registry, pushed: PushedImage, layout: OciLayout) -> None:
    """What the registry serves over HTTP is exactly what images.py reported."""
    with _client() as client:
        base = f"{registry.url}/v2/{pushed.repository}"
        top = client.get(f"{base}/manifests/{pushed.tag}", headers={"Accept": ACCEPT})
        assert top.status_code == 200, top.text
        assert top.headers["Content-Type"] == pushed.media_type
        assert top.headers["Docker-Content-Digest"] == pushed.digest
        assert _sha256(top.content) == pushed.digest
        assert json.loads(top.content)["mediaType"] == pushed.media_type

        if pushed.is_index:
            children = json.loads(top.content)["manifests"]
            assert [c["digest"] for c in children] == [m.digest for m in pushed.manifests]
            assert [f"{c['platform']['os']}/{c['platform']['architecture']}" for c in children] == [
                m.platform for m in pushed.manifests
            ]
        for m in pushed.manifests:
            resp = client.get(f"{base}/manifests/{m.digest}", headers={"Accept": ACCEPT})
            assert resp.status_code == 200
            assert _sha256(resp.content) == m.digest
            assert len(resp.content) == m.size
            doc = json.loads(resp.content)
            assert resp.headers["Content-Type"] == doc["mediaType"] == m.media_type
            served = [doc["config"], *doc["layers"]]
            assert [(d["digest"], d["size"], d["mediaType"]) for d in served] == [
                (b.digest, b.size, b.media_type) for b in m.blobs
            ]
        for blob in pushed.blobs:
            head = client.head(f"{base}/blobs/{blob.digest}")
            assert head.status_code == 200
            assert int(head.headers["Content-Length"]) == blob.size
            body = client.get(f"{base}/blobs/{blob.digest}").content
            assert (_sha256(body), len(body)) == (blob.digest, blob.size)

    # Converting the manifest format must leave every blob as it was built.
    assert [(b.digest, b.size) for b in pushed.blobs] == [(b.digest, b.size) for b in layout.blobs]


@pytest.mark.integration
@pytest.mark.parametrize(
    ("variant", "fmt", "top_type", "child_type", "config_type", "layer_type"),
    [
        ("single", "oci", OCI_MANIFEST, OCI_MANIFEST, OCI_CONFIG, OCI_LAYER_GZIP),
        ("index", "oci", OCI_INDEX, OCI_MANIFEST, OCI_CONFIG, OCI_LAYER_GZIP),
        ("single", "v2s2", DOCKER_MANIFEST, DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER_GZIP),
        ("index", "v2s2", DOCKER_MANIFEST_LIST, DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER_GZIP),
    ],
)
def test_pushed_image_matches_registry(
    registry: Registry,
    push_image: PushImage,
    image_layouts: dict[ImageVariant, OciLayout],
    variant: ImageVariant,
    fmt: PushFormat,
    top_type: str,
    child_type: str,
    config_type: str,
    layer_type: str,
) -> None:
    pushed = push_image(registry, variant, format=fmt)
    assert pushed.media_type == top_type
    for m in pushed.manifests:
        assert m.media_type == child_type
        assert m.config.media_type == config_type
        assert {b.media_type for b in m.layers} == {layer_type}
    if fmt == "oci":
        assert pushed.digest == image_layouts[variant].digest
    else:
        assert pushed.digest != image_layouts[variant].digest
    _check_pushed(registry, pushed, image_layouts[variant])


@pytest.mark.integration
def test_blob_bytes_sent_counts_bodies_only(registry: Registry, push_image: PushImage) -> None:
    pushed = push_image(registry, "single")
    layer = pushed.manifests[0].layers[1]
    url = f"{registry.url}/v2/{pushed.repository}/blobs/{layer.digest}"
    with _client() as client:
        assert client.head(url).status_code == 200
        assert len(client.get(url).content) == layer.size
        assert client.get(url, headers={"Range": "bytes=100-1099"}).status_code == 206
    registry.settle()
    sent = registry.blob_bytes_sent(repository=pushed.repository)
    assert sent == {layer.digest: layer.size + 1000}
    assert registry.blob_bytes_sent(repository="other/repo") == {}


# -- token auth --------------------------------------------------------------


@pytest.mark.integration
def test_token_registry_push_with_creds_and_refuse_anonymous(
    token_registry: Registry, token_issuer: TokenIssuer, push_image: PushImage, tmp_path: Path
) -> None:
    with pytest.raises(subprocess.CalledProcessError):
        push_image(token_registry, "single", "private/app")
    pushed = push_image(token_registry, "single", "private/app", creds="alice:secret")
    assert any(r.user == "alice" and r.status == 200 for r in token_issuer.requests)

    anon = skopeo(
        "copy", "--src-tls-verify=false", "--src-no-creds",
        f"docker://{pushed.reference}", f"oci:{tmp_path / 'anon-pull'}:x", check=False,
    )  # fmt: skip
    assert anon.returncode != 0
    assert "unauthorized" in anon.stderr.lower() or "authentication" in anon.stderr.lower()

    wrong = skopeo(
        "inspect", "--raw", "--tls-verify=false", "--creds", "alice:wrong",
        f"docker://{pushed.reference}", check=False,
    )  # fmt: skip
    assert wrong.returncode != 0

    before = token_issuer.issued_count
    ok = skopeo(
        "inspect", "--raw", "--tls-verify=false", "--creds", "alice:secret",
        f"docker://{pushed.reference}",
    )  # fmt: skip
    assert _sha256(ok.stdout.encode()) == pushed.digest
    assert token_issuer.issued_count > before

    # And over plain HTTP: the anonymous token grants nothing, alice's grants pull.
    scope = {"service": token_issuer.service, "scope": f"repository:{pushed.repository}:pull"}
    url = f"{token_registry.url}/v2/{pushed.repository}/manifests/{pushed.digest}"
    with _client() as client:
        assert client.get(url).status_code == 401
        anon_token = client.get(token_issuer.auth.realm, params=scope).json()["token"]
        _, claims = decode_jwt_unverified(anon_token)
        assert claims["access"] == []
        resp = client.get(url, headers={"Authorization": f"Bearer {anon_token}"})
        assert resp.status_code == 401
        token = client.get(token_issuer.auth.realm, params=scope, auth=("alice", "secret")).json()
        header, claims = decode_jwt_unverified(token["access_token"])
        assert header["alg"] == "RS256" and header["x5c"]
        assert claims["aud"] == token_issuer.service and claims["sub"] == "alice"
        resp = client.get(
            url, headers={"Authorization": f"Bearer {token['token']}", "Accept": ACCEPT}
        )
        assert resp.status_code == 200
        assert _sha256(resp.content) == pushed.digest


@pytest.mark.integration
def test_token_issuer_refuse_mode(tmp_path: Path) -> None:
    with open_token_issuer(tmp_path, anonymous="refuse") as issuer, _client() as client:
        anon = client.get(issuer.auth.realm, params={"scope": "repository:x:pull"})
        assert anon.status_code == 401
        assert client.get(issuer.auth.realm, auth=("alice", "secret")).status_code == 200
    assert [r.status for r in issuer.requests] == [401, 200]


# -- containerd --------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("snapshotter", ["native", "overlayfs"])
def test_containerd_pulls_directly_from_registry(
    containerd_factory: Callable[..., Containerd],
    registry: Registry,
    push_image: PushImage,
    hosts_dir: Path,
    snapshotter: str,
) -> None:
    ctrd = containerd_factory(snapshotter=snapshotter)
    pushed = push_image(registry, "single")
    write_hosts_toml(hosts_dir, registry.host, [], server=registry.url)
    ctrd.pull(pushed.reference, hosts_dir)
    (m,) = pushed.manifests
    assert ctrd.images() == [pushed.reference]
    assert {b.digest for b in pushed.blobs} | {pushed.digest} <= ctrd.content_digests()
    assert ctrd.is_unpacked(m)
    assert chain_id(m.diff_ids[:1]) in ctrd.snapshot_keys()


@pytest.mark.integration
def test_containerd_pulls_index_platform_through_mirror(
    containerd: Containerd, registry: Registry, push_image: PushImage, hosts_dir: Path
) -> None:
    pushed = push_image(registry, "index", format="v2s2")
    # The registry plays the mirror of a name that resolves nowhere; `server`
    # is a closed port, so only the mirror entry can make this pull succeed.
    write_hosts_toml(hosts_dir, "seed.invalid", registry.url, server=CLOSED_SERVER)
    ref = f"seed.invalid/{pushed.repository}:{pushed.tag}"
    containerd.pull(ref, hosts_dir, platform="linux/arm64")

    arm64, amd64 = pushed.for_platform("linux/arm64"), pushed.for_platform("linux/amd64")
    assert containerd.is_unpacked(arm64)
    assert not containerd.is_unpacked(amd64)
    content = containerd.content_digests()
    assert {b.digest for b in arm64.blobs} <= content
    assert not {b.digest for b in amd64.layers} & content

    registry.settle()
    ctr_requests = [r for r in registry.served_requests() if r.user_agent.startswith("containerd")]
    assert ctr_requests and all("ns=seed.invalid" in r.uri for r in ctr_requests)
    assert registry.blob_bytes_sent(repository=pushed.repository) == {
        b.digest: b.size for b in arm64.blobs
    }


@pytest.mark.integration
def test_containerd_pull_fails_without_a_working_host(
    containerd: Containerd, registry: Registry, push_image: PushImage, hosts_dir: Path
) -> None:
    pushed = push_image(registry, "single")
    write_hosts_toml(hosts_dir, "seed.invalid", CLOSED_SERVER, server=CLOSED_SERVER)
    result = containerd.pull(
        f"seed.invalid/{pushed.repository}:{pushed.tag}", hosts_dir, check=False, timeout_s=60
    )
    assert result.returncode != 0
    assert containerd.images() == []


@pytest.mark.integration
def test_containerd_pulls_with_token_auth(
    containerd: Containerd,
    token_registry: Registry,
    token_issuer: TokenIssuer,
    image_layouts: dict[ImageVariant, OciLayout],
    hosts_dir: Path,
) -> None:
    pushed = push(image_layouts["single"], token_registry.host, "private/app", creds="alice:secret")
    write_hosts_toml(hosts_dir, token_registry.host, [], server=token_registry.url)
    anon = containerd.pull(pushed.reference, hosts_dir, check=False, timeout_s=60)
    assert anon.returncode != 0
    token_issuer.reset_counts()
    containerd.pull(pushed.reference, hosts_dir, user="alice:secret")
    assert containerd.is_unpacked(pushed.manifests[0])
    # containerd asks with an OAuth2 password grant (POST) when it has credentials.
    assert any(r.method == "POST" and r.user == "alice" for r in token_issuer.requests)


# -- prometheus ----------------------------------------------------------------


def test_prometheus_config_scrapes_every_job_every_second(tmp_path: Path) -> None:
    path = write_config(tmp_path / "p.yml", {"a": ["127.0.0.1:1", "127.0.0.1:2"], "b": ["h:3"]})
    config = json.loads(path.read_text())  # JSON is YAML: what Prometheus reads
    assert config["global"]["scrape_interval"] == "1s"
    jobs = {c["job_name"]: c["static_configs"][0]["targets"] for c in config["scrape_configs"]}
    assert jobs == {"a": ["127.0.0.1:1", "127.0.0.1:2"], "b": ["h:3"]}
    with pytest.raises(ValueError, match="at least one target"):
        write_config(tmp_path / "q.yml", {"a": []})


@pytest.mark.integration
def test_prometheus_scrapes_its_targets_and_stops_by_pid(tmp_path: Path) -> None:
    """It scrapes itself here: its own /metrics is a target that is always there."""
    port = free_port()
    with open_prometheus(tmp_path / "prom", {"self": [f"127.0.0.1:{port}"]}, port=port) as prom:
        wait_until(
            lambda: [float(s["value"][1]) for s in prom.query('up{job="self"}')] == [1.0],
            timeout_s=30, what="Prometheus scraping itself", interval_s=0.2,
        )
        (target,) = prom.targets()
        assert target["labels"]["job"] == "self" and target["health"] == "up"
        with pytest.raises(PromQLError, match="parse error"):
            prom.query("rate(up[")
        assert (tmp_path / "prom" / "data").is_dir()
        process = prom.process
    assert process.returncode is not None
