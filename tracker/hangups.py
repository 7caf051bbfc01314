"""A long poll's client, watched for a hang-up only while the poll waits.

A request held open must end when its client hangs up: a waiter must not keep
a place in an image's upstream queue, or a long-poll slot, for a node that is
gone. Watching means a task reading the connection and a read cancelled when
the answer is ready, which costs more than a relayed announce
(docs/BENCHMARKS.md, "Where a relayed request's time goes"), and most
requests never wait: a lease request is usually answered SEEDED or GRANTED
at once. So the listener hands each request a `Watch` (in a context
variable), and the code that sleeps on news (`Waiters.wait`) enters
`while_waiting()`: only then does the listener read the connection, and it
cancels the request if the client left. Outside an HTTP request (the
simulator, a test calling the desk directly) entering it does nothing. It
must not decide anything about the request: it only says the client is gone.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from contextvars import ContextVar

import trio

# Entered around a wait: cancels the request if its client hangs up meanwhile.
Watch = Callable[[], AbstractAsyncContextManager[None]]

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


@asynccontextmanager
async def while_waiting() -> AsyncIterator[None]:
    """Around a wait for news: the client is watched meanwhile (when this task is
    handling a request)."""
    current = _current.get()
    if current is None or current[1] is not trio.lowlevel.current_task():
        yield
        return
    async with current[0]():
        yield
