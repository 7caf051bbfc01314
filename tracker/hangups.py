"""A long poll's client, watched for a hang-up once the poll waits.

A request held open must end when its client hangs up: a waiter must not keep
a place in an image's upstream queue, or a long-poll slot, for a node that is
gone. Watching means a task reading the connection and a read cancelled when
the answer is ready, which costs more than a relayed announce
(docs/BENCHMARKS.md, "Where a relayed request's time goes"), and most
requests never wait: a lease request is usually answered SEEDED or GRANTED
at once. So the listener hands each request a `Watch` (in a context
variable), and the code that sleeps on news (`Waiters.wait`) calls
`watch_client()` first: the listener then reads the connection until the
request is answered (a request woken and sent back to wait keeps the same
watch: starting one per wait cost ten times a wake-up, docs/BENCHMARKS.md,
"What a woken long poll costs"), and cancels the request if the client left.
Outside an HTTP request (the simulator, a test calling the desk directly) it
does nothing. It must not decide anything about the request: it only says
the client is gone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import trio

# Starts watching the request's client (once; again does nothing).
Watch = Callable[[], None]

# The watch, and the task handling the request: a task started meanwhile (a
# store's writer, say) copies the context, but must never read that connection.
_current: ContextVar[tuple[Watch, trio.lowlevel.Task] | None] = ContextVar(
    "p2preg_tracker_hangup_watch", default=None
)


@contextmanager
def watched(watch: Watch) -> Iterator[None]:
    """The request this task handles inside this block has its client watched by `watch`."""
    token = _current.set((watch, trio.lowlevel.current_task()))
    try:
        yield
    finally:
        _current.reset(token)


def watch_client() -> None:
    """Before a wait for news: from now until it is answered, the request ends if its
    client hangs up (when this task is handling a request)."""
    current = _current.get()
    if current is not None and current[1] is trio.lowlevel.current_task():
        current[0]()
