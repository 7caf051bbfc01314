import json

import pytest

from p2preg.core.digest import Digest
from p2preg.node import manifest as mf

A, B, C = (Digest("sha256", ch * 64) for ch in "abc")


def _desc(d: Digest, **extra: str) -> dict[str, object]:
    return {"mediaType": "x", "digest": str(d), "size": 1, **extra}


def test_image_manifest_references() -> None:
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": mf.DOCKER_MANIFEST,
            "config": _desc(A),
            "layers": [_desc(B), _desc(C)],
        }
    ).encode()
    p = mf.parse(body)
    assert p.media_type == mf.DOCKER_MANIFEST
    assert p.blobs == {A, B, C}
    assert p.manifests == frozenset()
    assert p.pull_order == (A, B, C)


def test_pull_order_is_config_then_layers_each_once() -> None:
    body = json.dumps(
        {"config": _desc(B), "layers": [_desc(C), _desc(A), _desc(C), "junk"]}
    ).encode()
    assert mf.parse(body).pull_order == (B, C, A)
    index = json.dumps({"schemaVersion": 2, "manifests": [_desc(A)]}).encode()
    assert mf.parse(index).pull_order == ()


def test_media_type_inferred_when_absent() -> None:
    index = json.dumps({"schemaVersion": 2, "manifests": [_desc(A)]}).encode()
    assert mf.parse(index).media_type == mf.OCI_INDEX
    assert mf.parse(index).manifests == {A}
    image = json.dumps(
        {"schemaVersion": 2, "config": _desc(A), "layers": [], "subject": _desc(B)}
    ).encode()
    p = mf.parse(image)
    assert (p.media_type, p.subject) == (mf.OCI_MANIFEST, B)


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"schemaVersion": 2}',
        b'{"layers": [{"digest": "sha256:zz"}], "config": {}}',
    ],
)
def test_invalid_manifests(body: bytes) -> None:
    with pytest.raises(mf.ManifestInvalid):
        mf.parse(body)


def test_accept_key_is_canonical() -> None:
    a = mf.accept_key(f"{mf.OCI_INDEX}, {mf.DOCKER_MANIFEST};q=0.5")
    b = mf.accept_key(f"{mf.DOCKER_MANIFEST},{mf.OCI_INDEX}")
    assert a == b
    assert mf.accept_key(mf.DOCKER_MANIFEST) != a  # a schema2-only client is cached apart
    assert mf.accept_key(None) == mf.accept_key("") == ""


def test_forwarded_accept_keeps_only_media_ranges() -> None:
    # Found by tests/test_fuzz_facade.py: junk in Accept used to reach the upstream request.
    accept = mf.forwarded_accept([mf.OCI_MANIFEST, f"{mf.OCI_INDEX};q=0.5, {mf.OCI_MANIFEST}"])
    assert accept == f"{mf.OCI_MANIFEST}, {mf.OCI_INDEX}"
    assert mf.forwarded_accept(["\xe9/\xff, , ;", "a/" + "b" * 200, "text", ""]) is None
    assert mf.forwarded_accept([]) is None
    many = [", ".join(f"a/b{i}" for i in range(100))]
    assert mf.forwarded_accept(many) == ", ".join(f"a/b{i}" for i in range(mf.MAX_ACCEPT_TYPES))


def test_referrers_index_filter() -> None:
    body = json.dumps({"manifests": [_desc(A, artifactType="sig"), _desc(B, artifactType="sbom")]})
    out = json.loads(mf.filter_index(body.encode(), "sbom"))
    assert out["mediaType"] == mf.OCI_INDEX
    assert [m["digest"] for m in out["manifests"]] == [str(B)]
    assert len(json.loads(mf.filter_index(body.encode(), None))["manifests"]) == 2
    assert json.loads(mf.empty_index())["manifests"] == []
