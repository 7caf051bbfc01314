"""Pin records, the budget rule and the pins file (p2preg/node/pinbook.py), without a node."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from p2preg.core.digest import Digest
from p2preg.node.pinbook import Pin, PinBook, PinRefused


def _pin(image: str, *blobs: tuple[bytes, int], source: str = "runtime") -> Pin:
    held = tuple((Digest.of(name), size) for name, size in blobs)
    return Pin(image, held[0][0], ("linux/amd64",), source, held)


def test_a_pin_that_does_not_fit_beside_the_others_is_refused(tmp_path: Path) -> None:
    book = PinBook(tmp_path / "pins.json")
    book.add(_pin("r.test/a:1", (b"ma", 10), (b"shared", 400), (b"la", 300)))
    assert book.planned_bytes() == 710
    # A layer shared with a pinned image counts once: 710 + 10 + 280 = 1000 fits.
    b = _pin("r.test/b:1", (b"mb", 10), (b"shared", 400), (b"lb", 280))
    book.check_fits(b, 1000)
    with pytest.raises(PinRefused, match=r"needs 301 bytes, 710 bytes are pinned already"):
        book.check_fits(_pin("r.test/c:1", (b"mc", 1), (b"lc", 300)), 1000)
    # A new pin of an image replaces its old one: a counts once, at its new size.
    book.check_fits(_pin("r.test/a:1", (b"ma2", 10), (b"la2", 990)), 1000)
    with pytest.raises(PinRefused) as refused:
        book.check_fits(_pin("r.test/a:1", (b"ma2", 10), (b"la2", 991)), 1000)
    assert refused.value.status == 507
    assert json.loads(refused.value.body())["errors"][0]["code"] == "DENIED"


def test_pins_survive_a_restart_and_an_unreadable_file_is_set_aside(tmp_path: Path) -> None:
    path = tmp_path / "pins.json"
    book = PinBook(path)
    a = _pin("r.test/a:1", (b"ma", 10), (b"la", 300))
    c = _pin("r.test/c@sha256:" + "ab" * 32, (b"mc", 5), source="config")
    book.add(a)
    book.add(c)
    book.save()
    assert path.stat().st_mode & 0o077 == 0
    assert list(tmp_path.iterdir()) == [path]  # no temp file left beside it
    again = PinBook(path)
    assert sorted(again.load(), key=lambda p: p.image) == [a, c]
    assert again.get("r.test/a:1") == a and len(again) == 2
    assert again.remove("r.test/a:1") == a and again.remove("r.test/a:1") is None
    path.write_text('{"version": 1, "pins": [{"image": "x"}]}')
    broken = PinBook(path)
    assert broken.load() == [] and len(broken) == 0
    assert not path.exists() and (tmp_path / "pins.json.corrupt").exists()
    assert PinBook(path).load() == []  # no file: no pins


@pytest.mark.parametrize(
    "doc",
    [
        [],
        {"image": "x", "source": "elsewhere", "blobs": {}},
        {"image": "x", "source": "runtime", "digest": "sha256:00", "blobs": {}},
        {"image": "x", "source": "runtime", "digest": str(Digest.of(b"m")),
         "blobs": {str(Digest.of(b"m")): -1}},
        {"image": "x", "source": "runtime", "digest": str(Digest.of(b"m")),
         "blobs": {}, "platforms": "linux/amd64"},
    ],
)
def test_malformed_pin_records_are_refused(doc: object) -> None:
    with pytest.raises(ValueError):
        Pin.from_json(doc)
