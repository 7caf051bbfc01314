"""Upstream-fetch leases: one node per blob fetches from the seed registry, and cannot stall it.

`LeaseBook` is the sans-IO state machine (time comes from an injected clock):
a digest has at most one live lease, bound to the identity that took it (its id
goes to that identity only, and only it renews or releases); the holder renews
it with its byte progress, which may only grow and never pass the blob's size;
a lease nobody renews expires after `ttl_s`. A holder judged *slow* or
*silent* (lease_rules.py: below `min_rate_bytes_s` over `rate_window_s`; no
sign of life for `silence_s`, or a grant not acknowledged within
`grant_ack_s`; each window lengthened by the tracker's own `lag`) loses the
fetch to the next other identity that asks (`Granted.replaced`) — at most once
per digest per window, since a second holder on the same thin link doubles
what crosses it. The image's upstream slot (`fetching`) is given up at the
plain windows, lag or not: a grant whose acknowledgement waits in the
tracker's queue does not hold the image's other layers back, and its holder
keeps the lease. Neither is revoked: a paused holder that wakes finishes its
copy (one extra upstream copy at most) and may still file its torrent
(`passed_from`); its renewals are refused with the reason. One identity holds
at most `max_per_holder` leases at once. `Lease` and `RateRule` live in
lease_rules.py and are imported from here. This module does not decide
*whether* a lease is needed (the service checks for seeders first), must not
persist anything (the service does, via state.py), nor sleep or wake anybody
(the long polls are waiters.py's).
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace

from p2preg.core.errors import LeaseCapReached, LeaseLost
from tracker.lease_rules import NO_RATE_RULE, LeaseRules, check_holder, check_progress, checked_size
from tracker.lease_rules import Lease as Lease
from tracker.lease_rules import RateRule as RateRule

# Replaced leases remembered, so their holder is told why its renewal fails.
MAX_REPLACED_REMEMBERED = 10_000
# How often per `silence_s` the service looks for silent holders (`turned_silent`):
# a waiter learns within a quarter of it.
SILENCE_CHECKS = 4


@dataclass(frozen=True, slots=True)
class Granted:
    """The asker holds `lease` (new, or its own lease asked for again).

    `replaced` is the slow lease it took the fetch over from, if it did.
    """

    lease: Lease
    replaced: Lease | None = None


@dataclass(frozen=True, slots=True)
class Held:
    """Another node holds `lease`; ask again once it expires or something changes."""

    lease: Lease


def new_lease_id() -> str:
    return secrets.token_hex(16)


class LeaseBook:
    def __init__(
        self,
        ttl_s: float,
        clock: Callable[[], float],
        new_id: Callable[[], str] = new_lease_id,
        *,
        rate: RateRule = NO_RATE_RULE,
        max_per_holder: int | None = None,
        silence_s: float = 0.0,
        grant_ack_s: float = 0.0,
        lag: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self.rules = LeaseRules(ttl_s, rate, silence_s, grant_ack_s)
        # The tracker's own lag now, s: added to `silence_s` and `grant_ack_s`.
        self.lag = lag
        self.max_per_holder = max_per_holder
        self._clock = clock
        self._new_id = new_id
        self._leases: dict[str, Lease] = {}
        self._by_holder: dict[str, set[str]] = {}
        # Digest → when its fetch was last handed over (one handover per window).
        self._last_replaced: dict[str, float] = {}
        # Lease id → why it was taken away, for the old holder's next renewal.
        self._replaced: OrderedDict[str, str] = OrderedDict()
        # (digest, identity) whose lease on the digest was passed on: it was the
        # holder, and may still file the torrent of the copy it finishes.
        self._passed: OrderedDict[tuple[str, str], None] = OrderedDict()
        # Ids of live leases `turned_silent` already reported as quiet, and as silent.
        self._told_quiet: set[str] = set()
        self._told_silent: set[str] = set()
        # Totals since start, for metrics.
        self.granted = 0
        self.expired = 0
        self.replacements = 0

    def __len__(self) -> int:
        return len(self._leases)

    @property
    def ttl_s(self) -> float:
        return self.rules.ttl_s

    @property
    def rate(self) -> RateRule:
        return self.rules.rate

    @property
    def silence_s(self) -> float:
        return self.rules.silence_s

    @property
    def grant_ack_s(self) -> float:
        return self.rules.grant_ack_s

    def held_by(self, holder: str) -> int:
        """Live leases `holder` holds now."""
        for digest in list(self._by_holder.get(holder, ())):
            self.current(digest)
        return len(self._by_holder.get(holder, ()))

    def current(self, digest: str) -> Lease | None:
        """The live lease on `digest`, if any; an expired one is dropped here."""
        lease = self._leases.get(digest)
        if lease is not None and lease.expires_at <= self._clock():
            self._remove(lease)
            self.expired += 1
            return None
        return lease

    def live(self) -> list[Lease]:
        """Every lease not yet expired, snapshotted (for reading: the cluster page)."""
        now = self._clock()
        return [lease for lease in self._leases.values() if lease.expires_at > now]

    def _lag(self) -> float:
        return max(0.0, self.lag())

    def is_slow(self, lease: Lease, *, forgive_lag: bool = True) -> bool:
        """Below the minimum rate (`LeaseRules.is_slow`); `forgive_lag`: as of when the
        tracker, running late, should have looked."""
        return self.rules.is_slow(lease, self._clock(), self._lag() if forgive_lag else 0.0)

    def is_silent(self, lease: Lease, *, forgive_lag: bool = True) -> bool:
        """No sign of life, or no acknowledgement, in time (`LeaseRules.is_silent`);
        `forgive_lag`: each window lengthened by the tracker's own lag."""
        return self.rules.is_silent(lease, self._clock(), self._lag() if forgive_lag else 0.0)

    @property
    def check_every_s(self) -> float:
        """How often the caller runs `turned_silent` (0: never needed)."""
        spans = [s for s in (self.silence_s, self.grant_ack_s) if s > 0]
        return min(spans) / SILENCE_CHECKS if spans else 0.0

    def turned_silent(self) -> list[Lease]:
        """Live leases gone quiet (the plain windows: their image's slot is free) or
        silent (the windows with the lag: another node may take them over) since the
        last call: wake their waiters and free their slots (the caller does, every
        `check_every_s`)."""
        if self.check_every_s <= 0:
            return []
        now = self._clock()
        live = [lease for lease in self._leases.values() if lease.expires_at > now]
        quiet = [lease for lease in live if lease.lease_id not in self._told_quiet
                 and self.is_silent(lease, forgive_lag=False)]  # fmt: skip
        silent = [lease for lease in live if lease.lease_id not in self._told_silent
                  and self.is_silent(lease)]  # fmt: skip
        self._told_quiet.update(lease.lease_id for lease in quiet)
        self._told_silent.update(lease.lease_id for lease in silent)
        return list({lease.lease_id: lease for lease in quiet + silent}.values())

    def fetching(self, group: str) -> list[Lease]:
        """Live leases of `group` whose holder is still fetching from upstream at the rate.

        A slow or silent lease gives up its image's slot: one fetch that never
        finishes must not hold up the image's other blobs.
        """
        now = self._clock()
        return [
            lease
            for lease in self._leases.values()
            if lease.group == group
            and not lease.fetched
            and lease.expires_at > now
            and not self.is_slow(lease, forgive_lag=False)
            and not self.is_silent(lease, forgive_lag=False)
        ]

    def acquire(
        self, digest: str, node: str, size: int | None = None, group: str | None = None
    ) -> Granted | Held:
        """`node` is the asker's identity (its certificate's name under TLS)."""
        lease = self.current(digest)
        now = self._clock()
        if lease is not None and lease.holder == node:
            # The holder asking again (it restarted, or lost our reply) keeps
            # its lease and progress; asking is a sign of life.
            lease = replace(lease, expires_at=now + self.ttl_s, renewed_at=now)
            self._put(lease)
            return Granted(lease)
        if lease is not None and not self._may_replace(lease, now):
            return Held(lease)
        self._check_cap(node)
        size = size if size is not None and size >= 0 else None
        fresh = Lease(
            digest, self._new_id(), node, now + self.ttl_s, 0, size, group, now, 0,
            renewed_at=now, acked=self.grant_ack_s <= 0,
        )
        if lease is not None:
            self._remove(lease)
            self._last_replaced[digest] = now
            self._replaced[lease.lease_id] = self.rules.why_replaced(lease, node, now, self._lag())
            if not self.is_slow(lease):  # silent, not suspect: its copy still counts
                self._passed[digest, lease.holder] = None
            while len(self._replaced) > MAX_REPLACED_REMEMBERED:
                self._replaced.popitem(last=False)
            while len(self._passed) > MAX_REPLACED_REMEMBERED:
                self._passed.popitem(last=False)
            self.replacements += 1
            fresh = replace(fresh, size=size if size is not None else lease.size)
        self._put(fresh)
        self.granted += 1
        return Granted(fresh, replaced=lease)

    def passed_from(self, digest: str, identity: str) -> bool:
        """`identity` held a lease on `digest` that was handed to another node because
        it went silent (not slow): the copy it still finishes is as good as the new
        holder's, and may file the torrent if it is first."""
        return (digest, identity) in self._passed

    def why_replaced(self, lease_id: str) -> str:
        """Why the lease `lease_id` was handed to another node ("" if it was not)."""
        return self._replaced.get(lease_id, "")

    def _may_replace(self, lease: Lease, now: float) -> bool:
        last = self._last_replaced.get(lease.digest)
        recent = last is not None and now - last < self.rate.window_s
        return (self.is_slow(lease) or self.is_silent(lease)) and not recent

    def _check_cap(self, node: str) -> None:
        cap = self.max_per_holder
        if cap is not None and self.held_by(node) >= cap:
            raise LeaseCapReached(
                f"node {node!r} holds {cap} open leases, the most one node may "
                "(max_leases_per_node): fetch this blob from upstream"
            )

    def renew(
        self,
        digest: str,
        lease_id: str,
        bytes_done: int,
        size: int | None,
        *,
        holder: str | None = None,
    ) -> Lease:
        """Extend the lease `lease_id` with the holder's progress.

        With `holder` (the caller's identity), only its own. Progress that goes
        backwards or past the size is refused and extends nothing.
        """
        lease = self.current(digest)
        if lease is None or lease.lease_id != lease_id:
            why = self._replaced.get(lease_id)
            if why is not None:
                raise LeaseLost(why)
            raise LeaseLost(f"no live lease {lease_id[:16]} on {digest}: it expired or moved on")
        check_holder(lease, holder)
        size = checked_size(lease, size)
        check_progress(lease, bytes_done, size)
        now = self._clock()
        if not lease.acked:  # the holder fetches nothing before this: its window starts now
            lease = replace(lease, mark_at=now, mark_bytes=bytes_done)
        lease = replace(
            lease, expires_at=now + self.ttl_s, bytes_done=bytes_done, size=size, renewed_at=now,
            acked=True,
        )
        lease = self.rules.judged(lease, now, self._lag())
        self._put(lease)
        return lease

    def release(self, digest: str, lease_id: str, *, holder: str | None = None) -> Lease | None:
        """Give the lease up; releasing a lease already gone is not an error.

        With `holder`, only the node holding it may (a lease id is no credential).
        """
        lease = self.current(digest)
        if lease is None or lease.lease_id != lease_id:
            return None
        check_holder(lease, holder)
        self._remove(lease)
        return lease

    def drop(self, digest: str, *, passed: bool = False) -> None:
        """Take `digest`'s lease from its holder; `passed`: the copy it still finishes
        counts (`passed_from`), as for a holder that went silent."""
        lease = self._leases.get(digest)
        if lease is not None:
            self._remove(lease)
            if passed:
                self._passed[digest, lease.holder] = None
                while len(self._passed) > MAX_REPLACED_REMEMBERED:
                    self._passed.popitem(last=False)

    def expire(self) -> list[Lease]:
        """Drop every lease whose time is up; return them."""
        now = self._clock()
        dead = [lease for lease in self._leases.values() if lease.expires_at <= now]
        for lease in dead:
            self._remove(lease)
        self.expired += len(dead)
        for digest, at in list(self._last_replaced.items()):
            if now - at >= self.rate.window_s:
                del self._last_replaced[digest]
        return dead

    def restore(self, lease: Lease) -> None:
        """Put back a lease loaded from the store after a restart (its rate window restarts)."""
        now = self._clock()
        if lease.expires_at > now:
            self._put(replace(
                lease, mark_at=now, mark_bytes=lease.bytes_done, slow=False, renewed_at=now,
                acked=True,
            ))

    def _put(self, lease: Lease) -> None:
        """File `lease` (new, or its own newer state: then it may go silent again)."""
        self._leases[lease.digest] = lease
        self._by_holder.setdefault(lease.holder, set()).add(lease.digest)
        self._told_quiet.discard(lease.lease_id)
        self._told_silent.discard(lease.lease_id)

    def _remove(self, lease: Lease) -> None:
        self._told_quiet.discard(lease.lease_id)
        self._told_silent.discard(lease.lease_id)
        del self._leases[lease.digest]
        held = self._by_holder.get(lease.holder)
        if held is not None:
            held.discard(lease.digest)
            if not held:
                del self._by_holder[lease.holder]
