"""Long polls on the tracker: requests waiting for news of a digest, and their wake-ups.

`Waiters` is the trio side of the lease book: a lease request told to wait (and
a reader waiting for a blob's next chunk) sleeps on its digest until `notify`
wakes it — a seeder appeared, a lease was released, expired or turned slow or
silent, an image's upstream slot came free, a manifest was shelved — or until
its deadline, its client watched for a hang-up meanwhile (tracker/hangups.py).
It holds one event per digest that has sleepers and forgets it when the last
one leaves. It must not decide anything (the lease book, the
upstream queue and the coordinator do) nor hold a sleeper past its deadline.
"""

from __future__ import annotations

import trio

from tracker.hangups import watch_client


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
        watch_client()
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
