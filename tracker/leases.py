"""Upstream-fetch leases: one node per blob fetches from the seed registry.

`LeaseBook` is the sans-IO state machine (time comes from an injected clock):
a digest has at most one live lease; the holder renews it with its byte
progress; a lease nobody renews expires after `ttl_s`, and only then can
another node take it — so a slow but live holder is never overtaken.
`Waiters` is the trio side: requests long-polling for a digest sleep on it and
are woken when something changes (a seeder appears, a lease is released). This
module does not decide *whether* a lease is needed (the service checks for
seeders first) and must not persist anything (the service does, via state.py).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace

import trio

from p2preg.core.errors import Forbidden, LeaseLost


@dataclass(frozen=True, slots=True)
class Lease:
    digest: str
    lease_id: str
    holder: str
    expires_at: float
    bytes_done: int = 0
    size: int | None = None
    # The image the holder was asked for (see `LeaseBook.fetching`); not persisted.
    group: str | None = None

    @property
    def fetched(self) -> bool:
        """The holder reported every byte: it no longer uses the upstream link."""
        return self.size is not None and self.bytes_done >= self.size


@dataclass(frozen=True, slots=True)
class Granted:
    """The asker holds `lease` (new, or its own lease asked for again)."""

    lease: Lease


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
    ) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._new_id = new_id
        self._leases: dict[str, Lease] = {}
        # Totals since start, for metrics.
        self.granted = 0
        self.expired = 0

    def __len__(self) -> int:
        return len(self._leases)

    def current(self, digest: str) -> Lease | None:
        """The live lease on `digest`, if any; an expired one is dropped here."""
        lease = self._leases.get(digest)
        if lease is not None and lease.expires_at <= self._clock():
            del self._leases[digest]
            self.expired += 1
            return None
        return lease

    def fetching(self, group: str) -> list[Lease]:
        """Live leases of `group` whose holder is still fetching from upstream."""
        now = self._clock()
        return [
            lease
            for lease in self._leases.values()
            if lease.group == group and not lease.fetched and lease.expires_at > now
        ]

    def acquire(
        self, digest: str, node: str, size: int | None = None, group: str | None = None
    ) -> Granted | Held:
        lease = self.current(digest)
        now = self._clock()
        if lease is None:
            lease = Lease(digest, self._new_id(), node, now + self.ttl_s, 0, size, group)
            self._leases[digest] = lease
            self.granted += 1
            return Granted(lease)
        if lease.holder == node:
            # The holder asking again (it restarted, or lost our reply) keeps
            # its lease and progress; asking is a sign of life.
            lease = replace(lease, expires_at=now + self.ttl_s)
            self._leases[digest] = lease
            return Granted(lease)
        return Held(lease)

    def renew(
        self,
        digest: str,
        lease_id: str,
        bytes_done: int,
        size: int | None,
        *,
        holder: str | None = None,
    ) -> Lease:
        """Extend the lease `lease_id`; with `holder` (a certificate's node), only its own."""
        lease = self.current(digest)
        if lease is None or lease.lease_id != lease_id:
            raise LeaseLost(f"no live lease {lease_id[:16]} on {digest}: it expired or moved on")
        _check_holder(lease, holder)
        lease = replace(
            lease,
            expires_at=self._clock() + self.ttl_s,
            bytes_done=max(0, bytes_done),
            size=size if size is not None else lease.size,
        )
        self._leases[digest] = lease
        return lease

    def release(self, digest: str, lease_id: str, *, holder: str | None = None) -> Lease | None:
        """Give the lease up; releasing a lease already gone is not an error.

        With `holder`, only the node holding it may (a lease id is no credential).
        """
        lease = self.current(digest)
        if lease is None or lease.lease_id != lease_id:
            return None
        _check_holder(lease, holder)
        del self._leases[digest]
        return lease

    def drop(self, digest: str) -> None:
        self._leases.pop(digest, None)

    def expire(self) -> list[Lease]:
        """Drop every lease whose time is up; return them."""
        now = self._clock()
        dead = [lease for lease in self._leases.values() if lease.expires_at <= now]
        for lease in dead:
            del self._leases[lease.digest]
        self.expired += len(dead)
        return dead

    def restore(self, lease: Lease) -> None:
        """Put back a lease loaded from the store after a restart."""
        if lease.expires_at > self._clock():
            self._leases[lease.digest] = lease


def _check_holder(lease: Lease, holder: str | None) -> None:
    if holder is not None and lease.holder != holder:
        raise Forbidden(f"the lease on {lease.digest} is held by another node, not {holder!r}")


class Waiters:
    """Long-polling requests per digest; `notify` wakes every one of them."""

    def __init__(self) -> None:
        self._events: dict[str, trio.Event] = {}
        self._counts: dict[str, int] = {}

    def __contains__(self, digest: str) -> bool:
        return digest in self._events

    def notify(self, digest: str) -> None:
        event = self._events.pop(digest, None)
        if event is not None:
            event.set()

    async def wait(self, digest: str, deadline: float) -> None:
        """Sleep until `notify(digest)` or `deadline` (trio time), whichever first."""
        event = self._events.get(digest)
        if event is None:
            event = self._events[digest] = trio.Event()
        self._counts[digest] = self._counts.get(digest, 0) + 1
        try:
            with trio.move_on_at(deadline):
                await event.wait()
        finally:
            left = self._counts[digest] - 1
            if left:
                self._counts[digest] = left
            else:
                del self._counts[digest]
                if self._events.get(digest) is event:
                    del self._events[digest]
