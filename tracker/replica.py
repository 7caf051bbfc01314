"""Tracker replicas over one Redis: one serves a term at a time, the others stand by.

A replica serves only while it holds the term key (`p2preg:leader`, set if
absent with an expiry of `replica_term_s`, renewed every third of it). Taking
a term, it loads everything from the store — metainfo, disputes, quarantines,
leases, confirmations and the live peers — into a fresh `Tracker` with a store
of its own bound to the term's token, so that nothing a request of an older
term still does can write under this one; from then on every change goes
through that store, fenced by the token (redis_store.py), and the peers
`PEER_FLUSH_S` after they announce. It ends the term, dropping its memory,
when the renewal finds another token, when the Redis primary changed or stopped being
one (a failover may have lost the last writes: the next term reloads what
survived), when the store fails under it, or when the key has gone two thirds
of a term without a renewal — well before it can expire, so two replicas never
serve at once. Stopped, it writes its last peers and gives the key up, so a
rolling restart costs no term.

A standby answers the control API at once: `standing_by` (503) while another
replica holds the term — a node waiting for a lease asks again, since one
serves within about a term — and `unavailable` while it cannot reach the store
(nodes go upstream). Nodes given every replica (`--tracker`, one tier each)
move on to the one that serves; Kubernetes routes by `/readyz`. Announces a
standby fronts for the serving replica (fronts.py): the term's key carries the
holder's address (`Term.advertise`), which a standby reads on each attempt to
take the term and hands its `Front`.

Why one serving replica rather than every replica answering from Redis on each
request: the tracker's rules (leases, the per-image queue, disputes, admission)
stay the same code, on memory, with no Redis round trip on the announce path;
a takeover costs one term. docs/TRACKER.md has the arithmetic of what one
replica carries. This module must not answer requests (http_routes does) or
hold tracker rules (coordinator does).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import coredis
import trio
from coredis.tokens import PureToken

from p2preg.core import errors
from tracker.coordinator import Tracker
from tracker.fronts import Front
from tracker.http_routes import OTHER_SERVES, STORE_AWAY, Standby
from tracker.metrics import Gauges, TrackerMetrics
from tracker.redis_store import LEADER_KEY, STORE_ERRORS, RedisStore, StoredPeer

log = logging.getLogger("p2preg.tracker")

TERMS_KEY = "p2preg:terms"
# How often a serving replica writes its peers' changes to the store: what a kill
# loses of them (a seeder lost so is unknown to the next term until it announces).
PEER_FLUSH_S = 0.2
# How often it drops dead peers and stale index names there.
STORE_SWEEP_S = 30.0
# A term's calls fail on these: the store's errors, or no answer in time.
_TERM_ERRORS: tuple[type[Exception], ...] = (*STORE_ERRORS, trio.TooSlowError)
# What ends a term from inside it: the store failing under a request or a load.
_STORE_FAILURES: tuple[type[Exception], ...] = (errors.TrackerUnavailable, *STORE_ERRORS)
_NO_GAUGES = Gauges(0, 0, 0, 0, 0, 0, 0)

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
        advertise: str = "",
    ) -> None:
        self.client = client
        self.term_s = term_s
        self.metrics = metrics
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        # host:port the other replicas reach this one on (their announce fronts
        # forward there while it serves); "": they cannot, and answer 503.
        self.advertise = advertise
        # Where the replica serving now is reached, as its token says (None: not known).
        self.serving_at: str | None = None

    async def take(self) -> bytes | None:
        """This replica's new term token, or None while another replica serves
        (then `serving_at` is where that one is reached, if it said)."""
        number = await self.client.incr(TERMS_KEY)
        # The nonce: a failover that loses the INCR cannot hand out a token twice.
        # After a space, the address: the key says who serves and where.
        token = f"{number}:{self.name}:{secrets.token_hex(4)} {self.advertise}".encode()
        ms = int(self.term_s * 1000)
        # SET NX GET (Redis ≥ 7.0): the holder's token when the key is taken.
        held = await self.client.set(LEADER_KEY, token, condition=PureToken.NX, px=ms, get=True)
        if held is None:
            self.serving_at = None
            return token
        self.serving_at = advertised(held) if isinstance(held, bytes) else None
        return None

    async def renew(self, token: bytes) -> bool:
        ms = int(self.term_s * 1000)
        return bool(await self.client.eval(_RENEW, [LEADER_KEY], [token, ms]))

    async def resign(self, token: bytes) -> None:
        await self.client.eval(_RESIGN, [LEADER_KEY], [token])

    async def primary(self) -> bytes | None:
        """Which primary this is (its replication id: a promoted replica takes a new
        one), or None if the server is not a primary (any longer)."""
        info = await self.client.info("replication")
        if info.get("role") != "master":
            return None
        return str(info.get("master_replid", "")).encode()


def advertised(token: bytes) -> str | None:
    """The address a term's token names (after its space), or None."""
    address = token.partition(b" ")[2].decode("ascii", "replace")
    return address or None


class Seat(Protocol):
    """What answers for the tracker (an HTTP app): the term's tracker, or why it stands by."""

    standby: Standby | None

    def serve(self, tracker: Tracker) -> None: ...


@dataclass(slots=True)
class _Term:
    """One term being served: its token, when it was last renewed (trio's clock)
    and on which primary, and why it ended."""

    token: bytes
    renewed_at: float
    primary: bytes
    why: str = "lost"


async def serve_terms(
    term: Term,
    seats: Sequence[Seat],
    new_tracker: Callable[[RedisStore], Tracker],
    clock: Callable[[], float],
    front: Front | None = None,
) -> None:
    """Stand by, serve a term when this replica takes one, stand by again; for good.

    `front` forwards announces to the replica that serves while this one stands by.
    """
    metrics = term.metrics
    while True:
        current = await stand_by(term, seats, front)
        store = RedisStore(term.client, metrics)
        store.term = current.token
        tracker = new_tracker(store)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_keep, term, current, nursery.cancel_scope)
                await load_term(store, tracker, clock)
                for seat in seats:
                    seat.serve(tracker)
                metrics.leading.set(1)
                metrics.terms.inc()
                log.info("tracker: serving term %s", current.token.decode(errors="replace"))
                nursery.start_soon(tracker.sweep_forever)
                nursery.start_soon(flush_peers, store, tracker, clock)
                nursery.start_soon(sweep_store, store)
        except* _STORE_FAILURES as group:
            current.why = "unreachable"
            log.error("tracker: ending the term: the store failed: %s",
                      "; ".join(type(e).__name__ for e in group.exceptions))  # fmt: skip
        finally:
            store.term = b""  # nothing of this term writes any more
            for seat in seats:
                seat.standby = OTHER_SERVES if current.why == "lost" else STORE_AWAY
            metrics.leading.set(0)
            metrics.watch(lambda: _NO_GAUGES)
            metrics.step_downs.labels(current.why).inc()
            with trio.CancelScope(shield=True), trio.move_on_after(term.term_s / 3):
                await _hand_over(term, current, store, tracker, clock)


async def _hand_over(
    term: Term, current: _Term, store: RedisStore, tracker: Tracker, clock: Callable[[], float]
) -> None:
    """Write the last peers and give the key up, so a standby takes over at once."""
    with contextlib.suppress(*STORE_ERRORS, errors.TrackerUnavailable):
        if current.why != "unreachable" and tracker.peers.journal:
            store.term = current.token
            try:
                await flush_once(store, tracker, clock)
            finally:
                store.term = b""
        await term.resign(current.token)


async def stand_by(term: Term, seats: Sequence[Seat], front: Front | None = None) -> _Term:
    """Wait until this replica takes a term; tell the seats why not meanwhile, and
    `front` where the replica that serves is."""
    said: Standby | None = None
    while True:
        at = trio.current_time()
        try:
            with trio.fail_after(term.term_s / 3):
                token = await term.take()
                primary = None if token is None else await term.primary()
            if token is not None and primary is not None:
                _forward_to(front, None)  # this replica serves: nothing to forward
                return _Term(token, at, primary)
            state = OTHER_SERVES
            _forward_to(front, term.serving_at)
        except _TERM_ERRORS as e:
            state = Standby(STORE_AWAY.code, f"{STORE_AWAY.message} ({type(e).__name__})")
            _forward_to(front, None)
        for seat in seats:
            seat.standby = state
        if said is None or state.code != said.code:
            log.warning("tracker: %s", state.message)
            said = state
        await trio.sleep(term.term_s / 3)


def _forward_to(front: Front | None, address: str | None) -> None:
    if front is not None and front.target != address:
        log.info("tracker: forwarding announces to %s", address or "nobody (none known)")
        front.target = address


async def _keep(term: Term, current: _Term, scope: trio.CancelScope) -> None:
    current.why = await hold(term, current)
    scope.cancel()


async def hold(term: Term, current: _Term) -> str:
    """Renew the term until it is lost; why it ended (`lost` or `unreachable`).

    The key outlives a renewal by a term; this replica stops at two thirds of
    one after its last renewal was sent, whatever the calls in between did.
    """
    third = term.term_s / 3
    while True:
        await trio.sleep_until(current.renewed_at + third)
        sent = trio.current_time()
        deadline = current.renewed_at + 2 * third
        try:
            with trio.fail_at(deadline):
                still = await term.renew(current.token)
                primary = await term.primary()
        except _TERM_ERRORS as e:
            if trio.current_time() >= deadline:
                log.error("tracker: ending the term: the store did not answer (%s)",
                          type(e).__name__)  # fmt: skip
                return "unreachable"
            await trio.sleep(min(third / 4, max(0.0, deadline - trio.current_time())))
            continue
        if not still:
            log.error("tracker: ending the term: another replica holds it")
            return "lost"
        if primary != current.primary:
            log.warning("tracker: ending the term: Redis failed over; reloading what it kept")
            return "lost"
        current.renewed_at = sent


async def load_term(store: RedisStore, tracker: Tracker, clock: Callable[[], float]) -> None:
    """Fill a fresh `tracker` from the store, peers included."""
    tracker.restore(await store.load())
    peers = await store.load_peers()
    wall, now = time.time(), clock()
    for p in peers:
        try:
            at = now + (p.announced_at_unix - wall) if p.announced_at_unix else 0.0
            tracker.peers.update(
                p.digest, p.identity, p.peer_id, p.compact, seeder=p.seeder,
                claims_seed=p.claims_seed, expires_at=now + (p.expires_at_unix - wall),
                announced=(at, p.uploaded, p.downloaded),
            )  # fmt: skip
        except errors.LimitReached:
            break
    tracker.peers.journal = set()
    log.info("tracker: term loaded: %d metainfo, %d peers", len(tracker.registry), len(peers))


async def flush_peers(store: RedisStore, tracker: Tracker, clock: Callable[[], float]) -> None:
    """Write the peers that changed to the store, every `PEER_FLUSH_S`, for good."""
    while True:
        await trio.sleep(PEER_FLUSH_S)
        await flush_once(store, tracker, clock)


async def flush_once(store: RedisStore, tracker: Tracker, clock: Callable[[], float]) -> None:
    journal = tracker.peers.journal
    assert journal is not None, "load_term starts the journal"
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
            at = wall + (peer.announced_at - now) if peer.announced_at else 0.0
            live.append(StoredPeer(key, identity, peer.peer_id, peer.compact, peer.claims_seed,
                                   peer.seeder, expires, at, peer.uploaded,
                                   peer.downloaded))  # fmt: skip
    try:
        await store.save_peers(live, gone)
    except errors.TrackerUnavailable:
        journal.update(changed)  # the next flush tries again, if this term lasts


async def sweep_store(store: RedisStore) -> None:
    while True:
        await trio.sleep(STORE_SWEEP_S)
        with contextlib.suppress(errors.TrackerUnavailable):
            await store.sweep()
