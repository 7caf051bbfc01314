"""A node: wires the store, the resolver, the pull path and the facade.

Owns the construction of one node from its configuration — each part gets the
narrow pieces it uses, and the store its eviction hooks, at construction —
and its lifetime: `open_node` builds the parts for one configuration and
yields the apps; `serve_node` serves them with hypercorn and reports the bound
URL through `task_status`, so tests start nodes on port 0 with
`await nursery.start(serve_node, config)`. It also owns the order of a
graceful shutdown: listeners closed, responses in flight given
`shutdown_grace_s`, then the swarm torn down (which announces `stopped`). It
must not hold request logic: that is the facade's and the pull path's.
"""

from __future__ import annotations

import logging
import shutil
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

import httpx
import trio
from hypercorn.trio import serve
from quart_trio import QuartTrio

from p2preg.core.config import HostPort
from p2preg.core.hostfiles import private_dir
from p2preg.core.logs import register_secret
from p2preg.core.tls import ReloadingTLS
from p2preg.node import hypercorn_internals
from p2preg.node.admin import Admin, add_routes, create_metrics_app
from p2preg.node.adminauth import AdminAuth, open_admin_auth
from p2preg.node.blobs import Blobs
from p2preg.node.blobstream import BlobStreams
from p2preg.node.chunks import Chunking, ChunkSettings
from p2preg.node.cluster_manifests import ClusterManifests
from p2preg.node.clusterword import ClusterWord
from p2preg.node.config import Credential, NodeConfig
from p2preg.node.containerd_check import watch_host
from p2preg.node.credentials import node_credentials
from p2preg.node.facade import Registry, create_app
from p2preg.node.fetch import BlobFetcher, Cluster, SwarmSettings
from p2preg.node.limits import Caps, NodeLimits, UpstreamThrottle, add_limits_routes
from p2preg.node.localanswers import LocalAnswers
from p2preg.node.metrics import NodeMetrics
from p2preg.node.peers import PeerDownload
from p2preg.node.peertls import PeerTLS, PlainTorrents, TorrentRoots, listen_interfaces
from p2preg.node.pinbook import PINS_FILE, PinBook
from p2preg.node.pins import Pins, add_pin_routes
from p2preg.node.pullorder import PullOrder
from p2preg.node.relay import open_relay, relay_host
from p2preg.node.resolver import Resolver
from p2preg.node.seams import in_thread
from p2preg.node.seeding import Seeding, TorrentFiles, stop_seeding
from p2preg.node.servingstate import open_serving_state
from p2preg.node.store import BlobStore
from p2preg.node.swarm import Swarm, open_swarm
from p2preg.node.tagmap import TagMap
from p2preg.node.takeover import Moves, reannounce_after_moves
from p2preg.node.tenancy import Tenancy
from p2preg.node.upstream import UpstreamClient, Upstreams
from tracker.client import TrackerClient

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeApps:
    """What a node serves: the facade, and the metrics listener's app."""

    facade: QuartTrio
    metrics: QuartTrio
    streams: BlobStreams


def _node_name(config: NodeConfig, tls: ReloadingTLS | None) -> str:
    if tls is not None:
        return tls.identity.name  # the tracker reads it from the certificate too
    return config.node_name or f"{socket.gethostname()}:{config.listen.port}"


@dataclass(frozen=True)
class _P2P:
    swarm: Swarm
    tracker: TrackerClient
    roots: TorrentRoots
    moves: Moves  # the tracker client moved on to another tracker (takeover.py)
    answers: LocalAnswers  # what the relay answers itself (localanswers.py)


@asynccontextmanager
async def _open_swarm(
    config: NodeConfig,
    http: httpx.AsyncClient,
    metrics: NodeMetrics,
    token: str | None,
    tls: ReloadingTLS | None,
) -> AsyncIterator[_P2P | None]:
    """The swarm and the tracker client, when a tracker is configured."""
    if not config.tracker_urls:
        yield None
        return
    name = _node_name(config, tls)
    peer_tls = None if tls is None else PeerTLS(tls, config.data_dir)
    listen = listen_interfaces(
        config.peer_host, config.peer_port, config.peer_ssl_port, tls=tls is not None
    )
    moves = Moves()

    def failover(reason: str) -> None:
        metrics.tracker_failovers.labels(reason).inc()
        moves.note()

    if tls is None:
        tracker = TrackerClient(
            config.tracker_urls, node=name, token=token, http=http, on_failover=failover
        )
    else:
        tracker = TrackerClient(config.tracker_urls, node=name, tls=tls, on_failover=failover)
    try:
        async with (
            open_relay(
                tracker, metrics, relay_host(config.peer_host), refresh_s=config.relay_refresh_s
            ) as relay,
            open_swarm(
                config.data_dir, listen, relay.url, metrics, tls=peer_tls,
                stall_reports=(tracker.report_stall, config.peer_stall_report_s),
            ) as swarm,
        ):
            relay.attach(swarm)
            tracker.peer_port = swarm.listen_port
            try:
                yield _P2P(swarm, tracker, peer_tls or PlainTorrents(), moves, relay.answers)
            finally:
                # The cluster stops handing this node out now, not a peer TTL later.
                await relay.leave(swarm)
    finally:
        await tracker.aclose()


def _new_store(config: NodeConfig, swarm: Swarm | None, torrents: TorrentFiles) -> BlobStore:
    if swarm is None:
        return BlobStore(config.data_dir, config.store_max_bytes)
    return BlobStore(
        config.data_dir,
        config.store_max_bytes,
        on_remove=partial(stop_seeding, swarm, torrents),
        spare=swarm.last_seeder_of_live_swarm,
    )


def _cluster(
    config: NodeConfig,
    store: BlobStore,
    p2p: _P2P,
    torrents: TorrentFiles,
    nursery: trio.Nursery,
    metrics: NodeMetrics,
) -> Cluster:
    swarm, tracker = p2p.swarm, p2p.tracker
    settings = SwarmSettings(
        min_bytes=config.p2p_min_bytes,
        stall_s=config.swarm_stall_s,
        max_hash_failures=config.swarm_max_hash_failures,
        lease_wait_max_s=config.lease_wait_max_s,
    )
    peers = PeerDownload(
        store, swarm, stall_s=settings.stall_s, max_hash_failures=settings.max_hash_failures,
        offload=in_thread, roots=p2p.roots, answers=p2p.answers,
    )
    seeding = Seeding(store, swarm, tracker, torrents, nursery, in_thread, p2p.roots,
                      p2p.answers)  # fmt: skip
    nursery.start_soon(reannounce_after_moves, p2p.moves, swarm.reannounce_recent)
    reseeded = seeding.reseed()
    if isinstance(p2p.roots, PeerTLS):
        # Re-issued under another CA (a rotation): move the seeded blobs there.
        nursery.start_soon(seeding.follow_root)
    log.info(
        "node: swarm on %s (peer port %d%s), tracker %s as %s, re-seeding %d stored blobs",
        config.peer_host, swarm.listen_port,
        ", TLS" if isinstance(p2p.roots, PeerTLS) else "", ", ".join(tracker.base_urls),
        tracker.node, reseeded,
    )
    return Cluster(tracker, swarm, seeding, peers, settings,
                   _chunking(config, store, p2p, nursery, metrics))  # fmt: skip


def _chunking(
    config: NodeConfig, store: BlobStore, p2p: _P2P, nursery: trio.Nursery, metrics: NodeMetrics
) -> Chunking | None:
    if not config.chunking:
        return None
    work_dir = config.data_dir / "chunks"
    # Chunks cut by a previous run were never verified as part of a blob: gone.
    shutil.rmtree(work_dir, ignore_errors=True)
    private_dir(work_dir)
    settings = ChunkSettings(config.chunk_bytes, config.chunk_min_count, config.swarm_stall_s,
                             config.swarm_max_hash_failures)  # fmt: skip
    return Chunking(settings, p2p.tracker, p2p.swarm, store, metrics, p2p.roots, work_dir,
                    in_thread, nursery, p2p.answers)  # fmt: skip


@dataclass(frozen=True)
class _Secrets:
    tracker_token: str | None
    credentials: dict[str, Credential]
    admin: AdminAuth


def _read_secrets(config: NodeConfig) -> _Secrets:
    """Every secret the node holds, read (and registered with the log formatter) at start.

    Also makes the data directory private (0700, ours) before anything is written there.
    """
    private_dir(config.data_dir)
    token = config.resolved_tracker_token()
    register_secret(token)
    credentials = node_credentials(config)
    return _Secrets(token, credentials, open_admin_auth(config.data_dir, config.admin_token_file))



def _cluster_answers(
    config: NodeConfig, p2p: _P2P | None, metrics: NodeMetrics, nursery: trio.Nursery
) -> tuple[ClusterManifests | None, ClusterWord | None]:
    """With a tracker: manifest bodies through the cluster, and its word for outages."""
    if p2p is None:
        return None, None
    word = ClusterWord(
        p2p.tracker, metrics, enabled=config.cluster_fallback,
        max_age_s=config.serve_stale_s, recheck_s=config.tag_ttl_s,
    )
    nursery.start_soon(word.report_forever)
    return ClusterManifests(p2p.tracker, metrics, config.lease_wait_max_s), word

def _upstreams(
    config: NodeConfig,
    http: httpx.AsyncClient,
    held: _Secrets,
    metrics: NodeMetrics,
    throttle: UpstreamThrottle,
) -> Upstreams:
    """A client per upstream, sharing the node's HTTP pool and its upstream cap."""
    return Upstreams([
        UpstreamClient(
            u,
            http,
            credential=held.credentials.get(u.ns),
            retries=config.upstream_retries,
            on_bytes=metrics.upstream_bytes.inc,
            trusted_realms=config.trusted_realms_for(u.ns),
            throttle=throttle.take,
        )
        for u in config.upstream
    ])


@asynccontextmanager
async def open_node(config: NodeConfig) -> AsyncIterator[NodeApps]:
    held = _read_secrets(config)
    metrics = NodeMetrics()
    if config.containerd_config is not None:
        metrics.watch_containerd(watch_host(
            config.containerd_config, config.containerd_hosts_dir, config.containerd_version
        ))
    tenancy = Tenancy()
    tags = TagMap(ttl_s=config.tag_ttl_s, stale_s=config.serve_stale_s)
    pull_order = PullOrder()
    torrents = TorrentFiles(config.data_dir / "torrents")
    timeout = httpx.Timeout(config.upstream_timeout_s, connect=min(10.0, config.upstream_timeout_s))
    tls = None if config.tls_dir is None else ReloadingTLS(config.tls_dir, role="node")
    async with (
        httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False) as http,
        _open_swarm(config, http, metrics, held.tracker_token, tls) as p2p,
        open_serving_state(config.data_dir, tags, tenancy),
        trio.open_nursery() as nursery,
    ):
        store = _new_store(config, None if p2p is None else p2p.swarm, torrents)
        await trio.to_thread.run_sync(store.open)
        throttle = UpstreamThrottle(config.upstream_download_limit_bytes_s)
        limits = NodeLimits(  # before the swarm re-seeds: capped from its first byte
            Caps(config.peer_upload_limit_bytes_s, config.peer_download_limit_bytes_s,
                 config.upstream_download_limit_bytes_s),
            metrics, throttle, None if p2p is None else p2p.swarm,
        )
        cluster = None if p2p is None else _cluster(config, store, p2p, torrents, nursery, metrics)
        upstreams = _upstreams(config, http, held, metrics, throttle)
        fetcher = BlobFetcher(
            store, metrics, pull_order, nursery, offload=in_thread, cluster=cluster,
            share_small=config.cluster_fallback,
        )
        manifests, word = _cluster_answers(config, p2p, metrics, nursery)
        blobs = Blobs(store, tenancy, metrics, fetcher, nursery, word)
        resolver = Resolver(
            store, tenancy, metrics, pull_order, tags, cluster=manifests, word=word
        )
        streams = BlobStreams(
            store, trio.Semaphore(config.max_blob_streams), config.stream_chunk_bytes, metrics
        )
        facade = create_app(Registry(upstreams, resolver, blobs, streams))
        pins = Pins(
            PinBook(config.data_dir / PINS_FILE), store, resolver, blobs, upstreams,
            config.pinned_images,
        )
        await pins.open()
        nursery.start_soon(pins.apply_config)
        add_pin_routes(facade, pins, held.admin)
        # Without a tracker the node has no tracker-given name to report.
        name = (
            (config.node_name or socket.gethostname())
            if cluster is None
            else _node_name(config, tls)
        )
        add_routes(facade, Admin(
            name=name,
            upstreams=upstreams,
            store=store,
            blobs=blobs,
            metrics=metrics,
            swarm=None if cluster is None else cluster.swarm,
            trackers=config.tracker_urls,
            p2p_min_bytes=config.p2p_min_bytes,
            auth=held.admin,
            pins=pins,
        ))
        add_limits_routes(facade, limits, held.admin)
        log.info(
            "node: store %s holds %d blobs (%d bytes of %d)",
            config.data_dir, len(store), store.used_bytes, store.max_bytes,
        )
        try:
            yield NodeApps(facade, create_metrics_app(metrics, store), streams)
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
    # Refuses (ConfigError) a hypercorn/Quart it was not checked against; then
    # blob bodies go by sendfile and one bad connection cannot stop the server.
    hypercorn_internals.install()
    config.check_serving()
    shutdown = trio.Event() if shutdown is None else shutdown
    async with open_node(config) as apps, trio.open_nursery() as nursery:
        hc = _server_config(config.listen, config.shutdown_grace_s)
        binds: list[str] = await nursery.start(
            partial(serve, apps.facade, hc, shutdown_trigger=shutdown.wait)
        )
        nursery.start_soon(_close_listeners, shutdown, hc)
        if config.metrics_listen is not None:
            mhc = _server_config(config.metrics_listen, config.shutdown_grace_s)
            mbinds: list[str] = await nursery.start(
                partial(serve, apps.metrics, mhc, shutdown_trigger=shutdown.wait)
            )
            nursery.start_soon(_close_listeners, shutdown, mhc)
            log.info("node: serving /metrics and /healthz on %s", mbinds[0])
        log.info("node: serving the registry facade on %s", binds[0])
        task_status.started(binds[0])
        await shutdown.wait()
        # Before hypercorn's own grace deadline, which it sets once its serve
        # loop has unwound: ours fires first, while the responses are still there.
        deadline = trio.current_time() + config.shutdown_grace_s
        log.info(
            "node: shutting down: refusing new connections, finishing responses in flight "
            "(at most %.0f s)", config.shutdown_grace_s,
        )
        nursery.start_soon(_drain, apps.streams, config.max_blob_streams, deadline)
    log.info("node: stopped")


async def _drain(streams: BlobStreams, slots: int, deadline: float) -> None:
    """Take back every blob stream slot; say how many responses the grace period cuts off."""
    taken = 0
    with trio.move_on_at(deadline):
        while taken < slots:
            await streams.slots.acquire()
            taken += 1
    if taken < slots:
        log.warning(
            "node: %d blob response(s) still in flight after the grace period: cutting them off",
            slots - taken,
        )
