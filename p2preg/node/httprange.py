"""HTTP `Range` requests on blobs (RFC 9110 §14), sans-IO.

One byte range per request, which is what every registry client sends. A set of
several ranges is answered with the whole blob (the RFC lets a server ignore
Range); a malformed or unsatisfiable range raises `RangeNotSatisfiable`, as
Go's `http.ServeContent` does for the reference registry. It must not touch
files or sockets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from p2preg.node.errors import RangeNotSatisfiable

_SPEC_RE = re.compile(r"^\s*(\d*)\s*-\s*(\d*)\s*$")
MAX_RANGE_HEADER = 1024


@dataclass(frozen=True, slots=True)
class ByteRange:
    start: int
    end: int  # inclusive

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end}/{size}"


def _unsatisfiable(size: int, why: str) -> RangeNotSatisfiable:
    return RangeNotSatisfiable(why, headers={"Content-Range": f"bytes */{size}"})


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The range to serve of a `size`-byte blob, or None for the whole of it."""
    if header is None:
        return None
    if len(header) > MAX_RANGE_HEADER:
        raise _unsatisfiable(size, "Range header is too long")
    unit, sep, spec = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        raise _unsatisfiable(size, f"unsupported range unit in {header[:40]!r}")
    if "," in spec:
        return None
    m = _SPEC_RE.match(spec)
    if m is None or m.group(1) == m.group(2) == "":
        raise _unsatisfiable(size, f"malformed range {header[:40]!r}")
    first, last = m.groups()
    if first == "":
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise _unsatisfiable(size, "empty suffix range")
        return ByteRange(max(0, size - suffix), size - 1)
    start = int(first)
    end = size - 1 if last == "" else min(int(last), size - 1)
    if last != "" and int(last) < start:
        raise _unsatisfiable(size, f"range end before start in {header[:40]!r}")
    if start >= size:
        raise _unsatisfiable(size, f"range starts at {start}, blob has {size} bytes")
    return ByteRange(start, end)
