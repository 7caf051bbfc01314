import pytest

from p2preg.core.digest import Digest, DigestError, Hasher
from p2preg.core.reference import InvalidName, InvalidReference, InvalidTag, Reference, parse_name

HEX = "a" * 64


def test_parse_round_trips() -> None:
    d = Digest.parse(f"sha256:{HEX}")
    assert (d.algorithm, d.hex, str(d)) == ("sha256", HEX, f"sha256:{HEX}")
    assert Digest.parse(f"sha512:{'b' * 128}").algorithm == "sha512"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "sha256",
        f"sha256:{HEX[:-1]}",
        f"sha256:{HEX}0",
        f"sha256:{HEX.upper()}",
        f"md5:{HEX}",
        f"SHA256:{HEX}",
        f"sha256:{HEX}/../x",
        f"sha256:../../{HEX[:58]}",
        "sha256:" + "a" * 5000,
    ],
)
def test_parse_rejects(text: str) -> None:
    with pytest.raises(DigestError):
        Digest.parse(text)


def test_hasher_matches_of() -> None:
    h = Hasher()
    h.update(b"hello ")
    h.update(memoryview(b"world"))
    assert h.digest() == Digest.of(b"hello world")
    assert h.size == 11


@pytest.mark.parametrize("name", ["a", "library/ubuntu", "a.b_c__d-e---f/g9", "x/y/z"])
def test_valid_names(name: str) -> None:
    assert parse_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "A", "a/", "/a", "a//b", "a/../b", "..", "a_", "-a", "a___b", "a:b", "a" * 256, "a b"],
)
def test_invalid_names(name: str) -> None:
    with pytest.raises(InvalidName):
        parse_name(name)


def test_reference_tag_and_digest() -> None:
    assert Reference.parse("v1.0_rc-1").tag == "v1.0_rc-1"
    assert Reference.parse(f"sha256:{HEX}").digest == Digest("sha256", HEX)
    with pytest.raises(InvalidTag):
        Reference.parse(".hidden")
    with pytest.raises(InvalidTag):
        Reference.parse("t" * 129)
    with pytest.raises(InvalidReference):
        Reference.parse("sha256:nothex")
