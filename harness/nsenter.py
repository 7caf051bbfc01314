"""Entering a named network namespace, for a child program or for one call in this process.

Owns the two ways in: `netns_argv`, the argv prefix `ip netns exec NAME` (which
execs the program, so the pid stays the program's own), and `call_in_netns`,
which runs one Python call on a fresh thread that has joined the namespace with
setns(2), so every socket that call opens (httpx's included) lives there. The
calling thread never changes namespace, and a thread that joined one ends with
its call. It must not create, configure or delete namespaces (harness.netns
does that), and it never enters any namespace but the one it is named.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

__all__ = ["IP_BIN", "NetnsError", "call_in_netns", "netns_argv"]

IP_BIN = "/usr/sbin/ip"
_NETNS_DIR = "/run/netns"  # where `ip netns add` binds the namespaces it names
_CLONE_NEWNET = 0x40000000

T = TypeVar("T")


class NetnsError(RuntimeError):
    """A named namespace could not be entered."""


def netns_argv(argv: Sequence[str | os.PathLike[str]], netns: str | None) -> list[str]:
    """`argv`, run inside `netns` when one is named."""
    cmd = [os.fspath(a) for a in argv]
    return [IP_BIN, "netns", "exec", netns, *cmd] if netns else cmd


def _enter(netns: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(os.path.join(_NETNS_DIR, netns), os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetnsError(f"setns({netns}): {os.strerror(err)}")
    finally:
        os.close(fd)


def call_in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """`fn()` with its sockets in `netns` (or right here when None); its result or its error.

    The call runs on its own thread, so it must bound its own waits (every
    caller here passes a timeout to what it calls).
    """
    if netns is None:
        return fn()
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            _enter(netns)
            result.append(fn())
        except BaseException as e:
            error.append(e)

    thread = threading.Thread(target=run, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
