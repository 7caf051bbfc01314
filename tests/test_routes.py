import json

import pytest

from p2preg.core.digest import Digest
from p2preg.node.errors import (
    BlobUnknown,
    DigestInvalid,
    NameInvalid,
    NotFound,
    RegistryError,
    TagInvalid,
    Unsupported,
)
from p2preg.node.routes import Kind, parse_route

D = "sha256:" + "c" * 64


def test_routes() -> None:
    assert parse_route("GET", "/v2/").kind is Kind.BASE
    r = parse_route("HEAD", "/v2/library/ubuntu/manifests/22.04")
    assert (r.kind, r.name, str(r.reference)) == (Kind.MANIFEST, "library/ubuntu", "22.04")
    r = parse_route("GET", f"/v2/a/b/manifests/{D}")
    assert r.reference is not None and r.reference.digest == Digest.parse(D)
    r = parse_route("GET", f"/v2/a/blobs/{D}")
    assert (r.kind, r.digest) == (Kind.BLOB, Digest.parse(D))
    assert parse_route("GET", "/v2/a/b/tags/list").kind is Kind.TAGS
    assert parse_route("GET", f"/v2/a/referrers/{D}").kind is Kind.REFERRERS


def test_name_may_contain_endpoint_words() -> None:
    r = parse_route("GET", "/v2/blobs/manifests/manifests/latest")
    assert (r.name, str(r.reference)) == ("blobs/manifests", "latest")


@pytest.mark.parametrize(
    ("method", "path", "error"),
    [
        ("GET", "/v2/UPPER/manifests/x", NameInvalid),
        ("GET", "/v2/a/../b/manifests/x", NameInvalid),
        ("GET", "/v2/../../etc/passwd/blobs/" + D, NameInvalid),
        ("GET", "/v2/a/manifests/-bad", TagInvalid),
        ("GET", "/v2/a/manifests/sha256:zz", DigestInvalid),
        ("GET", "/v2/a/blobs/latest", DigestInvalid),
        ("GET", "/v2/a/blobs/sha256:" + "c" * 63 + "/", NotFound),
        ("GET", "/v2/a/blobs/sha256:../../x", NotFound),
        ("GET", "/v2/a/unknown/x", NotFound),
        ("GET", "/v2/a/manifests/" + "x" * 3000, NameInvalid),
        ("PUT", "/v2/a/manifests/latest", Unsupported),
        ("DELETE", f"/v2/a/blobs/{D}", Unsupported),
        ("POST", "/v2/a/blobs/uploads/", Unsupported),
        ("PATCH", "/v2/a/blobs/uploads/123", Unsupported),
    ],
)
def test_bad_requests_map_to_client_errors(
    method: str, path: str, error: type[RegistryError]
) -> None:
    with pytest.raises(error) as exc:
        parse_route(method, path)
    assert 400 <= exc.value.status < 500


def test_error_body_is_oci_json() -> None:
    body = json.loads(BlobUnknown("nope").body())
    assert body == {"errors": [{"code": "BLOB_UNKNOWN", "message": "nope"}]}
    assert BlobUnknown.status == 404
    assert Unsupported.status == 405 and Unsupported.code == "UNSUPPORTED"


UPSTREAMS = frozenset({"docker.io", "ghcr.io", "localhost:5000"})


def test_a_first_segment_naming_an_upstream_picks_it_and_is_stripped() -> None:
    r = parse_route("GET", "/v2/docker.io/library/alpine/manifests/3.20", UPSTREAMS)
    assert (r.upstream, r.name, r.path_name) == (
        "docker.io", "library/alpine", "docker.io/library/alpine"
    )
    r = parse_route("GET", f"/v2/ghcr.io/org/app/blobs/{D}", UPSTREAMS)
    assert (r.kind, r.upstream, r.name) == (Kind.BLOB, "ghcr.io", "org/app")
    r = parse_route("GET", "/v2/ghcr.io/org/app/tags/list", UPSTREAMS)
    assert (r.kind, r.upstream, r.name) == (Kind.TAGS, "ghcr.io", "org/app")
    r = parse_route("GET", f"/v2/docker.io/x/referrers/{D}", UPSTREAMS)
    assert (r.kind, r.upstream, r.name) == (Kind.REFERRERS, "docker.io", "x")


def test_the_prefix_is_stripped_once_so_a_repository_named_like_an_upstream_is_reachable() -> None:
    r = parse_route("GET", "/v2/docker.io/docker.io/tools/manifests/1", UPSTREAMS)
    assert (r.upstream, r.name) == ("docker.io", "docker.io/tools")
    r = parse_route("GET", "/v2/docker.io/ghcr.io/x/manifests/1", UPSTREAMS)
    assert (r.upstream, r.name) == ("docker.io", "ghcr.io/x")


@pytest.mark.parametrize(
    "path",
    [
        "/v2/docker.io/manifests/1",  # nothing after the segment: a repository named docker.io
        "/v2/quay.io/org/app/manifests/1",  # looks like a host, but is no configured upstream
        "/v2/library/alpine/manifests/1",
    ],
)
def test_without_a_configured_first_segment_the_name_is_kept_whole(path: str) -> None:
    r = parse_route("GET", path, UPSTREAMS)
    assert r.upstream is None
    assert r.path_name == r.name == path[len("/v2/") : path.index("/manifests/")]


def test_no_upstream_names_means_no_prefix() -> None:
    """What the facade passes when `?ns=` is present: the query has priority."""
    r = parse_route("GET", "/v2/docker.io/library/alpine/manifests/1")
    assert (r.upstream, r.name) == (None, "docker.io/library/alpine")


def test_a_name_that_only_a_prefix_makes_valid_is_still_checked() -> None:
    r = parse_route("GET", "/v2/localhost:5000/app/manifests/1", UPSTREAMS)
    assert (r.upstream, r.name) == ("localhost:5000", "app")
    with pytest.raises(NameInvalid):
        parse_route("GET", "/v2/localhost:5000/manifests/1", UPSTREAMS)
    with pytest.raises(NameInvalid):
        parse_route("GET", "/v2/docker.io/UP/manifests/1", UPSTREAMS)
    with pytest.raises(NameInvalid):  # names compare exactly: not stripped, then refused
        parse_route("GET", "/v2/Docker.io/x/manifests/1", UPSTREAMS)
    with pytest.raises(Unsupported):
        parse_route("PUT", "/v2/docker.io/app/manifests/1", UPSTREAMS)
