"""bench/tracker's BEP 15 generator: the cluster's members announcing over UDP.

One connect, then announces with a window of `window` in flight, as fast as
replies come back, from one socket pinned to the load core; the same code for
both trackers. Each member's packet carries its `node=` in BEP 41 URL data (as
libtorrent sends a `udp://` tracker URL's query), so our tracker sees the same
identities as over HTTP; opentracker keys peers by address and port, which are
each member's own too. `walk` sends every member once in order (the warm-up
that fills the swarms); otherwise members at random for `seconds`. Holds no
assertions.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import time
from dataclasses import dataclass

from bench.tracker_load import FIRST_PORT, NUMWANT, Cluster, left, node_name, peer_id

PROTOCOL_ID = 0x41727101980
QUIET_S = 0.2  # no reply for this long: the rest of the window was lost
_FIXED = struct.Struct(">20s20sQQQIIIiH")


@dataclass(frozen=True)
class Run:
    """What one generator run got: answers, failures, peers in the answers, seconds."""

    answered: int
    errors: int
    peers: int
    seconds: float


def packets(cluster: Cluster, hashes: list[bytes], token: str | None) -> list[bytes]:
    """Every member's announce after the connection id, action and transaction id."""
    out = []
    for s, ih in enumerate(hashes):
        for j in range(cluster.per_swarm):
            i = cluster.node(s, j)
            fixed = _FIXED.pack(
                ih, peer_id(i), 0, left(j, cluster), 0, 0, 0, 0, NUMWANT, FIRST_PORT + i
            )
            url = f"/announce?node={node_name(i)}" + (f"&token={token}" if token else "")
            out.append(fixed + bytes([2, len(url)]) + url.encode() + b"\x00")
    return out


def load(port: int, members: list[bytes], seconds: float, window: int, *, walk: bool) -> Run:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(("127.0.0.1", port))
    sock.settimeout(2)
    sock.send(struct.pack(">QII", PROTOCOL_ID, 0, 1))
    _, _, cid = struct.unpack(">IIQ", sock.recv(64))
    sock.setblocking(False)
    rnd = random.Random()
    answered = errors = inflight = peers = sent = 0
    start = last_reply = time.perf_counter()
    deadline = start + seconds
    while True:
        now = time.perf_counter()
        if now >= deadline or (walk and sent == len(members) and inflight <= 0):
            break
        while inflight < window and not (walk and sent == len(members)):
            body = members[sent] if walk else rnd.choice(members)
            try:
                sock.send(struct.pack(">QII", cid, 1, sent & 0xFFFFFFFF) + body)
            except BlockingIOError:
                break
            sent += 1
            inflight += 1
        got = 0
        while True:
            try:
                reply = sock.recv(2048)
            except BlockingIOError:
                break
            got += 1
            if reply[:4] == b"\x00\x00\x00\x01":
                answered += 1
                peers += (len(reply) - 20) // 6
            else:
                errors += 1
        inflight -= got
        if got:
            last_reply = now
        elif now - last_reply > QUIET_S:
            inflight = 0  # replies lost (socket buffer overflow): refill the window
            last_reply = now
    sock.close()
    return Run(answered, errors, peers, time.perf_counter() - start)


def run_pinned(
    core: int, port: int, members: list[bytes], seconds: float, window: int, *, walk: bool
) -> Run:
    os.sched_setaffinity(0, {core})
    try:
        return load(port, members, seconds, window, walk=walk)
    finally:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
