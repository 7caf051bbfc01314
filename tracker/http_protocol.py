"""HTTP/1.1 on the tracker's port, sans-IO: bytes in, requests out; responses to bytes.

Owns the framing of one connection — its requests read by http_parse (keep-alive,
pipelining, chunked bodies), its answers framed here (HEAD, a close when either
side ends the connection) — plus the limits that
hold before anyone is authenticated: a request head of at most MAX_HEAD_BYTES
and a body of at most `max_body_bytes` (refused with 413 as soon as a
Content-Length or the bytes so far say it is larger, so nobody makes the
tracker buffer more). `first_get` picks a complete, bodiless GET out of the
first bytes of a connection, for the listener's fast path, and
`encode_closing` frames its answer. It must not touch sockets or clocks (the
listener does both), know routes or encode error bodies (http_routes does).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import unquote_to_bytes

from p2preg.core.pki import Identity
from tracker.http_parse import Body, Head, Malformed, head_end, parse_head

# A BitTorrent client's GET fits in one segment; a control request's head is small too.
MAX_HEAD_BYTES = 16 * 1024


@dataclass(frozen=True, slots=True)
class Request:
    method: bytes
    # As sent: path and query, still percent-encoded.
    target: bytes
    # Names lower-cased, values as sent less surrounding blanks.
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    client_ip: str
    # Who the client certificate says sent it; None on a plain (token) port.
    identity: Identity | None = None

    @property
    def raw_path(self) -> bytes:
        return self.target.partition(b"?")[0]

    @property
    def path(self) -> str:
        """The path percent-decoded, as routes match it (`%3A` in a digest is `:`)."""
        return unquote_to_bytes(self.raw_path).decode("utf-8", "replace")

    @property
    def query(self) -> bytes:
        return self.target.partition(b"?")[2]

    def header(self, name: bytes) -> bytes | None:
        """The first value of header `name` (lower-case)."""
        return next((v for k, v in self.headers if k == name), None)


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain"
    headers: tuple[tuple[str, str], ...] = ()
    # End the connection after this answer, whatever the client asked for.
    close: bool = False


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request that cannot be read (malformed, too large): answer `status`, then close."""

    status: int
    reason: str


class Wait(enum.Enum):
    NEED_DATA = "need data"  # feed more bytes (or b"" at end of stream)
    CLOSED = "closed"  # the client closed between requests: close quietly


@dataclass(frozen=True, slots=True)
class BodyLimit:
    """The largest body a request may carry: `default`, or more for a target that
    starts with one of the `larger` prefixes."""

    default: int
    larger: tuple[tuple[bytes, int], ...] = ()

    def of(self, target: bytes) -> int:
        return next((n for prefix, n in self.larger if target.startswith(prefix)), self.default)


class _State(enum.Enum):
    READING = "reading"  # the next request
    ANSWERING = "answering"  # a request is complete; its answer is due
    BROKEN = "broken"  # the request could not be read; one refusal may go out
    DONE = "done"  # answered; the connection carries another request
    ENDED = "ended"  # answered; the connection closes


class HttpConnection:
    """One server-side HTTP/1.1 connection, with the tracker's limits."""

    def __init__(
        self, client_ip: str, max_body_bytes: int | BodyLimit, identity: Identity | None = None
    ) -> None:
        self.client_ip = client_ip
        self.identity = identity
        limit = max_body_bytes
        self._limit = limit if isinstance(limit, BodyLimit) else BodyLimit(limit)
        self._data = bytearray()
        # How much of `_data` was searched for a head's end: a head that arrives a
        # byte at a time is searched once, not once per byte.
        self._searched = 0
        self._closed = False  # the client has closed its side
        self._head: Head | None = None
        self._body: Body | None = None
        self._state = _State.READING
        self._keep_alive = False  # the request being answered allows another

    def receive(self, data: bytes) -> None:
        """Bytes from the client; b"" once it has closed its side."""
        if data:
            self._data += data
        else:
            self._closed = True

    @property
    def reading_body(self) -> bool:
        """The head is in: what is missing is body (which gets its own time limit)."""
        return self._head is not None

    def next_request(self) -> Request | Refusal | Wait:
        if self._state is not _State.READING:
            # A request is complete and unanswered, or the framing broke: nothing
            # more is read on this connection.
            return Wait.CLOSED
        try:
            got = self._next()
        except Malformed as e:
            self._state = _State.BROKEN
            return Refusal(e.status, e.reason)
        if isinstance(got, Request):
            self._state = _State.ANSWERING
        return got

    def _next(self) -> Request | Wait:
        if self._head is None:
            head = self._read_head()
            if head is None:
                return Wait.CLOSED if self._closed else Wait.NEED_DATA
            self._head, self._body = head, Body(head.framing, self._limit.of(head.target))
            if head.framing > self._body.limit:
                raise Malformed(413, f"the body exceeds {self._body.limit} bytes")
        head, body = self._head, self._body
        assert body is not None
        if not body.read(self._data):
            if self._closed:
                raise Malformed(400, "the client closed the connection mid-body")
            return Wait.NEED_DATA
        self._head = self._body = None
        self._keep_alive = head.keep_alive
        return Request(
            head.method, head.target, head.headers, bytes(body.content), self.client_ip,
            self.identity,
        )  # fmt: skip

    def _read_head(self) -> Head | None:
        """The next head, or None: not all of it yet (or nothing, and the client closed)."""
        # RFC 9112 2.2: empty lines before a request line are ignored.
        while self._data[:1] == b"\n" or self._data[:2] == b"\r\n":
            del self._data[: 1 if self._data[:1] == b"\n" else 2]
            self._searched = 0
        # A blank line is at most 3 bytes: it may have begun in what was searched.
        end = head_end(self._data, max(0, self._searched - 3))
        if (end or len(self._data)) > MAX_HEAD_BYTES:
            raise Malformed(431, f"a request head larger than {MAX_HEAD_BYTES} bytes")
        if end is None:
            self._searched = len(self._data)
            if self._closed and self._data:
                raise Malformed(400, "the client closed the connection mid-request")
            return None
        head = parse_head(bytes(self._data[:end]))
        del self._data[:end]
        self._searched = 0
        return head

    def respond(self, response: Response, *, head_only: bool = False) -> bytes:
        """The bytes of `response`; `head_only` for an answer to HEAD."""
        keep = self._state is _State.ANSWERING and self._keep_alive and not response.close
        self._state = _State.DONE if keep else _State.ENDED
        out = [b"HTTP/1.1 %d " % response.status, _reason(response), b"\r\n"]
        if response.status != 204:  # RFC 9110: a 204 has no content, nor a length of it
            out.append(b"Content-Type: %s\r\n" % response.content_type.encode("latin-1"))
            out.append(b"Content-Length: %d\r\n" % len(response.body))
        out += [b"%s: %s\r\n" % (k.encode("latin-1"), v.encode("latin-1"))
                for k, v in response.headers]  # fmt: skip
        if not keep:
            out.append(b"Connection: close\r\n")
        out.append(b"\r\n")
        if response.status != 204 and not head_only:
            out.append(response.body)
        return b"".join(out)

    @property
    def can_respond(self) -> bool:
        """An answer may still go out (not so once one has)."""
        return self._state in (_State.READING, _State.ANSWERING, _State.BROKEN)

    def next_cycle(self) -> bool:
        """After an answer: True to read the next request on this connection, False to close."""
        if self._state is _State.DONE:
            self._state = _State.READING
            return True
        return False


def first_get(data: bytes) -> bytes | None:
    """The target of `data` if it is exactly one complete GET without a body, else None.

    The listener's fast path answers such a request from the first `recv`,
    without a task; anything else (more bytes, a body, a partial head, another
    method) takes the full path of `HttpConnection`.
    """
    if not data.startswith(b"GET ") or head_end(data) != len(data):
        return None
    try:
        head = parse_head(data)
    except Malformed:
        return None
    return head.target if head.framing == 0 else None


def encode_closing(body: bytes, content_type: str = "text/plain") -> bytes:
    """A 200 answer that ends its connection, framed without a connection's state:
    the fast path's one shape of answer."""
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: "
        + content_type.encode()
        + b"\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\nConnection: close\r\n\r\n"
        + body
    )


def _reason(response: Response) -> bytes:
    try:
        return HTTPStatus(response.status).phrase.encode()
    except ValueError:
        return b""
