"""Per-identity quotas and the tracker's admission caps, sans-IO over a clock.

Owns three small books. `RateBook`: a token bucket per (kind, identity) for the
control requests that cost the tracker a commit or memory — publish, report
and lease (asking for, renewing and releasing one) — so an identity that
floods is refused (`RateLimited`, 429, which a node reads as "the tracker is
unavailable for this" and goes upstream) while every other identity's buckets
are untouched: a tracker full for one identity is open for the others. A
request costs a token per started 64 KiB of its body (a forged metainfo of a
MiB costs 17, an honest one of a few KiB 1; a big blob's chunk torrents will
cost one each). `LongPolls`: lease requests and chunk list reads held open, per
identity and in all; past a cap a request is answered at once instead of held, never refused.
`PreAuthConnections`: connections per client IP and in all that have not yet
completed a request (plain) or a TLS handshake; past a cap a new one is
closed. A bucket that has filled up again is forgotten, so memory follows the
identities active in the last few seconds. This module must not touch
sockets, HTTP or the store; the listener and the routes call it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from p2preg.core import errors

if TYPE_CHECKING:
    from tracker.config import TrackerConfig
    from tracker.metrics import TrackerMetrics

# Full buckets are forgotten when the book has grown by half since the last
# time, and never below this size: amortized O(1) per request.
PRUNE_FLOOR = 1024
# A request costs one token per started unit of its body: an honest metainfo of
# a gigabyte blob is a few KiB, a forged one may be a MiB.
COST_UNIT_BYTES = 64 * 1024


class Kind(StrEnum):
    PUBLISH = "publish"
    REPORT = "report"
    LEASE = "lease"


QUOTA_KINDS: tuple[str, ...] = tuple(k.value for k in Kind)
# Why a new connection was closed before it said anything.
PREAUTH_PER_IP = "preauth_per_ip"
PREAUTH_TOTAL = "preauth_total"
CONNECTION_REFUSALS: tuple[str, ...] = (PREAUTH_PER_IP, PREAUTH_TOTAL)


def request_cost(body_bytes: int) -> int:
    """Tokens a request with a body of `body_bytes` costs."""
    return 1 + body_bytes // COST_UNIT_BYTES


@dataclass(frozen=True, slots=True)
class Rate:
    """`per_s` tokens a second, at most `burst` saved up (and to start with)."""

    per_s: float
    burst: float

    def __post_init__(self) -> None:
        if not (self.per_s > 0 and self.burst >= 1):
            raise ValueError(f"a rate needs per_s > 0 and burst ≥ 1, got {self}")


class _Bucket:
    __slots__ = ("at", "tokens")

    def __init__(self, tokens: float, at: float) -> None:
        self.tokens = tokens
        self.at = at


class RateBook:
    def __init__(
        self,
        rates: dict[Kind, Rate],
        clock: Callable[[], float],
        refused: Callable[[str], None] = lambda kind: None,
    ) -> None:
        self._rates = rates
        self._clock = clock
        self._refused = refused
        self._buckets: dict[tuple[Kind, str], _Bucket] = {}
        self._prune_at = PRUNE_FLOOR

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, kind: Kind, who: str, cost: float = 1.0) -> None:
        """Spend `cost` of `who`'s `kind` tokens, or raise RateLimited (spending none)."""
        rate = self._rates[kind]
        if cost > rate.burst:
            raise ValueError(f"a {kind} costing {cost:g} can never fit a burst of {rate.burst:g}")
        now = self._clock()
        bucket = self._buckets.get((kind, who))
        if bucket is None:
            bucket = self._buckets[kind, who] = _Bucket(rate.burst, now)
        else:
            bucket.tokens = min(rate.burst, bucket.tokens + (now - bucket.at) * rate.per_s)
            bucket.at = now
        if bucket.tokens < cost:
            self._refused(kind.value)
            wait_s = (cost - bucket.tokens) / rate.per_s
            raise errors.RateLimited(
                f"{who!r} is over its {kind} quota ({rate.per_s:g}/s, burst {rate.burst:g}); "
                f"try again in {wait_s:.1f} s"
            )
        bucket.tokens -= cost
        if len(self._buckets) >= self._prune_at:
            self._prune(now)

    def _prune(self, now: float) -> None:
        """Forget buckets that are full again: a full bucket is the same as none."""
        full = []
        for key, b in self._buckets.items():
            rate = self._rates[key[0]]
            if b.tokens + (now - b.at) * rate.per_s >= rate.burst:
                full.append(key)
        for key in full:
            del self._buckets[key]
        self._prune_at = max(PRUNE_FLOOR, len(self._buckets) * 3 // 2)


class LongPolls:
    """How many lease requests (and chunk list reads) each identity, and everyone, has held
    open."""

    def __init__(
        self, per_identity: int, total: int, shortened: Callable[[], None] = lambda: None
    ) -> None:
        self._per_identity = per_identity
        self._max = total
        self._shortened = shortened
        self._held: dict[str, int] = {}
        self.total = 0

    def held(self, who: str) -> int:
        return self._held.get(who, 0)

    @contextmanager
    def hold(self, who: str, wait_s: float) -> Iterator[float]:
        """Yield how long this request may be held: `wait_s`, or 0 past a cap."""
        if wait_s <= 0:
            yield wait_s
            return
        if self.total >= self._max or self._held.get(who, 0) >= self._per_identity:
            self._shortened()
            yield 0.0
            return
        self._held[who] = self._held.get(who, 0) + 1
        self.total += 1
        try:
            yield wait_s
        finally:
            self.total -= 1
            left = self._held[who] - 1
            if left:
                self._held[who] = left
            else:
                del self._held[who]


class Ticket:
    """One admitted connection's place until it completes a request or handshake."""

    __slots__ = ("_book", "_ip")

    def __init__(self, book: PreAuthConnections | None, ip: str) -> None:
        self._book = book
        self._ip = ip

    def release(self) -> None:
        """Give the place back; later calls do nothing."""
        book, self._book = self._book, None
        if book is not None:
            book._leave(self._ip)


class PreAuthConnections:
    """Connections per client IP, and in all, that have not yet shown who they are."""

    def __init__(
        self, total: int, per_ip: int, refused: Callable[[str], None] = lambda reason: None
    ) -> None:
        self._max = total
        self._per_ip = per_ip
        self._refused = refused
        self._by_ip: dict[str, int] = {}
        self.total = 0

    @classmethod
    def from_config(cls, config: TrackerConfig, metrics: TrackerMetrics) -> PreAuthConnections:
        book = cls(
            config.max_preauth_connections,
            config.max_preauth_connections_per_ip,
            metrics.connection_refused,
        )
        metrics.preauth_connections.set_function(lambda: book.total)
        return book

    def admit(self, ip: str) -> Ticket | None:
        """A ticket for a new connection from `ip`, or None: close it unanswered."""
        held = self._by_ip.get(ip, 0)
        if held >= self._per_ip:
            self._refused(PREAUTH_PER_IP)
            return None
        if self.total >= self._max:
            self._refused(PREAUTH_TOTAL)
            return None
        self._by_ip[ip] = held + 1
        self.total += 1
        return Ticket(self, ip)

    def held(self, ip: str) -> int:
        return self._by_ip.get(ip, 0)

    def _leave(self, ip: str) -> None:
        self.total -= 1
        left = self._by_ip[ip] - 1
        if left:
            self._by_ip[ip] = left
        else:
            del self._by_ip[ip]


class Quotas:
    """The per-identity books of one tracker: request rates, and long polls."""

    def __init__(self, rates: RateBook, long_polls: LongPolls) -> None:
        self.rates = rates
        self.long_polls = long_polls

    @classmethod
    def from_config(
        cls, config: TrackerConfig, clock: Callable[[], float], metrics: TrackerMetrics
    ) -> Quotas:
        rates = {
            Kind.PUBLISH: Rate(config.quota_publish_per_s, config.quota_publish_burst),
            Kind.REPORT: Rate(config.quota_report_per_s, config.quota_report_burst),
            Kind.LEASE: Rate(config.quota_lease_per_s, config.quota_lease_burst),
        }
        polls = LongPolls(
            config.max_long_polls_per_identity,
            config.max_long_polls,
            metrics.long_polls_shortened.inc,
        )
        metrics.long_polls.set_function(lambda: polls.total)
        return cls(RateBook(rates, clock, metrics.quota_refused), polls)

    def take(self, kind: Kind, who: str, body_bytes: int = 0) -> None:
        """Charge `who` for a `kind` request with a body of `body_bytes`, or raise RateLimited."""
        self.rates.take(kind, who, request_cost(body_bytes))
