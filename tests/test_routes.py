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
