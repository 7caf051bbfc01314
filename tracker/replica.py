"""Tracker replicas over one Redis: one serves a term at a time, the others stand by.

A replica serves only while it holds the term key (`p2preg:leader`, set if
absent with an expiry of `replica_term_s`, renewed every third of it). Taking
a term, it loads everything from the store — metainfo, disputes, quarantines,
leases, confirmations and the live peers — into a fresh `Tracker`, and from then
on writes every change through the store, fenced by the term (redis_store.py)
and its peers a second later. It ends the term, dropping its memory, when the
renewal says another replica holds the key, when the Redis primary changed (a
failover may have lost the last writes: the next term reloads what survived),
or when the store has not answered for two thirds of the term — before the key
can expire, so two replicas never serve at once. A standby answers 503 (and
bencoded failures) at once, so nodes given every replica (`--tracker`, one tier
each) move on to the one that serves, and Kubernetes routes by `/readyz`.

Why one serving replica rather than every replica answering from Redis on each
request: the tracker's rules (leases, the per-image queue, disputes, admission)
stay the same code, on memory, with no Redis round trip on the announce path;
a takeover costs one term's expiry. docs/TRACKER.md has the arithmetic of
what one replica carries. This module must not answer requests (http_routes
does) or hold tracker rules (coordinator does).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import coredis
import trio
from coredis.tokens import PureToken

from p2preg.core import errors
from tracker.coordinator import Tracker
from tracker.metrics import TrackerMetrics
from tracker.redis_store import LEADER_KEY, STORE_ERRORS, RedisStore, StoredPeer

log = logging.getLogger("p2preg.tracker")

TERMS_KEY = "p2preg:terms"
STANDBY = "this tracker replica stands by: another one serves the cluster"
# How often a serving replica writes its peers' changes to the store.
PEER_FLUSH_S = 1.0
# How often it drops dead peers and stale index names there.
STORE_SWEEP_S = 30.0

# A term's calls fail on these: the store's errors, or no answer within a third of a term.
_TERM_ERRORS: tuple[type[Exception], ...] = (*STORE_ERRORS, trio.TooSlowError)
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RESIGN = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Term:
    """The key that lets one replica serve, and the checks that it still does."""

    def __init__(
        self,
        client: coredis.Redis[bytes],
        term_s: float,
        metrics: TrackerMetrics,
        name: str = "",
    ) -> None:
        self._client = client
        self.metrics = metrics
        self.term_s = term_s
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"

    async def take(self) -> bytes | None:
        """This replica's new term token, or None while another replica serves."""
        number = await self._client.incr(TERMS_KEY)
        token = f"{number}:{self.name}".encode()
        ms = int(self.term_s * 1000)
        taken = await self._client.set(LEADER_KEY, token, condition=PureToken.NX, px=ms)
        return token if taken else None

    async def renew(self, token: bytes) -> bool:
        ms = int(self.term_s * 1000)
        return bool(await self._client.eval(_RENEW, [LEADER_KEY], [token, ms]))

    async def resign(self, token: bytes) -> None:
        await self._client.eval(_RESIGN, [LEADER_KEY], [token])

    async def primary(self) -> bytes:
        """The Redis server's run id: it changes when a failover promotes another."""
        info = await self._client.info("server")
        return str(info.get("run_id", "")).encode()


class Seat(Protocol):
    """What answers for the tracker (an HTTP app): the term's tracker, or why it stands by."""

    standby: str | None

    def serve(self, tracker: Tracker) -> None: ...


async def serve_terms(
    term: Term,
    store: RedisStore,
    apps: Sequence[Seat],
    new_tracker: Callable[[], Tracker],
    clock: Callable[[], float],
) -> None:
    """Stand by, serve a term when this replica takes one, stand by again; for good."""
    while True:
        token = await stand_by(term, term.metrics)
        store.term = token
        why = "lost"
        try:
            tracker = new_tracker()
            metrics = tracker.metrics
            async with trio.open_nursery() as nursery:
                try:
                    await load_term(store, tracker, clock)
                except errors.TrackerUnavailable:
                    why = "unreachable"
                    continue
                for app in apps:
                    app.serve(tracker)
                metrics.leading.set(1)
                metrics.terms.inc()
                log.info("tracker: serving term %s", token.decode(errors="replace"))
                nursery.start_soon(tracker.sweep_forever)
                nursery.start_soon(flush_peers, store, tracker, clock)
                nursery.start_soon(sweep_store, store)
                why = await hold(term, token)
                nursery.cancel_scope.cancel()
        finally:
            store.term = b""
            for app in apps:
                app.standby = STANDBY
            term.metrics.leading.set(0)
            term.metrics.step_downs.labels(why).inc()


async def stand_by(term: Term, metrics: TrackerMetrics) -> bytes:
    """Wait until this replica takes a term; its token."""
    metrics.leading.set(0)
    said = ""
    while True:
        try:
            with trio.fail_after(term.term_s / 3):
                token = await term.take()
            if token is not None:
                return token
            why = "another replica serves"
        except _TERM_ERRORS as e:
            why = f"the store is unreachable ({type(e).__name__})"
        if why != said:
            log.warning("tracker: standing by: %s", why)
            said = why
        await trio.sleep(term.term_s / 3)


async def hold(term: Term, token: bytes, clock: Callable[[], float] = time.monotonic) -> str:
    """Renew the term until it is lost; why it ended (`lost` or `unreachable`)."""
    renewed_at = clock()
    primary = await term.primary()
    while True:
        await trio.sleep(term.term_s / 3)
        sent = clock()
        try:
            with trio.fail_after(term.term_s / 3):
                still = await term.renew(token)
                now_primary = await term.primary()
        except _TERM_ERRORS as e:
            # The key outlives our last renewal by a term: stop well before.
            if clock() - renewed_at >= term.term_s * 2 / 3:
                log.error("tracker: ending the term: the store did not answer (%s)",
                          type(e).__name__)  # fmt: skip
                return "unreachable"
            continue
        if not still:
            log.error("tracker: ending the term: another replica holds it")
            return "lost"
        if now_primary != primary:
            log.warning("tracker: ending the term: Redis failed over; reloading what it kept")
            with trio.move_on_after(term.term_s / 3):
                await term.resign(token)
            return "lost"
        renewed_at = sent


async def load_term(store: RedisStore, tracker: Tracker, clock: Callable[[], float]) -> None:
    """Fill a fresh `tracker` from the store, peers included."""
    tracker.restore(await store.load())
    peers = await store.load_peers()
    wall, now = time.time(), clock()
    for p in peers:
        try:
            tracker.peers.update(
                p.digest, p.identity, p.peer_id, p.compact, seeder=p.seeder,
                claims_seed=p.claims_seed, expires_at=now + (p.expires_at_unix - wall),
            )  # fmt: skip
        except errors.LimitReached:
            break
    tracker.peers.journal = set()
    log.info("tracker: term loaded: %d metainfo, %d peers", len(tracker.registry), len(peers))


async def flush_peers(store: RedisStore, tracker: Tracker, clock: Callable[[], float]) -> None:
    """Write the peers that changed to the store, every `PEER_FLUSH_S`, for good."""
    journal = tracker.peers.journal
    assert journal is not None, "load_term starts the journal"
    while True:
        await trio.sleep(PEER_FLUSH_S)
        changed = list(journal)
        journal.clear()
        wall, now = time.time(), clock()
        live: list[StoredPeer] = []
        gone: list[tuple[str, str]] = []
        for key, identity in changed:
            peer = tracker.peers.peer(key, identity)
            if peer is None:
                gone.append((key, identity))
            else:
                expires = wall + (peer.expires_at - now)
                live.append(StoredPeer(key, identity, peer.peer_id, peer.compact,
                                       peer.claims_seed, peer.seeder, expires))  # fmt: skip
        try:
            await store.save_peers(live, gone)
        except errors.TrackerUnavailable:
            journal.update(changed)  # the next flush tries again, if this term lasts


async def sweep_store(store: RedisStore) -> None:
    while True:
        await trio.sleep(STORE_SWEEP_S)
        with contextlib.suppress(errors.TrackerUnavailable):
            await store.sweep()
