"""A node: wires the store, the resolver, the blob path and the facade.

`open_node` builds the parts for one configuration; `serve_node` serves the
facade with hypercorn and reports the bound URL through `task_status`, so tests
start nodes on port 0 with `await nursery.start(serve_node, config)`. It also
owns the order of a graceful shutdown: listeners closed, responses in flight
given `shutdown_grace_s`, then the swarm torn down (which announces `stopped`).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

import httpx
import trio
from hypercorn.trio import serve

from p2preg.core.config import HostPort
from p2preg.node import hypercorn_internals
from p2preg.node.blobs import Blobs
from p2preg.node.config import NodeConfig
from p2preg.node.metrics import NodeMetrics
from p2preg.node.p2p import P2P, P2PSettings
from p2preg.node.pullorder import PullOrder
from p2preg.node.resolver import Resolver
from p2preg.node.store import BlobStore
from p2preg.node.swarm import open_swarm
from p2preg.node.tenancy import Tenancy
from p2preg.node.upstream import UpstreamClient
from tracker.client import TrackerClient

log = logging.getLogger(__name__)


@dataclass
class Node:
    config: NodeConfig
    store: BlobStore
    metrics: NodeMetrics
    resolver: Resolver
    blobs: Blobs
    clients: dict[str, UpstreamClient]
    streams: trio.Semaphore
    p2p: P2P | None = None

    def client_for(self, ns: str | None) -> UpstreamClient | None:
        upstream = self.config.upstream_for(ns)
        return None if upstream is None else self.clients[upstream.ns]

    def refresh_gauges(self) -> None:
        self.metrics.store_bytes.set(self.store.used_bytes)
        self.metrics.store_blobs.set(len(self.store))
        self.metrics.store_budget.set(self.store.max_bytes)
        self.metrics.store_evictions.set(self.store.evictions)


@asynccontextmanager
async def open_node(config: NodeConfig) -> AsyncIterator[Node]:
    store = BlobStore(config.data_dir, config.store_max_bytes)
    await trio.to_thread.run_sync(store.open)
    metrics = NodeMetrics()
    tenancy = Tenancy()
    pull_order = PullOrder()
    timeout = httpx.Timeout(config.upstream_timeout_s, connect=min(10.0, config.upstream_timeout_s))
    async with (
        httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False) as http,
        _open_p2p(config, store, metrics, http) as p2p,
        trio.open_nursery() as nursery,
    ):
        clients = {
            u.ns: UpstreamClient(
                u,
                http,
                credential=config.credential_for(u.ns),
                retries=config.upstream_retries,
                on_bytes=metrics.upstream_bytes.inc,
            )
            for u in config.upstream
        }
        node = Node(
            config=config,
            store=store,
            metrics=metrics,
            resolver=Resolver(store, tenancy, metrics, pull_order, tag_ttl_s=config.tag_ttl_s),
            blobs=Blobs(store, tenancy, metrics, nursery, pull_order, p2p),
            clients=clients,
            streams=trio.Semaphore(config.max_blob_streams),
            p2p=p2p,
        )
        log.info(
            "node: store %s holds %d blobs (%d bytes of %d)",
            config.data_dir, len(store), store.used_bytes, store.max_bytes,
        )
        try:
            yield node
        finally:
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def _open_p2p(
    config: NodeConfig, store: BlobStore, metrics: NodeMetrics, http: httpx.AsyncClient
) -> AsyncIterator[P2P | None]:
    """The swarm and the tracker client, when a tracker is configured."""
    if config.tracker is None:
        yield None
        return
    name = config.node_name or f"{socket.gethostname()}:{config.listen.port}"
    tracker = TrackerClient(config.tracker, node=name, token=config.tracker_token, http=http)
    listen = str(HostPort(config.peer_host, config.peer_port))
    async with (
        open_swarm(config.data_dir, listen, [tracker.announce_url], metrics) as swarm,
        trio.open_nursery() as nursery,
    ):
        settings = P2PSettings(
            min_bytes=config.p2p_min_bytes,
            stall_s=config.swarm_stall_s,
            max_hash_failures=config.swarm_max_hash_failures,
            lease_wait_max_s=config.lease_wait_max_s,
        )
        p2p = P2P(
            store, swarm, tracker, metrics, settings, config.data_dir / "torrents", nursery
        )
        store.on_remove = p2p.forget
        store.spare = swarm.last_seeder_of_live_swarm
        reseeded = await p2p.reseed()
        log.info(
            "node: swarm on %s (peer port %d), tracker %s, re-seeding %d stored blobs",
            listen, swarm.listen_port, config.tracker, reseeded,
        )
        try:
            yield p2p
        finally:
            nursery.cancel_scope.cancel()


# hypercorn's accept loop ends on the same event that starts a shutdown; the
# listening sockets are closed only once it has (trio must not be waiting on them).
LISTENER_CLOSE_DELAY_S = 0.05


def _server_config(listen: HostPort, grace_s: float) -> hypercorn_internals.ListeningConfig:
    hc = hypercorn_internals.ListeningConfig()
    hc.bind = [str(listen)]
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    hc.backlog = 1024
    hc.graceful_timeout = grace_s
    return hc


async def _close_listeners(shutdown: trio.Event, hc: hypercorn_internals.ListeningConfig) -> None:
    # Refused at once rather than left in the backlog: containerd moves on to
    # its next host (the upstream) instead of waiting for this node to exit.
    await shutdown.wait()
    await trio.sleep(LISTENER_CLOSE_DELAY_S)
    for sock in hc.listening:
        sock.close()


async def serve_node(
    config: NodeConfig,
    *,
    shutdown: trio.Event | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled or, gracefully, until `shutdown` is set.

    A graceful shutdown stops accepting connections at once, gives responses
    in flight `shutdown_grace_s` to finish, and then tears the swarm down,
    which announces `stopped` for every torrent.
    """
    from p2preg.node.admin import create_metrics_app
    from p2preg.node.facade import create_app

    # Refuses (ConfigError) a hypercorn/Quart it was not checked against; then
    # blob bodies go by sendfile and one bad connection cannot stop the server.
    hypercorn_internals.install()
    shutdown = trio.Event() if shutdown is None else shutdown
    async with open_node(config) as node, trio.open_nursery() as nursery:
        hc = _server_config(config.listen, config.shutdown_grace_s)
        binds: list[str] = await nursery.start(
            partial(serve, create_app(node), hc, shutdown_trigger=shutdown.wait)
        )
        nursery.start_soon(_close_listeners, shutdown, hc)
        if config.metrics_listen is not None:
            mhc = _server_config(config.metrics_listen, config.shutdown_grace_s)
            mbinds: list[str] = await nursery.start(
                partial(serve, create_metrics_app(node), mhc, shutdown_trigger=shutdown.wait)
            )
            nursery.start_soon(_close_listeners, shutdown, mhc)
            log.info("node: serving /metrics and /healthz on %s", mbinds[0])
        log.info("node: serving the registry facade on %s", binds[0])
        task_status.started(binds[0])
        await shutdown.wait()
        log.info(
            "node: shutting down: refusing new connections, finishing responses in flight "
            "(at most %.0f s)", config.shutdown_grace_s,
        )
    log.info("node: stopped")
