import pytest

from p2preg.node.errors import RangeNotSatisfiable
from p2preg.node.httprange import ByteRange, parse_range


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        (None, 10, None),
        ("bytes=0-4", 10, ByteRange(0, 4)),
        ("bytes=5-", 10, ByteRange(5, 9)),
        ("bytes=5-100", 10, ByteRange(5, 9)),
        ("bytes=-3", 10, ByteRange(7, 9)),
        ("bytes=-30", 10, ByteRange(0, 9)),
        ("BYTES = 2 - 3", 10, ByteRange(2, 3)),
        ("bytes=0-1,4-5", 10, None),  # several ranges: the whole blob, as RFC 9110 allows
    ],
)
def test_satisfiable(header: str | None, size: int, expected: ByteRange | None) -> None:
    assert parse_range(header, size) == expected


@pytest.mark.parametrize(
    "header",
    [
        "bytes=10-",
        "bytes=20-30",
        "bytes=5-2",
        "bytes=-0",
        "bytes=-",
        "items=0-1",
        "bytes=a-b",
        "bytes",
        "0-1",
        "bytes=1-2-3",
        "bytes=" + "9" * 2000,
    ],
)
def test_unsatisfiable(header: str) -> None:
    with pytest.raises(RangeNotSatisfiable) as exc:
        parse_range(header, 10)
    assert exc.value.status == 416
    assert exc.value.headers["Content-Range"] == "bytes */10"


def test_empty_blob_has_no_satisfiable_range() -> None:
    with pytest.raises(RangeNotSatisfiable):
        parse_range("bytes=0-", 0)


def test_content_range_and_length() -> None:
    r = ByteRange(10, 19)
    assert r.length == 10
    assert r.content_range(100) == "bytes 10-19/100"
