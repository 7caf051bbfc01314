"""The tracker's TCP port: one accept loop, BitTorrent GETs answered inline, the rest per task.

Why not a task per connection for everything: measured on this machine with a
new connection per request (what libtorrent does), quart-trio on hypercorn
answered about 540 requests/s and `trio.serve_tcp` with a task per connection
about 3,600/s, while accepting in a loop and answering a complete
`GET /announce` straight from the first `recv` — no task, no stream object —
reached about 13,000/s (docs/BENCHMARKS.md, with a hand-written parser; h11's
parse adds about 25 µs to the ~80 µs of an announce). So this loop accepts, reads what
has arrived, and when it is one complete GET that the app answers at once
(`fast_answer`: an announce or scrape) writes the answer and closes. Every other
connection — the control API, /healthz, /metrics, a head that came in pieces —
gets a task running `serve_connection`, the one place that speaks HTTP on a
stream, keep-alive and all, with the bytes already read. With a `TLSGate`
(mutual TLS) every connection gets a task at once: a `trio.SSLStream` with the
gate's current server context, a handshake bounded by HEAD_TIMEOUT_S, the
gate's verdict on the client certificate, then `serve_connection` with the
identity stamped on each request; a refused handshake is counted and closed,
a verified certificate of the wrong role or cluster gets one 403. The plain
path is untouched by TLS. A connection that gets a task holds a place among
those not yet past their first request (plain) or handshake (TLS), capped per
client IP and in all (tracker/quotas.py); one that finds none is closed
unanswered, so a client that opens connections and says nothing cannot take
the port from the others. This module owns sockets, streams and time limits
only: framing is http_protocol's, answers are the app's, verdicts the gate's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import math
import socket
import ssl
from collections.abc import Callable
from typing import Protocol, cast

import trio

from p2preg.core.pki import Identity
from tracker import hangups
from tracker.http_protocol import (
    MAX_HEAD_BYTES,
    BodyLimit,
    HttpConnection,
    Refusal,
    Request,
    Response,
    Wait,
    first_get,
)
from tracker.quotas import PreAuthConnections, Ticket
from tracker.tls_gate import TLSGate, handshake_refusal

log = logging.getLogger("p2preg.tracker")
# Before authentication, a client gets this long for its first request's head ...
HEAD_TIMEOUT_S = 10.0
# ... this long, idle, between keep-alive requests (hypercorn's default) ...
KEEP_ALIVE_TIMEOUT_S = 5.0
# ... or this long on a connection whose client certificate was verified: a node's
# control connection, which carries its relayed announces in batches seconds to
# tens of seconds apart (its refresh batches go every 30 s); its pool lets a
# connection go after 60 s idle, before this. An idle TLS connection costs the
# tracker one task and its buffers (docs/TRACKER.md, "Announce relay").
KEEP_ALIVE_VERIFIED_S = 90.0
# A verified connection is closed (`Connection: close` on its next answer) once it
# is this old, so the client handshakes again: a certificate shown once stays
# good no longer than this past its expiry or a CA rotation that drops its CA.
# 10,000 nodes then make 17 handshakes a second, 40 ms of a core.
MAX_VERIFIED_AGE_S = 600.0
# ... this long for a body once the head is in (Quart's BODY_TIMEOUT) ...
BODY_TIMEOUT_S = 60.0
# ... and this long to take an answer off our hands.
SEND_TIMEOUT_S = 30.0
RECEIVE_BYTES = 64 * 1024
# Connections accepted per wake-up before letting other tasks run.
ACCEPT_BATCH = 64
_ACCEPT_RETRY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
# A listener given no pre-authentication caps (tests, the metrics port) counts
# its connections against these.
UNCAPPED = 1 << 62


class HttpApp(Protocol):
    """What the listener serves (http_routes.TrackerHttp; a fake in tests)."""

    @property
    def max_body_bytes(self) -> int | BodyLimit: ...

    def fast_answer(self, target: bytes, ip: str) -> bytes | None: ...

    async def handle(self, request: Request) -> Response: ...

    def refuse(self, refusal: Refusal) -> Response: ...


async def serve_http(
    sock: socket.socket,
    app: HttpApp,
    *,
    gate: TLSGate | None = None,
    preauth: PreAuthConnections | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve on `sock` (bound and listening) until cancelled; closes it at the end.

    With `gate`, the port speaks HTTPS only and admits whom the gate admits.
    With `preauth`, a connection that needs a task holds a place in it until
    its first request is read (its TLS handshake admitted); one that finds no
    place is closed unanswered.
    """
    preauth = preauth or PreAuthConnections(UNCAPPED, UNCAPPED)
    sock.setblocking(False)
    async with trio.open_nursery() as nursery:
        task_status.started()
        try:
            while True:
                await trio.lowlevel.wait_readable(sock)
                for _ in range(ACCEPT_BATCH):
                    try:
                        conn, addr = sock.accept()
                    except BlockingIOError:
                        break
                    except OSError as e:
                        if e.errno not in _ACCEPT_RETRY_ERRNOS:
                            raise
                        await trio.sleep(0.1)  # out of descriptors: let some close
                        break
                    if gate is None:
                        _accepted(nursery, conn, addr[0], app, preauth)
                    elif (ticket := preauth.admit(addr[0])) is None:
                        conn.close()
                    else:
                        nursery.start_soon(_tls_connection, conn, addr[0], app, gate, ticket)
                await trio.lowlevel.checkpoint()
        finally:
            sock.close()


def _accepted(
    nursery: trio.Nursery,
    conn: socket.socket,
    ip: str,
    app: HttpApp,
    preauth: PreAuthConnections,
) -> None:
    """Answer a new connection from its first bytes if we can, else give it a task
    (if it finds a place among the connections not yet past their first request)."""
    conn.setblocking(False)
    try:
        data = conn.recv(MAX_HEAD_BYTES)
    except BlockingIOError:
        data = b""
    except OSError:
        conn.close()
        return
    target = first_get(data) if data else None
    response = None if target is None else app.fast_answer(target, ip)
    if response is None:
        ticket = preauth.admit(ip)
        if ticket is None:
            conn.close()
        else:
            nursery.start_soon(_connection, conn, ip, data, app, ticket)
        return
    try:
        sent = conn.send(response)
    except OSError:
        conn.close()
        return
    if sent == len(response):
        conn.close()
    else:
        nursery.start_soon(_finish, conn, response[sent:])


async def _finish(conn: socket.socket, rest: bytes) -> None:
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(conn))
    with trio.move_on_after(SEND_TIMEOUT_S), contextlib.suppress(*_GONE):
        await stream.send_all(rest)
    await stream.aclose()


async def _connection(
    conn: socket.socket, ip: str, data: bytes, app: HttpApp, ticket: Ticket
) -> None:
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(conn))
    try:
        http = HttpConnection(ip, app.max_body_bytes)
        await serve_connection(stream, http, app, data, first_request=ticket.release)
    except _GONE:
        pass
    except Exception:
        # One connection's failure must not end the accept loop's nursery.
        log.exception("a connection from %s failed; the listener goes on", ip)
    finally:
        ticket.release()
        await stream.aclose()


async def _tls_connection(
    conn: socket.socket, ip: str, app: HttpApp, gate: TLSGate, ticket: Ticket
) -> None:
    conn.setblocking(False)
    transport = trio.SocketStream(trio.socket.from_stdlib_socket(conn))
    # https_compatible: HTTP clients (libtorrent, httpx) close without close_notify.
    stream = trio.SSLStream(
        transport, gate.server_context(), server_side=True, https_compatible=True
    )
    try:
        identity, refusal = await _handshake(stream, gate)
        ticket.release()
        if refusal is not None:
            gate.refused(*refusal, ip)
        if identity is not None:
            http = HttpConnection(ip, app.max_body_bytes, identity)
            await serve_connection(stream, http, app, keep_alive_s=KEEP_ALIVE_VERIFIED_S,
                                   max_age_s=MAX_VERIFIED_AGE_S)  # fmt: skip
        elif refusal is not None and refusal[0] in ("wrong_cluster", "wrong_role"):
            # A good certificate used in the wrong place: say so once, in HTTP.
            forbidden = _Forbidden(app, refusal[1])
            await serve_connection(stream, HttpConnection(ip, app.max_body_bytes), forbidden)
    except _GONE:
        pass
    except Exception:
        log.exception("a TLS connection from %s failed; the listener goes on", ip)
    finally:
        ticket.release()
        await transport.aclose()  # no close_notify to wait for: see https_compatible


async def _handshake(
    stream: trio.SSLStream[trio.SocketStream], gate: TLSGate
) -> tuple[Identity | None, tuple[str, str] | None]:
    """The admitted identity, or the refusal (reason, detail) of this connection."""
    with trio.move_on_after(HEAD_TIMEOUT_S):
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as e:
            return None, handshake_refusal(e.__cause__)
        # trio's SSLStream forwards getpeercert to its SSLObject.
        return gate.admit(cast(ssl.SSLObject, stream))
    return None, ("handshake_timeout", f"no handshake within {HEAD_TIMEOUT_S:g} s")


class _Forbidden:
    """Answers every request of a connection with the app's 403 (then closes)."""

    def __init__(self, app: HttpApp, message: str) -> None:
        self._app = app
        self._message = message
        self.max_body_bytes = app.max_body_bytes

    def fast_answer(self, target: bytes, ip: str) -> bytes | None:
        return None

    async def handle(self, request: Request) -> Response:
        return self._app.refuse(Refusal(403, self._message))

    def refuse(self, refusal: Refusal) -> Response:
        return self._app.refuse(refusal)


async def serve_connection(
    stream: trio.abc.Stream,
    http: HttpConnection,
    app: HttpApp,
    data: bytes = b"",
    *,
    first_request: Callable[[], None] = lambda: None,
    keep_alive_s: float = KEEP_ALIVE_TIMEOUT_S,
    max_age_s: float = math.inf,
) -> None:
    """Speak HTTP/1.1 on `stream` until either side is done; `data` was read already.

    `first_request` is called once the first request has been read whole; the
    connection waits `keep_alive_s` for each next one, and its first answer
    after `max_age_s` closes it.
    """
    close_at = trio.current_time() + max_age_s
    if data:
        http.receive(data)
    idle_s = HEAD_TIMEOUT_S
    while True:
        request = await _read_request(stream, http, idle_s)
        if request is None:
            return
        first_request()
        if isinstance(request, Refusal):
            if http.can_respond:
                await _send(stream, http.respond(app.refuse(request)))
            return
        response = await _answer_while_connected(stream, http, app, request)
        if response is None:
            return  # the client left: nobody to answer
        head_only = request.method == b"HEAD"
        if trio.current_time() >= close_at:
            response = dataclasses.replace(response, close=True)
        if not await _send(stream, http.respond(response, head_only=head_only)):
            return
        if not http.next_cycle():
            return
        idle_s = keep_alive_s


async def _read_request(
    stream: trio.abc.Stream, http: HttpConnection, head_timeout_s: float
) -> Request | Refusal | None:
    """The next request, a refusal to answer, or None: closed or out of time."""
    deadline = trio.current_time() + head_timeout_s
    body_clock_started = False
    while True:
        got = http.next_request()
        if got is Wait.CLOSED:
            return None
        if not isinstance(got, Wait):
            return got
        if http.reading_body and not body_clock_started:
            deadline, body_clock_started = trio.current_time() + BODY_TIMEOUT_S, True
        chunk = None
        with trio.move_on_at(deadline):
            chunk = await stream.receive_some(RECEIVE_BYTES)
        if chunk is None:
            return None  # too slow before we know who it is: hang up without a word
        http.receive(bytes(chunk))


async def _answer_while_connected(
    stream: trio.abc.Stream, http: HttpConnection, app: HttpApp, request: Request
) -> Response | None:
    """`app.handle(request)`, or None if it waited for news and the client hung up
    meanwhile (tracker/hangups.py: a long poll's waiter must not hold a place in a
    queue for a node that is gone)."""
    response: Response | None = None
    single: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            watch = _ClientWatch(stream, http, nursery)
            with hangups.watched(watch.start):
                response = await app.handle(request)
            nursery.cancel_scope.cancel()  # the watch, if the request waited
    except BaseExceptionGroup as group:
        if len(group.exceptions) != 1:
            raise
        single = group.exceptions[0]
    if single is not None:
        # One failure (the client gone, say) comes out as itself, as it would without
        # the nursery, for the caller's `except`.
        raise single
    return None if watch.gone else response


class _ClientWatch:
    """Reads the connection, once started, until the request is answered; the end of
    the stream cancels the request (`nursery`).

    The read is cancelled when the answer is ready: safe on a SocketStream, and
    on an SSLStream once its handshake is done (a whole request has been read
    by then).
    """

    def __init__(self, stream: trio.abc.Stream, http: HttpConnection, nursery: trio.Nursery):
        self.gone = False
        self._stream = stream
        self._http = http
        self._nursery = nursery
        self._started = False

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._nursery.start_soon(self._watch)

    async def _watch(self) -> None:
        # Bytes that arrive meanwhile are the next pipelined request: keep them,
        # up to one head's worth; past that, stop reading and let TCP push back.
        read = 0
        while read <= MAX_HEAD_BYTES:
            try:
                chunk = await self._stream.receive_some(RECEIVE_BYTES)
            except _GONE:
                chunk = b""
            if not chunk:
                self.gone = True
                self._nursery.cancel_scope.cancel()
                return
            read += len(chunk)
            self._http.receive(bytes(chunk))
        await trio.sleep_forever()


async def _send(stream: trio.abc.Stream, data: bytes) -> bool:
    """Send `data`; False when the client is gone or does not read it in time."""
    with trio.move_on_after(SEND_TIMEOUT_S):
        try:
            await stream.send_all(data)
        except _GONE:
            return False
        return True
    return False
