"""The node's hands on its own TCP sockets, libtorrent's peer connections among them.

The Python binding of libtorrent reaches no single connection: it cannot close
one, and libtorrent 2.1 never turns Nagle's algorithm off on one. Both are done
here on the socket itself, found among this process's descriptors
(`/proc/self/fd`) and reached through a duplicate of its descriptor, which is
closed again at once; the socket stays its owner's to use and close. A
descriptor its owner closed, or closed and reused, meanwhile names another
socket or none: matched by both endpoints, or merely set to what every socket
of the node gets, it is never harmed.

- `shut_connection` shuts down the one TCP connection with a given pair of
  endpoints (slowpeers.py's drop of a slow peer): libtorrent's next read ends
  and it closes the connection as a peer that hung up.
- `NoDelay.sweep` sets `TCP_NODELAY` on every TCP connection of the process
  that does not have it yet. With Nagle on, a 16 KiB block (less than one
  loopback segment) or a 17-byte request waits for the ACK of the last one,
  which the far side delays (40 ms on Linux): in the end game, where a block
  is asked for one at a time, that was ~45 ms a block, and a 200 MiB download
  with a slow peer's 32 requests to take over took 1.2 s against 0.55 s without
  it (docs/SWARM.md, "Nagle"). The node's HTTP connections (the facade, the
  tracker, upstream) are request and answer too, where Nagle only delays.
  The swarm sweeps when libtorrent starts an outgoing connection (`after`),
  and every half second (listeners, the node's HTTP connections).

It must not read or write a byte of any socket, nor close one.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from typing import Any

import libtorrent as lt

# Where this process's descriptors are listed (Linux).
OWN_FDS = "/proc/self/fd"
INET = (socket.AF_INET, socket.AF_INET6)

Endpoint = tuple[str, int]


def endpoint(address: tuple[object, ...]) -> Endpoint:
    """(host, port) as libtorrent or a socket gives it; an IPv4 address mapped into IPv6
    as the IPv4 address."""
    host = str(address[0]).removeprefix("::ffff:")
    return (host, int(str(address[1])))


def _socket_links() -> dict[str, str]:
    """Descriptor -> its link ("socket:[inode]") for every socket of the process."""
    links: dict[str, str] = {}
    try:
        names = os.listdir(OWN_FDS)
    except OSError:
        return links
    for name in names:
        try:
            link = os.readlink(f"{OWN_FDS}/{name}")
        except OSError:
            continue  # closed meanwhile, or the listing's own descriptor
        if link.startswith("socket:"):
            links[name] = link
    return links


def _tcp(name: str) -> socket.socket | None:
    """A duplicate of descriptor `name` if it is a TCP socket (the caller closes it)."""
    try:
        dup = os.dup(int(name))
    except OSError:
        return None  # closed meanwhile
    try:
        sock = socket.socket(fileno=dup)
    except OSError:  # reused meanwhile for what is no socket
        os.close(dup)
        return None
    if sock.family in INET and sock.type == socket.SOCK_STREAM:
        return sock
    sock.close()
    return None


def tcp_sockets() -> Iterator[socket.socket]:
    """A duplicate of each of this process's TCP sockets, one at a time (the caller
    closes each)."""
    for name in _socket_links():
        sock = _tcp(name)
        if sock is not None:
            yield sock


def shut_connection(local: Endpoint, remote: Endpoint) -> bool:
    """Shut down this process's TCP connection from `local` to `remote`; False if there is
    none."""
    wanted = (endpoint(local), endpoint(remote))
    for sock in tcp_sockets():
        with sock:
            try:
                if (endpoint(sock.getsockname()), endpoint(sock.getpeername())) != wanted:
                    continue
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                continue  # not connected (a listener), or reset meanwhile
            return True
    return False


class NoDelay:
    """Turns Nagle off on the process's TCP sockets, each once: on listeners (Linux
    hands it on to the connections they accept), and on connections, connected or
    not yet (libtorrent's `peer_connect_alert` for an outgoing one comes right
    after its connect began)."""

    def __init__(self) -> None:
        self._done: set[str] = set()  # the links of the sockets set (or not TCP)

    def sweep(self) -> int:
        """Set TCP_NODELAY on every TCP socket not seen before; how many were set."""
        links = _socket_links()
        self._done &= set(links.values())
        count = 0
        for name, link in links.items():
            if link in self._done:
                continue
            sock = _tcp(name)
            if sock is not None:
                with sock:
                    try:
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    except OSError:
                        continue  # closed meanwhile: gone from the next listing
                    count += 1
            self._done.add(link)
        return count

    def after(self, alerts: list[Any]) -> None:
        """Sweep if libtorrent began an outgoing connection (`peer_connect_alert`)."""
        if any(isinstance(a, lt.peer_connect_alert) for a in alerts):
            self.sweep()
