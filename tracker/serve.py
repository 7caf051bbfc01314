"""`serve_tracker`: the running tracker — its sockets, its store, its listeners.

Owns the wiring of one tracker process: the start-up checks that fail closed
(no plain tracker beyond loopback unless `insecure`; the token and TLS files
read here, each error naming its file), binding the TCP port and its UDP twin
and the plain metrics port, opening the store — SQLite, loaded into the
coordinator here, or Redis, whose replicas take turns serving (replica.py) —
the UDP connection-id key kept across restarts, and the nursery
in which the HTTP listener (http_listener serving http_routes, behind the
mutual-TLS gate when `tls_dir` is set), the metrics listener, the loopback
admin listener (the cluster page, admin_http), the UDP listener and the sweeper
run. `task_status.started(base_url)` once it serves, so tests start it on port
0. This module must not answer requests (http_routes,
bittorrent do) or hold tracker logic (coordinator does).
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import trio

from p2preg.core.config import ConfigError, HostPort
from p2preg.core.hostfiles import write_private
from p2preg.core.logs import register_secret
from p2preg.core.tls import ReloadingTLS
from tracker import udp
from tracker.admin_http import AdminHttp
from tracker.bittorrent import udp_answer
from tracker.config import TrackerConfig
from tracker.coordinator import Tracker
from tracker.fronts import Front
from tracker.http_listener import serve_http
from tracker.http_routes import METRICS_ROUTES, STORE_AWAY, TrackerHttp
from tracker.metrics import TrackerMetrics
from tracker.quotas import PreAuthConnections
from tracker.redis_store import RedisStore, open_redis
from tracker.replica import Seat, Term, serve_terms
from tracker.state import TrackerStore, open_sqlite_store
from tracker.tls_gate import TLSGate
from tracker.udp_listener import serve_udp

log = logging.getLogger("p2preg.tracker")
UDP_KEY_FILE = "udp-connection-id.key"
_BIND_ATTEMPTS = 20


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
    write_private(path, key)
    return key


def advertise_address(config: TrackerConfig, sock: socket.socket) -> str:
    """Where the other replicas reach this one: `replica_advertise`, else the bound
    address when `listen` names one (not a wildcard), else "" (nowhere)."""
    if config.replica_advertise is not None:
        return str(config.replica_advertise)
    host, port = sock.getsockname()[:2]
    if ipaddress.ip_address(host).is_unspecified:
        return ""
    return str(HostPort(host, port))


@asynccontextmanager
async def _open_store(
    config: TrackerConfig, metrics: TrackerMetrics, advertise: str
) -> AsyncIterator[tuple[TrackerStore, Term | None]]:
    """The configured store, and with Redis the term its replicas take turns on."""
    if config.store is None:
        async with open_sqlite_store(config.data_dir) as sqlite:
            yield sqlite, None
        return
    async with open_redis(config.store, config) as client:
        term = Term(client, config.replica_term_s, metrics, advertise=advertise)
        yield RedisStore(client, metrics), term


def _base_url(sock: socket.socket, scheme: str = "http") -> str:
    host, port = sock.getsockname()[:2]
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def _start_checks(config: TrackerConfig) -> tuple[TrackerConfig, ReloadingTLS | None]:
    """Fail closed before binding anything: exposure, token, TLS files (read now)."""
    config.check_exposure()
    config = config.with_token()
    register_secret(config.token)
    if config.store is not None:
        register_secret(config.resolved_store_password())
    tls = None if config.tls_dir is None else ReloadingTLS(config.tls_dir, role="tracker")
    if tls is not None:
        log.info("tracker: mutual TLS as %s; UDP announces are off", tls.identity)
    elif config.token is None and config.insecure:
        log.warning("tracker: --insecure and no token: anyone who reaches it may use it")
    return config, tls


async def _watch_tls(tls: ReloadingTLS | None) -> None:
    """Take up renewed files though no handshake asks: nodes keep their
    connections open (docs/TRACKER.md, "Announce relay")."""
    while tls is not None:
        await trio.sleep(tls.check_interval_s)
        tls.check()


async def serve_tracker(
    config: TrackerConfig,
    *,
    clock: Callable[[], float] = trio.current_time,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the tracker until cancelled; `task_status.started(base_url)` once it serves.

    `clock` is the coordinator's (leases, peer expiry): tests that move time by
    hand pass their own, ahead of trio's.
    """
    config, tls = _start_checks(config)
    tcp, udp_sock = bind_sockets(config.listen, with_udp=config.serves_udp)
    metrics_sock = admin_sock = None
    try:
        if config.metrics_listen is not None:
            metrics_sock, _ = bind_sockets(config.metrics_listen, with_udp=False)
        if config.admin_listen is not None:
            admin_sock, _ = bind_sockets(config.admin_listen, with_udp=False)
        root = (lambda: None) if tls is None else tls.issuer_root
        metrics = TrackerMetrics()
        advertise = advertise_address(config, tcp)
        async with _open_store(config, metrics, advertise) as (store, term):
            def new_tracker(store: TrackerStore) -> Tracker:
                return Tracker(config, store, metrics=metrics, clock=clock, current_root=root)

            tracker = new_tracker(store)
            if term is None:
                tracker.restore(await store.load())
            gate = None if tls is None else TLSGate(
                tls, metrics.tls_refused, admitted=metrics.tls_admitted
            )
            preauth = PreAuthConnections.from_config(config, metrics)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watch_tls, tls)
                app = TrackerHttp(tracker)
                apps: list[Seat] = [app]
                await nursery.start(partial(serve_http, tcp, app, gate=gate, preauth=preauth))
                if metrics_sock is not None:
                    metrics_app = TrackerHttp(tracker, METRICS_ROUTES)
                    apps.append(metrics_app)
                    # Its own places: a flood of the main port leaves Prometheus its view.
                    own = PreAuthConnections(
                        config.max_preauth_connections, config.max_preauth_connections_per_ip
                    )
                    await nursery.start(partial(serve_http, metrics_sock, metrics_app, preauth=own))
                    log.info("tracker metrics on %s", _base_url(metrics_sock))
                if admin_sock is not None:
                    admin_app = AdminHttp(tracker, clock)
                    apps.append(admin_app)
                    await nursery.start(partial(serve_http, admin_sock, admin_app))
                    log.info("tracker cluster page on %s/", _base_url(admin_sock))
                if udp_sock is not None:
                    key = await trio.to_thread.run_sync(_udp_key, config.data_dir)
                    answer = udp_answer(tracker, udp.ConnectionIds(key))
                    await nursery.start(partial(serve_udp, udp_sock, answer))
                if term is None:
                    metrics.leading.set(1)  # the one tracker always serves
                    nursery.start_soon(tracker.sweep_forever)
                else:
                    for each in apps:
                        each.standby = STORE_AWAY  # until it knows better
                    app.front = Front(metrics, tls=tls, token=config.token)
                    await nursery.start(app.front.run)
                    if not advertise:
                        log.warning("tracker: no replica_advertise and a wildcard listen: "
                                    "the other replicas cannot forward announces here")  # fmt: skip
                    run_terms = partial(serve_terms, front=app.front)
                    nursery.start_soon(run_terms, term, apps, new_tracker, clock)
                url = _base_url(tcp, "https" if tls is not None else "http")
                log.info("tracker serving on %s (udp: %s, store: %s)", url, udp_sock is not None,
                         config.store or "sqlite")  # fmt: skip
                task_status.started(url)
    finally:
        tcp.close()
        if udp_sock is not None:
            udp_sock.close()
        for sock in (metrics_sock, admin_sock):
            if sock is not None:
                sock.close()
