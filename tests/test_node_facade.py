"""The node's registry facade against the real thing.

Debian's docker-registry is the seed, images are built by the tests and pushed
with skopeo, and real clients (containerd through a hosts.toml mirror whose
server is a closed port, and skopeo) pull through a node running as a process.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from harness.containerd import Containerd, write_hosts_toml
from harness.node import NodeProcess, open_node
from harness.registry import Registry
from harness.skopeo import skopeo
from p2preg.node.manifest import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST
from tests.conftest import MakeNode, PushImage
from tests.fixtures.token_issuer import TokenIssuer

pytestmark = pytest.mark.integration

ACCEPT_ALL = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST])
# The name containerd uses for the seed registry; it resolves nowhere, so only
# the mirror can serve it.
SEED_NS = "seed.test"
CREDS = "alice:secret"  # the token issuer fixture's user


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(trust_env=False, timeout=60) as client:
        yield client


def _pull_through(
    containerd: Containerd,
    hosts_dir: Path,
    node: NodeProcess,
    ref: str,
    platform: str | None = None,
) -> None:
    write_hosts_toml(hosts_dir, SEED_NS, node.url)
    containerd.pull(f"{SEED_NS}/{ref}", hosts_dir, platform=platform)


def test_containerd_pulls_oci_and_schema2_images_through_the_mirror(
    registry: Registry,
    push_image: PushImage,
    make_node: MakeNode,
    containerd: Containerd,
    hosts_dir: Path,
) -> None:
    node = make_node(f"{SEED_NS}={registry.url}")
    oci = push_image(registry, "single", format="oci")
    v2s2 = push_image(registry, "single", format="v2s2")
    for image in (oci, v2s2):
        _pull_through(containerd, hosts_dir, node, f"{image.repository}:{image.tag}")
        assert containerd.is_unpacked(image.manifests[0])
        assert {b.digest for b in image.blobs} <= containerd.content_digests()
    # Every blob came from upstream exactly once, though both images share none.
    registry.settle()
    sent = registry.blob_bytes_sent()
    for image in (oci, v2s2):
        for blob in image.blobs:
            assert sent[blob.digest] == blob.size


def test_containerd_pulls_each_platform_of_an_index(
    registry: Registry,
    push_image: PushImage,
    make_node: MakeNode,
    containerd_factory: Callable[..., Containerd],
    hosts_dir: Path,
) -> None:
    node = make_node(f"{SEED_NS}={registry.url}")
    image = push_image(registry, "index")
    assert image.media_type == OCI_INDEX
    for platform in ("linux/amd64", "linux/arm64"):
        ctrd = containerd_factory()
        _pull_through(ctrd, hosts_dir, node, f"{image.repository}:{image.tag}", platform)
        assert ctrd.is_unpacked(image.for_platform(platform))


def test_skopeo_copies_from_the_node(
    registry: Registry, push_image: PushImage, make_node: MakeNode, tmp_path: Path
) -> None:
    node = make_node(registry.url)
    for variant, fmt in (("single", "oci"), ("single", "v2s2"), ("index", "oci")):
        image = push_image(registry, variant, format=fmt)  # type: ignore[arg-type]
        dest = tmp_path / f"copy-{variant}-{fmt}"
        skopeo(
            "copy",
            "--all",
            "--src-tls-verify=false",
            "--src-no-creds",
            f"docker://{node.host}/{image.repository}:{image.tag}",
            f"dir:{dest}",
        )
        copied = {p.name for p in dest.iterdir()}
        for blob in image.blobs:
            assert blob.digest.split(":")[1] in copied
            data = (dest / blob.digest.split(":")[1]).read_bytes()
            assert "sha256:" + hashlib.sha256(data).hexdigest() == blob.digest


def test_manifest_headers_and_digest_cache(
    registry: Registry, push_image: PushImage, make_node: MakeNode, http: httpx.Client
) -> None:
    node = make_node(registry.url)
    image = push_image(registry, "single")
    url = f"{node.url}/v2/{image.repository}/manifests/{image.tag}"
    head = http.head(url, headers={"Accept": ACCEPT_ALL})
    got = http.get(url, headers={"Accept": ACCEPT_ALL})
    for r in (head, got):
        assert r.status_code == 200
        assert r.headers["Docker-Content-Digest"] == image.digest
        assert r.headers["Content-Type"] == image.media_type
        assert int(r.headers["Content-Length"]) == len(got.content)
    assert head.content == b""
    assert "sha256:" + hashlib.sha256(got.content).hexdigest() == image.digest
    # By digest it is cached for good: it is still served with the seed gone.
    registry.process.stop()
    by_digest = http.get(f"{node.url}/v2/{image.repository}/manifests/{image.digest}")
    assert by_digest.status_code == 200 and by_digest.content == got.content


def test_tag_cache_is_keyed_on_accept(
    registry: Registry, push_image: PushImage, make_node: MakeNode, http: httpx.Client
) -> None:
    node = make_node(registry.url, args=("--tag-ttl-s", "300"))
    image = push_image(registry, "index")
    url = f"{node.url}/v2/{image.repository}/manifests/{image.tag}"
    index = http.get(url, headers={"Accept": ACCEPT_ALL})
    assert index.headers["Content-Type"] == OCI_INDEX
    # A schema2-only client must not be handed the index the first one cached.
    narrow = http.get(url, headers={"Accept": DOCKER_MANIFEST})
    assert narrow.headers.get("Content-Type") != OCI_INDEX
    assert narrow.headers.get("Docker-Content-Digest") != image.digest


def test_blob_head_get_and_ranges(
    registry: Registry, push_image: PushImage, make_node: MakeNode, http: httpx.Client
) -> None:
    node = make_node(registry.url)
    image = push_image(registry, "single")
    blob = max(image.blobs, key=lambda b: b.size)
    url = f"{node.url}/v2/{image.repository}/blobs/{blob.digest}"
    head = http.head(url)
    assert head.status_code == 200
    assert int(head.headers["Content-Length"]) == blob.size
    assert head.headers["Docker-Content-Digest"] == blob.digest
    whole = http.get(url)
    assert whole.status_code == 200 and len(whole.content) == blob.size
    assert "sha256:" + hashlib.sha256(whole.content).hexdigest() == blob.digest
    part = http.get(url, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206
    assert part.headers["Content-Range"] == f"bytes 100-199/{blob.size}"
    assert part.content == whole.content[100:200]
    tail = http.get(url, headers={"Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == whole.content[-10:]
    bad = http.get(url, headers={"Range": f"bytes={blob.size}-"})
    assert bad.status_code == 416
    assert bad.headers["Content-Range"] == f"bytes */{blob.size}"
    assert bad.json()["errors"][0]["code"] == "RANGE_INVALID"


def test_tags_list_is_sorted_and_paginated(
    registry: Registry, push_image: PushImage, make_node: MakeNode, http: httpx.Client
) -> None:
    node = make_node(registry.url)
    first = push_image(registry, "single", "test/tags")
    for tag in ("v10", "alpha", "v2", "Zeta"):
        skopeo(
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            "--src-no-creds",
            "--dest-no-creds",
            f"docker://{first.reference}",
            f"docker://{registry.host}/test/tags:{tag}",
        )
    expected = sorted([first.tag, "v10", "alpha", "v2", "Zeta"])
    full = http.get(f"{node.url}/v2/test/tags/tags/list")
    assert full.json() == {"name": "test/tags", "tags": expected}
    seen: list[str] = []
    url: str | None = f"{node.url}/v2/test/tags/tags/list?n=2"
    while url is not None:
        page = http.get(url)
        assert page.status_code == 200 and len(page.json()["tags"]) <= 2
        seen += page.json()["tags"]
        link = page.headers.get("Link")
        url = node.url + link.split(";")[0].strip("<>") if link else None
    assert seen == expected
    after = http.get(f"{node.url}/v2/test/tags/tags/list", params={"last": "v10"})
    assert after.json()["tags"] == ["v2"]
    assert http.get(f"{node.url}/v2/test/tags/tags/list?n=0").json()["tags"] == []
    bad = http.get(f"{node.url}/v2/test/tags/tags/list?n=-1")
    assert bad.status_code == 400
    missing = http.get(f"{node.url}/v2/no/such/tags/list")
    assert missing.status_code == 404 and missing.json()["errors"][0]["code"] == "NAME_UNKNOWN"


def _put_manifest(
    http: httpx.Client, registry: Registry, repo: str, ref: str, doc: dict[str, object]
) -> tuple[str, int]:
    body = json.dumps(doc).encode()
    r = http.put(
        f"{registry.url}/v2/{repo}/manifests/{ref}",
        content=body,
        headers={"Content-Type": str(doc["mediaType"])},
    )
    assert r.status_code == 201, r.text
    return "sha256:" + hashlib.sha256(body).hexdigest(), len(body)


def test_referrers_from_tag_schema_or_empty(
    registry: Registry, push_image: PushImage, make_node: MakeNode, http: httpx.Client
) -> None:
    node = make_node(registry.url)
    image = push_image(registry, "single")
    subject = image.digest
    url = f"{node.url}/v2/{image.repository}/referrers/{subject}"
    empty = http.get(url)
    assert empty.status_code == 200
    assert empty.headers["Content-Type"] == OCI_INDEX
    assert empty.json()["manifests"] == []
    # An artifact that refers to the image, recorded the pre-API way: an index
    # under the `sha256-<hex>` tag.
    config = image.manifests[0].config
    artifact = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/x.sbom",
        "config": {"mediaType": config.media_type, "digest": config.digest, "size": config.size},
        "layers": [],
        "subject": {"mediaType": image.media_type, "digest": subject, "size": 1},
    }
    art_digest, art_size = _put_manifest(http, registry, image.repository, "sbom", artifact)
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": art_digest,
                "size": art_size,
                "artifactType": "application/x.sbom",
            }
        ],
    }
    _put_manifest(http, registry, image.repository, subject.replace(":", "-"), index)
    found = http.get(url)
    assert [m["digest"] for m in found.json()["manifests"]] == [art_digest]
    filtered = http.get(url, params={"artifactType": "application/x.sig"})
    assert filtered.json()["manifests"] == []
    assert filtered.headers["OCI-Filters-Applied"] == "artifactType"
    # The referrer is now proven to be in the repository: it is served by digest.
    art = http.get(
        f"{node.url}/v2/{image.repository}/manifests/{art_digest}", headers={"Accept": OCI_MANIFEST}
    )
    assert art.status_code == 200 and art.headers["Content-Type"] == OCI_MANIFEST


def test_a_blob_of_one_repository_is_not_served_through_another(
    registry: Registry, push_image: PushImage, make_node: MakeNode, http: httpx.Client
) -> None:
    node = make_node(registry.url)
    image = push_image(registry, "single", "private/a")
    push_image(registry, "single", "public/b")  # same blobs, another repository
    blob = image.blobs[-1]
    own = http.get(f"{node.url}/v2/private/a/blobs/{blob.digest}")
    assert own.status_code == 200
    # Cached now, but `other/c` never held it upstream.
    other = http.get(f"{node.url}/v2/other/c/blobs/{blob.digest}")
    assert other.status_code == 404
    assert other.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
    assert http.head(f"{node.url}/v2/other/c/blobs/{blob.digest}").status_code == 404
    assert http.get(f"{node.url}/v2/other/c/manifests/{image.digest}").status_code == 404
    # A repository that does hold it upstream is proven by one HEAD, not a download.
    registry.settle()
    before = sum(registry.blob_bytes_sent().values())
    assert http.get(f"{node.url}/v2/public/b/blobs/{blob.digest}").status_code == 200
    registry.settle()
    assert sum(registry.blob_bytes_sent().values()) == before


def test_concurrent_requests_for_a_missing_blob_fetch_it_once(
    registry: Registry, push_image: PushImage, make_node: MakeNode
) -> None:
    node = make_node(registry.url)
    image = push_image(registry, "single")
    blob = max(image.blobs, key=lambda b: b.size)
    url = f"{node.url}/v2/{image.repository}/blobs/{blob.digest}"

    def get(_: int) -> str:
        with httpx.Client(trust_env=False, timeout=60) as c:
            return "sha256:" + hashlib.sha256(c.get(url).content).hexdigest()

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        digests = list(pool.map(get, range(16)))
    assert digests == [blob.digest] * 16
    registry.settle()
    gets = [
        r
        for r in registry.served_requests()
        if r.method == "GET" and r.blob == (image.repository, blob.digest)
    ]
    assert len(gets) == 1 and gets[0].written == blob.size


def test_store_survives_a_restart(
    registry: Registry, push_image: PushImage, tmp_path: Path, http: httpx.Client
) -> None:
    image = push_image(registry, "single")
    blob = image.blobs[-1]
    path = f"/v2/{image.repository}/blobs/{blob.digest}"
    with open_node(tmp_path / "n", [registry.url]) as node:
        assert http.get(node.url + path).status_code == 200
    with open_node(tmp_path / "n", [registry.url]) as node:
        assert http.get(node.url + path).status_code == 200
        assert node.metric("p2preg_store_blobs") >= 1
        assert node.metric("p2preg_upstream_blob_bytes_total") == 0


def test_token_auth_with_credentials(
    token_registry: Registry,
    token_issuer: TokenIssuer,
    push_image: PushImage,
    make_node: MakeNode,
    http: httpx.Client,
    containerd: Containerd,
    hosts_dir: Path,
) -> None:
    image = push_image(token_registry, "single", creds=CREDS)
    anonymous = make_node(f"{SEED_NS}={token_registry.url}", name="anonymous")
    denied = http.get(f"{anonymous.url}/v2/{image.repository}/manifests/{image.tag}")
    # The seed registry refused the anonymous node: the client cannot fix that (403, not 401).
    assert denied.status_code == 403
    assert denied.json()["errors"][0]["code"] == "DENIED"
    user, password = CREDS.split(":", 1)
    node = make_node(
        f"{SEED_NS}={token_registry.url}",
        name="authed",
        args=(
            "--config",
            str(_credentials_file(node_dir=hosts_dir.parent, user=user, password=password)),
        ),
    )
    issued_before = token_issuer.issued_count
    _pull_through(containerd, hosts_dir, node, f"{image.repository}:{image.tag}")
    assert containerd.is_unpacked(image.manifests[0])
    # One token for the repository scope serves every request of the pull.
    assert token_issuer.issued_count - issued_before == 1
    # Credentials never reach the log.
    assert password not in node.process.log_path.read_text()


def _credentials_file(node_dir: Path, user: str, password: str) -> Path:
    path = node_dir / "credentials.toml"
    path.write_text(f'credentials = ["{SEED_NS}={user}:{password}"]\n')
    return path


def test_unknown_registry_is_refused_at_once(
    registry: Registry, make_node: MakeNode, http: httpx.Client
) -> None:
    node = make_node(f"{SEED_NS}={registry.url}")
    r = http.get(f"{node.url}/v2/library/alpine/manifests/latest", params={"ns": "docker.io"})
    assert r.status_code == 403
    assert r.json()["errors"][0]["code"] == "DENIED"
    registry.settle()
    assert not any("library/alpine" in s.uri for s in registry.served_requests())


BAD_REQUESTS = [
    ("GET", "/v2/UPPER/manifests/latest", 400, "NAME_INVALID"),
    ("GET", "/v2/a/manifests/-tag", 400, "TAG_INVALID"),
    ("GET", "/v2/a/manifests/sha256:1234", 400, "DIGEST_INVALID"),
    ("HEAD", "/v2/a/blobs/sha256:" + "z" * 64, 400, None),
    ("GET", "/v2/a/blobs/md5:" + "a" * 32, 400, "DIGEST_INVALID"),
    ("GET", "/v2/a/%2e%2e/%2e%2e/etc/blobs/sha256:" + "a" * 64, 400, "NAME_INVALID"),
    ("GET", "/v2/a/blobs/..%2f..%2fetc%2fpasswd", 404, None),
    ("GET", "/v2/" + "a/" * 1200 + "manifests/x", 400, "NAME_INVALID"),
    ("PUT", "/v2/a/manifests/latest", 405, "UNSUPPORTED"),
    ("POST", "/v2/a/blobs/uploads/", 405, "UNSUPPORTED"),
    ("DELETE", "/v2/a/blobs/sha256:" + "a" * 64, 405, "UNSUPPORTED"),
    ("GET", "/v2/_catalog", 404, None),
    ("GET", "/nope", 404, None),
]


@pytest.mark.parametrize(("method", "path", "status", "code"), BAD_REQUESTS)
def test_bad_input_gets_a_clear_client_error(
    registry: Registry,
    make_node: MakeNode,
    http: httpx.Client,
    method: str,
    path: str,
    status: int,
    code: str | None,
) -> None:
    node = make_node(registry.url)
    r = http.request(method, node.url + path)
    assert r.status_code == status
    if code is not None:
        assert r.json()["errors"][0]["code"] == code
    assert http.get(f"{node.url}/healthz").status_code == 200
    registry.settle()
    assert all(s.status < 500 for s in registry.served_requests())
