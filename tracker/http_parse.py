"""HTTP/1.1 requests from bytes (RFC 9112): a head, and the body its framing says.

Owns the grammar the tracker accepts — a request line (token method, a target
of visible ASCII, `HTTP/d.d`), header fields (token names, values without NUL
or line breaks), the framing a head declares (none, one Content-Length, or
`Transfer-Encoding: chunked`) and whether the connection may carry another
request — and refuses everything else with the status a server owes it
(`Malformed`: 400, or 501 for a transfer coding it does not know). Where a
message could be read two ways it is refused rather than guessed at: both
Content-Length and Transfer-Encoding, Content-Lengths that disagree, a folded
header line, more than one Host; these are how a request is smuggled past
something that frames it differently. Why not h11, which did this before:
h11's general state machine cost ~70 µs per kept-alive request and answer,
a fifth of a relayed announce at a saturated tracker (docs/BENCHMARKS.md,
"HTTP framing without h11"). It must not hold a connection's state
(http_protocol does) nor touch sockets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])")
_FIELD_NAME = re.compile(_TOKEN)
# A value: no NUL and no whitespace but blanks (h11's rule: other controls occur
# in the wild).
_FIELD_VALUE = re.compile(rb"[^\x00\r\n\x0b\x0c]*")
# A chunk's size line less its CRLF. Only CRLF ends it: a proxy that ends it at a
# bare LF inside an extension, or at the last of several CRs, and one that does not
# would frame the body differently (a request smuggled in a chunk).
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?")
_BLANK_LINE = re.compile(rb"\n\r?\n")
_LINE = re.compile(rb"\r?\n")
MAX_CONTENT_LENGTH_DIGITS = 19
# The framing of a head: a Content-Length, or CHUNKED.
CHUNKED = -1


class Malformed(Exception):
    """A request that cannot be read: answer `status`, then close."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Head:
    method: bytes
    target: bytes
    # Names lower-cased, values as sent less surrounding blanks.
    headers: tuple[tuple[bytes, bytes], ...]
    # The body's Content-Length, or CHUNKED.
    framing: int
    # The client allows another request on the connection after the answer.
    keep_alive: bool


def head_end(data: bytes | bytearray, start: int = 0) -> int | None:
    """Where the head in `data` ends (after its blank line), or None if it has not yet;
    `start`: where to begin looking (what was searched before cannot hold it)."""
    found = _BLANK_LINE.search(data, start)
    return None if found is None else found.end()


def parse_head(raw: bytes) -> Head:
    """The head in `raw` (a request line, header lines, the blank line); Malformed if not."""
    lines = _LINE.split(raw)
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise Malformed(400, "an empty request head")
    line = _REQUEST_LINE.fullmatch(lines[0])
    if line is None:
        raise Malformed(400, "not an HTTP/1.x request line")
    method, target, major, minor = line.groups()
    headers = tuple(_field(x) for x in lines[1:])
    http_1_1 = (major, minor) >= (b"1", b"1")
    hosts = sum(1 for name, _ in headers if name == b"host")
    if hosts > 1 or (hosts == 0 and (major, minor) == (b"1", b"1")):
        raise Malformed(400, "an HTTP/1.1 request needs exactly one Host header")
    connection = b",".join(v for k, v in headers if k == b"connection").lower()
    close = b"close" in (t.strip() for t in connection.split(b","))
    return Head(method, target, headers, _framing(headers), http_1_1 and not close)


def _field(line: bytes) -> tuple[bytes, bytes]:
    if line[:1] in (b" ", b"\t"):
        raise Malformed(400, "a folded header line (obs-fold)")
    name, colon, value = line.partition(b":")
    if not colon or _FIELD_NAME.fullmatch(name) is None:
        raise Malformed(400, f"not a header field: {line[:100]!r}")
    if _FIELD_VALUE.fullmatch(value) is None:
        raise Malformed(400, f"a header value with a NUL or line break: {name[:100]!r}")
    return name.lower(), value.strip(b" \t")


def _framing(headers: tuple[tuple[bytes, bytes], ...]) -> int:
    """The body's length, CHUNKED, or Malformed: a message read one way only."""
    codings = [v for k, v in headers if k == b"transfer-encoding"]
    lengths = {n.strip() for k, v in headers if k == b"content-length" for n in v.split(b",")}
    if codings:
        if len(codings) > 1 or codings[0].lower() != b"chunked":
            raise Malformed(501, "only Transfer-Encoding: chunked is supported")
        if lengths:
            raise Malformed(400, "both Transfer-Encoding and Content-Length")
        return CHUNKED
    if not lengths:
        return 0
    if len(lengths) > 1:
        raise Malformed(400, "conflicting Content-Length headers")
    length = lengths.pop()
    if not length.isdigit() or len(length) > MAX_CONTENT_LENGTH_DIGITS:
        raise Malformed(400, "a bad Content-Length")
    return int(length)


@dataclass
class Body:
    """A request's body as it arrives, framed by its head; at most `limit` bytes."""

    framing: int
    limit: int
    content: bytearray = field(default_factory=bytearray)
    # Chunked: bytes of the current chunk still to come; -1 between chunks; None
    # once the last chunk is in and the trailer is being read.
    _left: int | None = -1

    def read(self, data: bytearray) -> bool:
        """Take what `data` holds of the body (deleting it there); True once complete."""
        if self.framing != CHUNKED:
            take = self.framing - len(self.content)
            self.content += data[:take]
            del data[:take]
            return len(self.content) == self.framing
        return self._chunks(data)

    def _chunks(self, data: bytearray) -> bool:
        while True:
            if self._left is None:  # the trailer: header lines up to a blank one
                if data[:1] == b"\n" or data[:2] == b"\r\n":
                    del data[: 1 if data[:1] == b"\n" else 2]
                    return True
                end = data.find(b"\n")
                if end < 0:
                    return self._short(data)
                _field(bytes(data[:end]).rstrip(b"\r"))
                del data[: end + 1]
            elif self._left == -1:  # a chunk's size line, ended by CRLF and nothing else
                end = data.find(b"\n")
                if end < 0:
                    return self._short(data)
                line = bytes(data[:end])
                size = _CHUNK_SIZE.fullmatch(line[:-1]) if line.endswith(b"\r") else None
                if size is None:
                    raise Malformed(400, "a bad chunk size line")
                del data[: end + 1]
                self._left = int(size.group(1), 16) or None
                if self._left is not None and len(self.content) + self._left > self.limit:
                    raise Malformed(413, f"the body exceeds {self.limit} bytes")
            else:  # the chunk's bytes, then its line break
                take = min(self._left, len(data))
                self.content += data[:take]
                del data[:take]
                self._left -= take
                if self._left:
                    return False
                if data[:2] != b"\r\n":
                    if len(data) < 2:
                        self._left = 0
                        return self._short(data, b"\r\n")
                    raise Malformed(400, "a chunk not followed by its line break")
                del data[:2]
                self._left = -1

    def _short(self, data: bytearray, expected: bytes = b"") -> bool:
        """Not enough bytes yet; a line that grew past a head's worth is refused."""
        if len(data) > 16 * 1024:
            raise Malformed(400, "a chunk line longer than 16 KiB")
        if expected and data != expected[: len(data)]:
            raise Malformed(400, "a chunk not followed by its line break")
        return False
