"""The tracker's UDP socket: BEP 15 datagrams in, answers out, in one loop.

Reads every datagram that is waiting, answers each synchronously (`answer`
never awaits) and only then yields to trio, so a burst costs one wake-up, not
one task per packet. A reply that does not fit the socket buffer is dropped —
the client retries, as BEP 15 expects over UDP. This module owns the socket
only; decoding and policy are udp.py's and the service's.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable

import trio

# Datagrams handled per wake-up before letting other tasks run.
RECV_BATCH = 256
MAX_DATAGRAM = 2048

# (datagram, client address) → reply datagram, or None to stay silent.
Answer = Callable[[bytes, tuple[str, int]], bytes | None]


async def serve_udp(
    sock: socket.socket,
    answer: Answer,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve on `sock` (bound) until cancelled; closes it at the end."""
    sock.setblocking(False)
    task_status.started()
    try:
        while True:
            await trio.lowlevel.wait_readable(sock)
            for _ in range(RECV_BATCH):
                try:
                    packet, addr = sock.recvfrom(MAX_DATAGRAM)
                except BlockingIOError:
                    break
                except OSError:
                    # An ICMP error from an earlier reply surfaces here; the
                    # socket itself is fine.
                    continue
                reply = answer(packet, addr[:2])
                if reply is not None:
                    with contextlib.suppress(OSError):
                        sock.sendto(reply, addr)
            await trio.lowlevel.checkpoint()
    finally:
        sock.close()
