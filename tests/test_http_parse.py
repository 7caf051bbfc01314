"""The tracker's HTTP/1.1 request grammar (tracker/http_parse.py) through a connection.

What a message that could be read two ways gets (a refusal, never a guess),
bodies in both framings however their bytes are split, and which connections
carry another request.
"""

from __future__ import annotations

import pytest

from tracker.http_protocol import HttpConnection, Refusal, Request, Response, Wait

CHUNKED = b"PUT /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"


def read(raw: bytes, limit: int = 1000) -> tuple[HttpConnection, Request | Refusal | Wait]:
    conn = HttpConnection("h", max_body_bytes=limit)
    conn.receive(raw)
    return conn, conn.next_request()


@pytest.mark.parametrize(
    "raw,status",
    [
        # Smuggling shapes: framed two ways, or by a coding we do not know.
        (b"PUT /x HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nTransfer-Encoding: chunked"
         b"\r\n\r\n", 400),
        (b"PUT /x HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", 400),
        (b"PUT /x HTTP/1.1\r\nHost: t\r\nContent-Length: 3, 4\r\n\r\n", 400),
        (b"PUT /x HTTP/1.1\r\nHost: t\r\nContent-Length: +3\r\n\r\n", 400),
        (b"PUT /x HTTP/1.1\r\nHost: t\r\nContent-Length: " + b"9" * 20 + b"\r\n\r\n", 400),
        (b"PUT /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
         b"Transfer-Encoding: chunked\r\n\r\n", 501),
        (b"PUT /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
        (b"GET /x HTTP/1.1\r\nHost: t\r\nX-A: 1\r\n  folded\r\n\r\n", 400),
        (b"GET /x HTTP/1.1\r\nHost: t\r\nX-A : 1\r\n\r\n", 400),
        (b"GET /x HTTP/1.1\r\nHost: t\r\nX-A: a\x00b\r\n\r\n", 400),
        (b"GET /x HTTP/1.1\r\nHost: t\r\nHost: u\r\n\r\n", 400),
        (b"GET /x HTTP/1.1\r\nHost: t\r\nno colon\r\n\r\n", 400),
        (b"GET /a b HTTP/1.1\r\nHost: t\r\n\r\n", 400),
        (b"GET /x HTTP/1.1 \r\nHost: t\r\n\r\n", 400),
        (b"G(T /x HTTP/1.1\r\nHost: t\r\n\r\n", 400),
        (b"GET /x HTTP/1.1\r\nHost: t\r\nX: " + b"a" * (16 * 1024) + b"\r\n\r\n", 431),
    ],
)
def test_what_could_be_read_two_ways_is_refused(raw: bytes, status: int) -> None:
    conn, got = read(raw)
    assert isinstance(got, Refusal) and got.status == status, got
    assert conn.can_respond and conn.next_request() is Wait.CLOSED
    out = conn.respond(Response(status, b"no", close=True))
    assert b"Connection: close\r\n" in out and not conn.next_cycle()


def test_a_head_that_never_ends_is_refused_once_past_the_limit() -> None:
    _, got = read(b"GET /x HTTP/1.1\r\nHost: t\r\n" + b"X: y\r\n" * 3000)
    assert isinstance(got, Refusal) and got.status == 431


def test_a_chunked_body_with_extensions_and_a_trailer_arrives_whole_however_split() -> None:
    raw = CHUNKED + b"3;name=v\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nX-Sum: 1\r\n\r\n"
    raw += b"GET /next HTTP/1.1\r\nHost: t\r\n\r\n"
    for cut in range(len(raw) + 1):
        conn = HttpConnection("h", max_body_bytes=100)
        got: list[Request] = []
        for part in (raw[:cut], raw[cut:]):
            conn.receive(part)
            request = conn.next_request()
            if isinstance(request, Request):
                got.append(request)
        assert [r.body for r in got] == [b"abc0123456789abcdef"], cut
        conn.respond(Response(200))
        assert conn.next_cycle()
        following = conn.next_request()
        assert isinstance(following, Request) and following.path == "/next", cut


@pytest.mark.parametrize(
    "chunks",
    [
        b"3\r\nabcX\r\n",
        b"z\r\n",
        b"-1\r\n",
        b"3\r\nabc\r\n0\r\nbad trailer\r\n\r\n",
        # Size lines ended otherwise than by one CRLF: framed differently by a proxy
        # that ends them only at CRLF (a request smuggled inside the chunk).
        b"5\nhello\r\n0\r\n\r\n",
        b"2;\nxx\r\n0\r\n\r\n",
        b"5\r\r\nhello\r\n0\r\n\r\n",
        b"0\n\r\n",
    ],
)
def test_a_chunked_body_out_of_shape_is_refused(chunks: bytes) -> None:
    _, got = read(CHUNKED + chunks)
    assert isinstance(got, Refusal) and got.status == 400


def test_bytes_past_a_content_length_are_the_next_request() -> None:
    put = b"PUT /x HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi"
    conn, got = read(put + b"GET /y HTTP/1.1\r\n")
    assert isinstance(got, Request) and got.body == b"hi"
    conn.respond(Response(200))
    assert conn.next_cycle() and conn.next_request() is Wait.NEED_DATA
    conn.receive(b"Host: t\r\n\r\n")
    following = conn.next_request()
    assert isinstance(following, Request) and following.path == "/y"


@pytest.mark.parametrize(
    "raw,another",
    [
        (b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n", True),
        (b"\r\n\r\nGET /x HTTP/1.1\r\nHost: t\r\n\r\n", True),  # RFC 9112 2.2
        (b"GET /x HTTP/1.1\nHost: t\n\n", True),  # bare line feeds
        (b"GET /x HTTP/1.1\r\nHost: t\r\nConnection: Keep-Alive, CLOSE\r\n\r\n", False),
        (b"GET /x HTTP/1.0\r\n\r\n", False),  # 1.0: no Host needed, no keep-alive
    ],
)
def test_which_connections_carry_another_request(raw: bytes, another: bool) -> None:
    conn, got = read(raw)
    assert isinstance(got, Request) and got.path == "/x"
    out = conn.respond(Response(200, b"ok"))
    assert (b"Connection: close\r\n" not in out) == another == conn.next_cycle()


def test_header_names_are_lower_cased_and_values_trimmed() -> None:
    _, got = read(b"GET /x HTTP/1.1\r\nHOST: t\r\nX-Token:\t abc \r\n\r\n")
    assert isinstance(got, Request) and got.header(b"x-token") == b"abc"


def test_an_answer_has_its_reason_length_and_headers() -> None:
    conn, _ = read(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n")
    out = conn.respond(Response(405, b"no", "text/plain", headers=(("Allow", "GET"),)))
    assert out == (
        b"HTTP/1.1 405 Method Not Allowed\r\nContent-Type: text/plain\r\n"
        b"Content-Length: 2\r\nAllow: GET\r\n\r\nno"
    )


def test_a_head_that_comes_a_byte_at_a_time_is_read_once_whole() -> None:
    raw = b"GET /x HTTP/1.1\r\nHost: t\r\nX-A: " + b"a" * 2000 + b"\r\n\r\nGET /y HTTP/1.1\r\n"
    conn = HttpConnection("h", max_body_bytes=0)
    got: list[Request | Refusal | Wait] = []
    for i in range(len(raw)):
        conn.receive(raw[i : i + 1])
        got.append(conn.next_request())
    requests = [r for r in got if isinstance(r, Request)]
    assert [r.path for r in requests] == ["/x"] and requests[0].header(b"x-a") == b"a" * 2000
    assert got.index(requests[0]) == raw.index(b"\r\n\r\n") + 3
