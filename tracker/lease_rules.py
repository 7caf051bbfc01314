"""How a lease is judged: the record of one lease, and the windows its holder must keep.

`Lease` is what the lease book keeps of one holder's lease on one digest: its
progress, its rate window, its last sign of life. `LeaseRules` judges it, as
pure functions of the lease, the time and the tracker's lag. A holder that
keeps its lease alive without keeping up `min_bytes_s` over `window_s`
(`RateRule`) is *slow*. One that sent no sign of life (the grant, a renewal,
asking again) for `silence_s`, far sooner than its TTL, is *silent*; so is a
grant never renewed (it went into a long poll whose node died), found sooner:
a grant is provisional until the holder's first renewal after it (a node sends
it at once, before fetching anything), and one not acknowledged within
`grant_ack_s` counts as silent. Both windows count only silence the tracker can
blame on the holder: the caller passes the tracker's own lag (seconds: how late
it is running the requests it has, lagmeter.py), which lengthens each, so a
tracker behind its queue does not take a live holder over whose renewal waits
in that queue. The rate window forgives that lag too, and starts at the
acknowledgement, since a holder fetches nothing before it. This module also
refuses the renewals the book must not take (another identity's, a changed
size, progress that goes backwards or past the size) and words why a lease was
handed over. It must not keep leases, decide who gets one or read a clock
(leases.py's `LeaseBook` does).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from p2preg.core.errors import Forbidden, InvalidRequest


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
    # The start of the current rate window: when, and `bytes_done` then.
    mark_at: float = 0.0
    mark_bytes: int = 0
    # A renewal found the progress since `mark_at` below the minimum rate.
    slow: bool = False
    # The holder's last sign of life: the grant, a renewal, asking again.
    renewed_at: float = 0.0
    # A renewal since the grant: the holder has it (not persisted; a restored
    # lease counts as acknowledged).
    acked: bool = True

    @property
    def fetched(self) -> bool:
        """The holder reported every byte: it no longer uses the upstream link."""
        return self.size is not None and self.bytes_done >= self.size


@dataclass(frozen=True, slots=True)
class RateRule:
    """A holder must fetch `min_bytes_s` on average over each `window_s`; 0: no rule."""

    min_bytes_s: int = 0
    window_s: float = 30.0

    def falls_short(self, done: int, since: float, now: float) -> bool:
        """`done` bytes over `since`..`now` (at least one window) are below the rate."""
        return done < self.min_bytes_s * (now - since)


# No minimum rate: holders are held to the TTL and the silence only.
NO_RATE_RULE = RateRule()


@dataclass(frozen=True, slots=True)
class LeaseRules:
    """What a holder is held to. `silence_s` 0: only the TTL ends a silent lease;
    `grant_ack_s` 0: a grant needs no acknowledgement (only `silence_s` counts).

    Each judgement takes `lag`, the tracker's own lateness to forgive (0: none).
    """

    ttl_s: float
    rate: RateRule = NO_RATE_RULE
    silence_s: float = 0.0
    grant_ack_s: float = 0.0

    def is_slow(self, lease: Lease, now: float, lag: float) -> bool:
        """Below the minimum rate: a renewal said so, or none moved the window on in time.

        The second case is a holder that keeps its lease alive by asking again
        instead of renewing: one window plus one TTL (the renewals' slack) is
        all an honest holder needs to report a window's progress.
        """
        if self.rate.min_bytes_s <= 0:
            return False
        span = now - lease.mark_at - lag
        return lease.slow or span >= self.rate.window_s + self.ttl_s

    def is_silent(self, lease: Lease, now: float, lag: float) -> bool:
        """No sign of life from the holder for `silence_s`: dead, hung, or cut off;
        or a grant it did not acknowledge within `grant_ack_s`. Each window is
        lengthened by `lag`: the tracker's lateness is not the holder's."""
        if not (self.silence_s > 0 or (not lease.acked and self.grant_ack_s > 0)):
            return False
        quiet = now - lease.renewed_at - lag
        if not lease.acked and self.grant_ack_s > 0 and quiet >= self.grant_ack_s:
            return True
        return self.silence_s > 0 and quiet >= self.silence_s

    def judged(self, lease: Lease, now: float, lag: float) -> Lease:
        """Once a window has passed since the mark: a new window, or slow for good."""
        if lease.slow or self.rate.min_bytes_s <= 0 or now - lease.mark_at < self.rate.window_s:
            return lease
        # A fetch that ended within this window kept up; the next window is the
        # time it may take to publish and seed.
        finished_now = lease.fetched and lease.mark_bytes < lease.bytes_done
        done = lease.bytes_done - lease.mark_bytes
        # Renewals the tracker runs late make the span look longer than it was.
        until = max(lease.mark_at, now - lag)
        if finished_now or not self.rate.falls_short(done, lease.mark_at, until):
            return replace(lease, mark_at=now, mark_bytes=lease.bytes_done)
        return replace(lease, slow=True)

    def why_replaced(self, lease: Lease, by: str, now: float, lag: float) -> str:
        """Why `lease` was handed to `by` (slow, unacknowledged or silent), for its holder."""
        if self.is_slow(lease, now, lag):
            span = max(now - lease.mark_at, 1e-9)
            got = (lease.bytes_done - lease.mark_bytes) / span
            return (
                f"lease on {lease.digest} handed from {lease.holder!r} to {by!r}: {got:.0f} B/s "
                f"over {span:.0f} s is below the minimum {self.rate.min_bytes_s} B/s "
                "(lease_min_rate_bytes_s)"
            )
        if not lease.acked:
            return (
                f"lease on {lease.digest} handed from {lease.holder!r} to {by!r}: the grant was "
                f"not acknowledged within {self.grant_ack_s:g} s (lease_grant_ack_s) plus the "
                f"tracker's lag {lag:.1f} s"
            )
        return (
            f"lease on {lease.digest} handed from {lease.holder!r} to {by!r}: no renewal for "
            f"{now - lease.renewed_at:.1f} s (lease_silence_s {self.silence_s:g} plus the "
            f"tracker's lag {lag:.1f} s)"
        )


def check_holder(lease: Lease, holder: str | None) -> None:
    """With `holder` (the caller's identity), only the lease's own holder may act on it."""
    if holder is not None and lease.holder != holder:
        raise Forbidden(f"the lease on {lease.digest} is held by another node, not {holder!r}")


def checked_size(lease: Lease, size: int | None) -> int | None:
    """The blob's size, once known, is the lease's for good."""
    if size is None or size < 0:
        return lease.size
    if lease.size is not None and size != lease.size:
        raise InvalidRequest(f"lease on {lease.digest}: size {size} is not its size {lease.size}")
    return size


def check_progress(lease: Lease, bytes_done: int, size: int | None) -> None:
    """Progress only grows, and never past the blob's size."""
    if bytes_done < lease.bytes_done:
        raise InvalidRequest(
            f"lease on {lease.digest}: bytes_done {bytes_done} is below the "
            f"{lease.bytes_done} already reported; progress only grows"
        )
    if size is not None and bytes_done > size:
        raise InvalidRequest(
            f"lease on {lease.digest}: bytes_done {bytes_done} is past the blob's size {size}"
        )
