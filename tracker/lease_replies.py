"""What a lease request or renewal is answered: `LeaseReply` messages made from the lease book.

Owns the one rule that a lease id appears only in a GRANTED reply — which the
coordinator sends only to the holder's own identity — and what a waiting node
is shown: the holder, its progress, the digest whose fetch it waits for (for a
queued request, the image's fetch ahead) and the minimum rate the book holds
holders to, from which the node derives its absolute bound. Sans-IO: pure
functions of a `LeaseBook`, a lease and the time; it must not decide who gets
a lease (leases.py and upstream_queue.py do) or touch the store.
"""

from __future__ import annotations

from p2preg.core import wire
from tracker.leases import Lease, LeaseBook
from tracker.upstream_queue import QUEUE_RECHECK_S, Queued


def granted(
    book: LeaseBook, lease: Lease, replaced: Lease | None = None, *, verify: bool = False
) -> wire.LeaseReply:
    """To `lease`'s holder only: its id, and whom it took the fetch over from, if anyone.

    `verify`: the fetch settles a dispute over the digest's torrent (VERIFY).
    """
    by = None if replaced is None else replaced.holder
    status = wire.LeaseStatus.VERIFY if verify else wire.LeaseStatus.GRANTED
    return _reply(book, status, lease, lease_id=lease.lease_id, replaced=by)


def held(book: LeaseBook, lease: Lease, now: float) -> wire.LeaseReply:
    """WAIT for another node's `lease`: ask again by the time it could pass on."""
    retry = min(book.ttl_s, max(1.0, lease.expires_at - now))
    return _reply(book, wire.LeaseStatus.WAIT, lease, retry_after_s=retry)


def queued(book: LeaseBook, waiting: Queued, now: float) -> wire.LeaseReply:
    """WAIT for the image's slot; the holder and progress shown are those of the fetch ahead."""
    if waiting.ahead is not None:
        return held(book, waiting.ahead, now)
    return wire.LeaseReply(
        wire.LeaseStatus.WAIT,
        ttl_s=book.ttl_s,
        retry_after_s=QUEUE_RECHECK_S,
        min_rate_bytes_s=book.rate.min_bytes_s,
        rate_window_s=book.rate.window_s,
        silence_s=book.silence_s,
    )


def _reply(
    book: LeaseBook,
    status: wire.LeaseStatus,
    lease: Lease,
    *,
    lease_id: str | None = None,
    retry_after_s: float = 0.0,
    replaced: str | None = None,
) -> wire.LeaseReply:
    return wire.LeaseReply(
        status,
        lease_id=lease_id,
        ttl_s=book.ttl_s,
        retry_after_s=retry_after_s,
        holder=lease.holder,
        bytes_done=lease.bytes_done,
        size=lease.size,
        digest=lease.digest,
        min_rate_bytes_s=book.rate.min_bytes_s,
        rate_window_s=book.rate.window_s,
        replaced=replaced,
        silence_s=book.silence_s,
    )
