"""The running tracker: control API app, listeners, and `serve_tracker`.

Owns the wiring and the one place where errors become bytes for each audience:
BitTorrent clients get a bencoded (HTTP) or BEP 15 (UDP) failure — HTTP 200,
as they expect — and control API clients get a msgpack `ErrorReply` with the
error's 4xx status (5xx only for our own faults). Control routes, /healthz and
/metrics are a quart-trio app served by hypercorn; announces and scrapes take
the fast path in http_listener (and the app answers them too, for connections
hypercorn already owns). This module must not hold tracker logic (coordinator.py)
or parse protocols (announce.py, udp.py, p2preg.core.wire).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, cast

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import wrap_app
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from p2preg.core import errors, wire
from p2preg.core.config import ConfigError, HostPort
from p2preg.node import hypercorn_guard
from tracker import udp
from tracker.announce import (
    ANNOUNCE_PATH,
    SCRAPE_PATH,
    ScrapeRequest,
    SwarmStats,
    encode_announce,
    encode_failure,
    encode_scrape,
    parse_announce,
    parse_scrape,
    split_target,
)
from tracker.config import TrackerConfig
from tracker.coordinator import Tracker
from tracker.http_listener import HandOff, http_response, serve_http
from tracker.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from tracker.state import open_sqlite_store
from tracker.udp_listener import serve_udp

log = logging.getLogger("p2preg.tracker")
UDP_KEY_FILE = "udp-connection-id.key"
_BIND_ATTEMPTS = 20
# `GET /v1/status?limit=`: how many swarms it lists by default and at most.
STATUS_DEFAULT_LIMIT = 50
STATUS_MAX_LIMIT = 1000


# -- BitTorrent answers (shared by the fast path, the app and UDP) ------------------


def bittorrent_body(tracker: Tracker, target: bytes, ip: str) -> bytes | None:
    """Bencoded answer to an announce or scrape target; None for other paths."""
    path, query = split_target(target)
    if path == ANNOUNCE_PATH:
        try:
            return encode_announce(tracker.announce(parse_announce(query), ip, "http"))
        except errors.TrackerError as e:
            tracker.metrics.failure("http", e.code).inc()
            return encode_failure(str(e))
    if path == SCRAPE_PATH:
        try:
            req = parse_scrape(query, tracker.config.max_scrape_hashes)
            stats = tracker.scrape(req, "http")
            return encode_scrape([(ih, s) for ih, s in stats if s is not None])
        except errors.TrackerError as e:
            tracker.metrics.failure("http", e.code).inc()
            return encode_failure(str(e))
    return None


def http_answer(tracker: Tracker) -> Callable[[bytes, str], bytes | None]:
    def answer(target: bytes, ip: str) -> bytes | None:
        body = bittorrent_body(tracker, target, ip)
        return None if body is None else http_response(body)

    return answer


def udp_answer(
    tracker: Tracker, ids: udp.ConnectionIds, wall_clock: Callable[[], float] = time.time
) -> Callable[[bytes, tuple[str, int]], bytes | None]:
    def answer(packet: bytes, addr: tuple[str, int]) -> bytes | None:
        host = addr[0]
        tid = udp.transaction_id(packet)
        if tid is None:
            return None  # too short to address a reply
        try:
            req = udp.parse_request(packet)
            now = wall_clock()
            if isinstance(req, udp.Connect):
                return udp.encode_connect(tid, ids.issue(host, now))
            if not ids.valid(req.connection_id, host, now):
                raise errors.InvalidRequest("unknown or expired connection id")
            if isinstance(req, udp.Announce):
                response = tracker.announce(req.request, host, "udp")
                ipv6 = ":" in host and not host.startswith("::ffff:")
                return udp.encode_announce(tid, response, ipv6=ipv6)
            stats = tracker.scrape(ScrapeRequest(req.info_hashes, None), "udp")
            zero = SwarmStats(0, 0, 0)
            return udp.encode_scrape(tid, [s or zero for _, s in stats])
        except errors.TrackerError as e:
            tracker.metrics.failure("udp", e.code).inc()
            return udp.encode_error(tid, str(e))

    return answer


# -- control API --------------------------------------------------------------------


def _msgpack(message: wire.Message, status: int = 200) -> Response:
    return Response(wire.encode(message), status=status, content_type=wire.CONTENT_TYPE)


def create_app(tracker: Tracker) -> QuartTrio:
    app = QuartTrio("p2preg.tracker")
    # The largest body is a metainfo upload: the metainfo plus a little framing.
    app.config["MAX_CONTENT_LENGTH"] = tracker.config.max_metainfo_bytes + 64 * 1024

    async def body(cls: type[wire.M]) -> wire.M:
        tracker.check_token(_bearer())
        data = await request.get_data(as_text=False, parse_form_data=False)
        return wire.decode(cls, cast(bytes, data))

    @app.errorhandler(errors.TrackerError)
    async def tracker_error(e: errors.TrackerError) -> Response:
        return _msgpack(wire.ErrorReply(e.code, str(e)), e.status)

    @app.errorhandler(wire.WireError)
    async def wire_error(e: wire.WireError) -> Response:
        return _msgpack(wire.ErrorReply(errors.InvalidRequest.code, str(e)), 400)

    @app.errorhandler(HTTPException)
    async def http_error(e: HTTPException) -> Response:
        code = {404: "not_found", 413: "too_large", 405: "method_not_allowed"}.get(
            e.code or 500, "invalid_request"
        )
        return _msgpack(wire.ErrorReply(code, e.description or e.name), e.code or 500)

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response("ok\n", content_type="text/plain")

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(tracker.metrics.render(), content_type=METRICS_CONTENT_TYPE)

    @app.get("/v1/status")
    async def status() -> Response:
        # It lists blob digests: like a full scrape, nobody's business but the cluster's.
        tracker.check_token(_bearer())
        text = request.args.get("limit", str(STATUS_DEFAULT_LIMIT))
        if not (text.isascii() and text.isdigit()) or len(text) > 6:  # int() refuses "²"
            raise errors.InvalidRequest(f"limit must be a number, got {text[:20]!r}")
        doc = dataclasses.asdict(tracker.status(min(int(text), STATUS_MAX_LIMIT)))
        return Response(json.dumps(doc), content_type="application/json")

    @app.get(ANNOUNCE_PATH.decode())
    @app.get(SCRAPE_PATH.decode())
    async def bittorrent() -> Response:
        target = request.path.encode() + b"?" + request.query_string
        answer = bittorrent_body(tracker, target, request.remote_addr or "")
        return Response(answer or b"", content_type="text/plain")

    @app.get("/v1/metainfo/<digest>")
    async def lookup(digest: str) -> Response:
        tracker.check_token(_bearer())
        return _msgpack(tracker.lookup(digest))

    @app.put("/v1/metainfo/<digest>")
    async def publish(digest: str) -> Response:
        record, created = await tracker.publish(digest, await body(wire.PublishMetainfo))
        return _msgpack(record, 201 if created else 200)

    @app.post("/v1/metainfo/<digest>/bad")
    async def report_bad(digest: str) -> Response:
        return _msgpack(await tracker.report_bad(digest, await body(wire.ReportBad)))

    @app.post("/v1/leases/<digest>")
    async def acquire(digest: str) -> Response:
        return _msgpack(await tracker.acquire_lease(digest, await body(wire.LeaseRequest)))

    @app.put("/v1/leases/<digest>")
    async def renew(digest: str) -> Response:
        return _msgpack(await tracker.renew_lease(digest, await body(wire.LeaseRenew)))

    @app.post("/v1/leases/<digest>/release")
    async def release(digest: str) -> Response:
        await tracker.release_lease(digest, await body(wire.LeaseRelease))
        return Response(b"", status=204)

    return app


def _bearer() -> bytes | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip().encode() if scheme.lower() == "bearer" and token else None


# -- sockets and hypercorn ------------------------------------------------------------


def bind_sockets(listen: HostPort, *, with_udp: bool) -> tuple[socket.socket, socket.socket | None]:
    """A listening TCP socket and, if asked, a UDP socket on the same port number."""
    try:
        info = socket.getaddrinfo(
            listen.host, listen.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as e:
        raise ConfigError(f"cannot resolve listen address {listen}: {e}") from None
    family, _, _, _, address = info
    for _ in range(_BIND_ATTEMPTS):
        tcp = socket.socket(family, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            tcp.bind(address)
            tcp.listen(1024)
        except OSError as e:
            tcp.close()
            raise ConfigError(f"cannot listen on {listen}: {e.strerror}") from None
        if not with_udp:
            return tcp, None
        port = tcp.getsockname()[1]
        udp_sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            udp_sock.bind((address[0], port, *address[2:]))
            return tcp, udp_sock
        except OSError as e:
            udp_sock.close()
            tcp.close()
            if listen.port != 0:
                raise ConfigError(f"cannot bind UDP {listen}: {e.strerror}") from None
            # Port 0 gave a TCP port whose UDP twin is taken: try another.
    raise ConfigError(f"found no port free for both TCP and UDP on {listen.host}")


def _udp_key(data_dir: Path) -> bytes:
    """The connection-id key, kept so that ids stay valid across a restart."""
    path = data_dir / UDP_KEY_FILE
    try:
        key = path.read_bytes()
        if len(key) == 32:
            return key
    except FileNotFoundError:
        pass
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return key


async def _serve_hypercorn_handoff(
    app: QuartTrio, *, task_status: trio.TaskStatus[HandOff] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run the app's lifespan and hand back a per-connection hypercorn handler.

    This is what `hypercorn.trio.serve` does around its own accept loop
    (hypercorn/trio/run.py), minus the accept loop: ours is http_listener.
    """
    config = HypercornConfig()
    config.accesslog = None
    wrapped = wrap_app(app, config.wsgi_max_body_size, "asgi")
    state: dict[str, Any] = {}
    lifespan = Lifespan(wrapped, config, state)
    context = WorkerContext(None)
    async with trio.open_nursery() as nursery:
        await nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()

        async def hand_off(stream: trio.abc.HalfCloseableStream) -> None:
            server = TCPServer(
                wrapped, config, context, ConnectionState(state.copy()), cast(Any, stream)
            )
            await server.run()

        task_status.started(hand_off)
        await trio.sleep_forever()


def _base_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def serve_tracker(
    config: TrackerConfig, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run the tracker until cancelled; `task_status.started(base_url)` once it serves."""
    hypercorn_guard.install()  # one bad connection must not stop the server
    config = config.with_token()
    tcp, udp_sock = bind_sockets(config.listen, with_udp=config.udp)
    try:
        async with open_sqlite_store(config.data_dir) as store:
            tracker = Tracker(config, store)
            tracker.restore(await store.load())
            key = await trio.to_thread.run_sync(_udp_key, config.data_dir)
            app = create_app(tracker)
            async with trio.open_nursery() as nursery:
                hand_off: HandOff = await nursery.start(_serve_hypercorn_handoff, app)
                await nursery.start(partial(serve_http, tcp, http_answer(tracker), hand_off))
                if udp_sock is not None:
                    answer = udp_answer(tracker, udp.ConnectionIds(key))
                    await nursery.start(partial(serve_udp, udp_sock, answer))
                nursery.start_soon(tracker.sweep_forever)
                url = _base_url(tcp)
                log.info("tracker serving on %s (udp: %s)", url, udp_sock is not None)
                task_status.started(url)
    finally:
        tcp.close()
        if udp_sock is not None:
            udp_sock.close()
