"""When metainfo that nobody announces is forgotten (sans-IO, over the caller's clock).

`IdleMetainfo` remembers, for each digest with metainfo, since when it has
been idle: no live peer in its swarm, no lease on it, no write of it in flight
(the caller's `in_use` says which). A digest idle for `idle_s` is due to be
forgotten; a pinned one never is. Peers announce at least every interval
they were told and live their lifetime after (`peer_ttl_s`; a known seeder's,
intervals.py, is 1.25 x `seeder_announce_interval_s`), so "no live peer since
T" means "no announce since T - lifetime" at the latest: expiry comes `idle_s`
to `idle_s` + that lifetime after the last announce. One call looks at a batch of
at most `SCAN_BATCH` digests (a cursor goes round them), so a sweep over a
million digests never holds the event loop for long; a full pass takes
`len / SCAN_BATCH` sweeps, which adds to the idle time, never subtracts. The
digests it returns are checked lazily, one at a time, so the caller may await
between them. It must not change the registry, peers or the store: the
coordinator's sweep does, and persists the removal.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

# Digests looked at per sweep (every few seconds): well under a millisecond each.
SCAN_BATCH = 20_000


class IdleMetainfo:
    def __init__(self, idle_s: float, pinned: Iterable[str] = ()) -> None:
        if idle_s <= 0:
            raise ValueError("idle_s must be > 0")
        self.idle_s = idle_s
        self.pinned = frozenset(pinned)
        # Digest → since when it has been idle (first seen idle, or last seen in use).
        self._idle_since: dict[str, float] = {}
        self._pending: list[str] = []

    def expired(
        self, digests: Callable[[], list[str]], in_use: Callable[[str], bool], now: float
    ) -> Iterator[str]:
        """The digests of this batch that have been idle for `idle_s`, lazily.

        `digests` lists every digest with metainfo (called when a pass starts);
        `in_use(d)` is asked when `d`'s turn comes. A digest yielded is forgotten
        here: the caller removes it (if it still may).
        """
        if not self._pending:
            known = digests()
            self._pending = known[::-1]  # popped from the end: first digest first
            # Forget what left the registry by other means since the last pass.
            present = set(known)
            for gone in [d for d in self._idle_since if d not in present]:
                del self._idle_since[gone]
        for _ in range(min(SCAN_BATCH, len(self._pending))):
            digest = self._pending.pop()
            if digest in self.pinned:
                continue
            if in_use(digest):
                self._idle_since[digest] = now
                continue
            since = self._idle_since.setdefault(digest, now)
            if now - since >= self.idle_s:
                del self._idle_since[digest]
                yield digest

    def idle_since(self, digest: str) -> float | None:
        return self._idle_since.get(digest)
