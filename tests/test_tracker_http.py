"""The tracker's HTTP side without sockets: framing, the route table, one connection's life.

`HttpConnection` and `first_get` (tracker/http_protocol.py) get bytes and give
requests; `TrackerHttp` (tracker/http_routes.py) answers them over a coordinator
on a MemoryStore; `serve_connection` (tracker/http_listener.py) runs over a trio
memory stream pair with a fake app, so its time limits run on the autojumping
MockClock.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import libtorrent as lt
import pytest
import trio
import trio.testing

from p2preg.core import wire
from p2preg.core.digest import Digest
from tests.tracker_helpers import make_tracker
from tracker import hangups
from tracker.http_listener import HEAD_TIMEOUT_S, KEEP_ALIVE_TIMEOUT_S, serve_connection
from tracker.http_protocol import (
    HttpConnection,
    Refusal,
    Request,
    Response,
    Wait,
    first_get,
)
from tracker.http_routes import ROUTES, TrackerHttp, match

TOKEN = "t0ken"
DIGEST = str(Digest.of(b"some blob"))


def get(target: bytes, *extra: bytes) -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\nHost: t\r\n" + b"".join(extra) + b"\r\n"


# -- framing -------------------------------------------------------------------------


def test_pipelined_keep_alive_requests_come_out_one_cycle_at_a_time() -> None:
    conn = HttpConnection("10.0.0.1", max_body_bytes=100)
    body = b"PUT /x HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc"
    conn.receive(get(b"/healthz?a=b") + body)
    first = conn.next_request()
    assert isinstance(first, Request)
    assert (first.method, first.path, first.query, first.client_ip) == (
        b"GET",
        "/healthz",
        b"a=b",
        "10.0.0.1",
    )
    out = conn.respond(Response(200, b"ok\n"))
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and out.endswith(b"\r\n\r\nok\n")
    assert conn.next_cycle()
    second = conn.next_request()
    assert isinstance(second, Request) and (second.method, second.body) == (b"PUT", b"abc")
    assert conn.respond(Response(204)) == b"HTTP/1.1 204 No Content\r\n\r\n"
    assert conn.next_cycle()
    assert conn.next_request() is Wait.NEED_DATA
    conn.receive(b"")
    assert conn.next_request() is Wait.CLOSED


def test_bodies_over_the_limit_are_refused_before_they_are_read() -> None:
    declared = HttpConnection("h", max_body_bytes=10)
    declared.receive(b"PUT /x HTTP/1.1\r\nHost: t\r\nContent-Length: 11\r\n\r\n")
    assert declared.next_request() == Refusal(413, "the body exceeds 10 bytes")
    chunked = HttpConnection("h", max_body_bytes=10)
    chunked.receive(b"PUT /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunked.receive(b"8\r\n12345678\r\n")
    assert chunked.next_request() is Wait.NEED_DATA
    chunked.receive(b"8\r\n12345678\r\n")
    assert isinstance(chunked.next_request(), Refusal)
    out = chunked.respond(Response(413, b"no", close=True))
    assert b"Connection: close" in out and not chunked.next_cycle()


@pytest.mark.parametrize(
    "raw,status",
    [
        (b"\x16\x03\x01 hello?\r\n\r\n", 400),
        (b"GET /announce HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
        (b"GET /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        (b"GET /x HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nab", None),
    ],
)
def test_malformed_requests_get_the_status_owed(raw: bytes, status: int | None) -> None:
    conn = HttpConnection("h", max_body_bytes=100)
    conn.receive(raw)
    if status is None:  # a body cut short: more may come, or the client hangs up
        assert conn.next_request() is Wait.NEED_DATA
        conn.receive(b"")
        status = 400
    refusal = conn.next_request()
    assert isinstance(refusal, Refusal) and refusal.status == status
    assert conn.can_respond


def test_a_head_answer_has_a_length_but_no_body() -> None:
    conn = HttpConnection("h", max_body_bytes=0)
    conn.receive(b"HEAD /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
    assert isinstance(conn.next_request(), Request)
    out = conn.respond(Response(200, b"ok\n"), head_only=True)
    assert b"Content-Length: 3\r\n" in out and out.endswith(b"\r\n\r\n")


def test_first_get_takes_exactly_one_complete_bodiless_get() -> None:
    assert first_get(get(b"/announce?x=1")) == b"/announce?x=1"
    assert first_get(get(b"/announce", b"Connection: close\r\n")) == b"/announce"
    assert first_get(get(b"/announce")[:-2]) is None  # head not complete yet
    assert first_get(get(b"/announce") + get(b"/scrape")) is None  # pipelined
    assert first_get(get(b"/announce", b"Content-Length: 2\r\n") + b"hi") is None
    assert first_get(b"POST /announce HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n") is None
    assert first_get(b"\x16\x03\x01 hello?\r\n\r\n") is None


# -- routes ----------------------------------------------------------------------------


def test_the_route_table_matches_paths_and_names_the_digest() -> None:
    def routes(path: str) -> list[tuple[str, str, str]]:
        return [(r.method.decode(), r.handler.__name__, d) for r, d in match(path)]

    assert routes(f"/v1/metainfo/{DIGEST}") == [
        ("GET", "_lookup", DIGEST),
        ("PUT", "_publish", DIGEST),
    ]
    assert routes(f"/v1/leases/{DIGEST}/release") == [("POST", "_release", DIGEST)]
    assert routes("/v1/metainfo/") == [] and routes("/nope") == []
    assert routes("http://t/announce") == []
    # Open without the bearer token: health, readiness, metrics, and BitTorrent (its
    # token is in the query).
    assert {"/".join(r.path) for r in ROUTES if not r.bearer} == {
        "healthz",
        "readyz",
        "metrics",
        "announce",
        "scrape",
    }


def app(tmp_path: Path) -> TrackerHttp:
    return TrackerHttp(make_tracker(tmp_path, token=TOKEN))


async def test_a_lease_request_whose_client_hangs_up_leaves_its_long_poll(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The real desk over a connection: a request told to wait holds its long-poll
    slot, and the client's hang-up ends the wait (the holder's grant is not yet
    0.5 s old, so nothing else would)."""
    tracker = make_tracker(tmp_path, token=TOKEN)
    http = TrackerHttp(tracker)
    holder = await http.handle(request(b"POST", f"/v1/leases/{DIGEST}", ask("n1", 0)))
    assert wire.decode(wire.LeaseReply, holder.body).status is wire.LeaseStatus.GRANTED
    client, server = trio.testing.memory_stream_pair()
    held: list[bool] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_connection, server, HttpConnection("h", 1 << 16), http)
        body = ask("n2", 30)
        await client.send_all(
            f"POST /v1/leases/{DIGEST} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}"
            f"\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
        )
        await trio.sleep(0.1)
        held.append(tracker.quotas.long_polls.held("n2") == 1)
        await client.aclose()
        await trio.sleep(0.1)
        held.append(tracker.quotas.long_polls.held("n2") == 1)
    assert held == [True, False]


def ask(node: str, wait_s: int) -> bytes:
    return wire.encode(wire.LeaseRequest(node, 10, wait_s=wait_s))


def request(method: bytes, target: str, body: bytes = b"", token: str | None = TOKEN) -> Request:
    headers = [] if token is None else [(b"authorization", f"Bearer {token}".encode())]
    return Request(method, target.encode(), tuple(headers), body, "10.0.0.7")


async def test_control_answers_and_their_errors(tmp_path: Path) -> None:
    http = app(tmp_path)
    lease = wire.encode(wire.LeaseRequest("n1", 10))
    missing = await http.handle(request(b"GET", f"/v1/metainfo/{DIGEST}"))
    assert missing.status == 404
    assert wire.decode(wire.ErrorReply, missing.body).error == "not_found"
    unauthorized = await http.handle(request(b"POST", f"/v1/leases/{DIGEST}", lease, None))
    assert unauthorized.status == 401
    # The digest arrives percent-encoded; the route sees it decoded.
    quoted = DIGEST.replace(":", "%3A")
    granted = await http.handle(request(b"POST", f"/v1/leases/{quoted}", lease))
    reply = wire.decode(wire.LeaseReply, granted.body)
    assert granted.status == 200 and reply.status is wire.LeaseStatus.GRANTED
    wrong = await http.handle(request(b"DELETE", f"/v1/leases/{DIGEST}"))
    assert wrong.status == 405 and ("Allow", "POST, PUT") in wrong.headers
    garbage = await http.handle(request(b"PUT", f"/v1/leases/{DIGEST}", b"\xc1"))
    assert garbage.status == 400
    assert wire.decode(wire.ErrorReply, garbage.body).error == "invalid_request"
    bad_limit = await http.handle(request(b"GET", "/v1/status?limit=%C2%B2"))
    assert bad_limit.status == 400
    status = await http.handle(request(b"GET", "/v1/status?limit=3"))
    assert json.loads(status.body)["leases"] == 1
    health = await http.handle(request(b"HEAD", "/healthz", token=None))
    assert (health.status, health.body) == (200, b"ok\n")
    refused = http.refuse(Refusal(413, "too big"))
    assert refused.close and wire.decode(wire.ErrorReply, refused.body).error == "too_large"


async def test_bittorrent_answers_are_bencoded_200s_that_close(tmp_path: Path) -> None:
    http = app(tmp_path)
    answer = await http.handle(request(b"GET", "/announce?info_hash=short", token=None))
    assert answer.status == 200 and answer.close
    assert b"info_hash" in lt.bdecode(answer.body)[b"failure reason"]
    fast = http.fast_answer(b"/scrape?token=" + TOKEN.encode(), "10.0.0.7")
    assert fast is not None and fast.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Connection: close\r\n" in fast and b"at least one info_hash" in fast
    assert http.fast_answer(b"/healthz", "10.0.0.7") is None


# -- one connection over a memory stream -----------------------------------------------


class FakeApp:
    """Answers every request with its path; /wait waits for news (its client watched,
    tracker/hangups.py) until cancelled, /sleep answers after 3 s without waiting
    for news."""

    max_body_bytes = 1024

    def __init__(self) -> None:
        self.cancelled = 0
        self.slept = 0

    def fast_answer(self, target: bytes, ip: str) -> bytes | None:
        return None

    async def handle(self, request: Request) -> Response:
        if request.path == "/sleep":
            await trio.sleep(3)
            self.slept += 1
        if request.path == "/gone":
            raise trio.ClosedResourceError("the answer's channel closed")
        if request.path == "/wait":
            hangups.watch_client()
            try:
                await trio.sleep_forever()
            except trio.Cancelled:
                self.cancelled += 1
                raise
        return Response(200, request.path.encode())

    def refuse(self, refusal: Refusal) -> Response:
        return Response(refusal.status, refusal.reason.encode(), close=True)


async def read_all(stream: trio.abc.Stream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data


async def run_connection(
    app: FakeApp, client_does: Callable[[trio.abc.Stream], Awaitable[None]]
) -> float:
    """Serve one connection while `client_does(stream)` runs; how long it stayed open."""
    client, server = trio.testing.memory_stream_pair()
    start = trio.current_time()
    async with trio.open_nursery() as nursery:

        async def serve() -> None:
            await serve_connection(server, HttpConnection("h", app.max_body_bytes), app)
            await server.aclose()

        nursery.start_soon(serve)
        await client_does(client)
    return trio.current_time() - start


async def test_keep_alive_then_idle_timeout(autojump_clock: trio.testing.MockClock) -> None:
    got: list[bytes] = []

    async def client(stream: trio.abc.Stream) -> None:
        await stream.send_all(get(b"/one") + get(b"/two"))
        got.append(await read_all(stream))

    open_for = await run_connection(FakeApp(), client)
    assert got[0].count(b"HTTP/1.1 200 OK") == 2 and got[0].endswith(b"/two")
    assert open_for == pytest.approx(KEEP_ALIVE_TIMEOUT_S)


async def test_a_silent_client_is_dropped_without_an_answer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    got: list[bytes] = []

    async def client(stream: trio.abc.Stream) -> None:
        await stream.send_all(b"GET /slow HTTP/1.1\r\n")
        got.append(await read_all(stream))

    assert await run_connection(FakeApp(), client) == pytest.approx(HEAD_TIMEOUT_S)
    assert got == [b""]


async def test_a_client_that_hangs_up_cancels_its_long_poll(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = FakeApp()

    async def client(stream: trio.abc.Stream) -> None:
        await stream.send_all(get(b"/wait"))
        await trio.sleep(3)
        await stream.aclose()

    await run_connection(app, client)
    assert app.cancelled == 1


async def test_a_request_answered_at_once_is_not_watched_for_a_hang_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = FakeApp()

    async def client(stream: trio.abc.Stream) -> None:
        await stream.send_all(get(b"/sleep"))
        await trio.sleep(1)
        await stream.aclose()

    await run_connection(app, client)
    assert (app.slept, app.cancelled) == (1, 0)


async def test_a_malformed_request_gets_its_refusal_and_the_connection_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    got: list[bytes] = []

    async def client(stream: trio.abc.Stream) -> None:
        await stream.send_all(b"GET /x HTTP/1.1\r\nHost: t\r\nContent-Length: 4096\r\n\r\n")
        got.append(await read_all(stream))

    assert await run_connection(FakeApp(), client) == 0
    assert got[0].startswith(b"HTTP/1.1 413 ") and b"Connection: close" in got[0]


async def test_a_failure_while_answering_comes_out_as_itself() -> None:
    """Not wrapped in an exception group by the request's nursery: the listener's
    `except` for a client or channel gone still matches it."""
    client, server = trio.testing.memory_stream_pair()
    await client.send_all(get(b"/gone"))
    with pytest.raises(trio.ClosedResourceError):
        await serve_connection(server, HttpConnection("h", 1024), FakeApp())
