"""A small lab of network namespaces for benchmarks and tests: hosts on one bridge, shaped by `tc`.

Owns creating named network namespaces (`<prefix>-<role>`), one bridge in a
namespace of its own, one veth per host into it with an address in the
benchmarking range 198.18.0.0/15, `tc tbf` shaping of each host's link in
both directions, reading a host's link counters, and removing exactly the
namespaces it created, by name, also when setup fails half-way. Everything,
the bridge included, lives inside those namespaces: it never adds a link,
address or route to the root namespace, so parallel labs (different
prefixes) cannot collide and nothing it carries can leave the machine. It
knows nothing about what runs on the hosts: the launchers take a host's
`netns` (harness.nsenter enters it).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.nsenter import IP_BIN, netns_argv

__all__ = [
    "BENCH_NET",
    "Host",
    "Lab",
    "LabError",
    "loopback_host",
    "open_lab",
    "remove_namespaces",
    "stale_namespaces",
    "unavailable_reason",
]

BENCH_NET = ipaddress.IPv4Network("198.18.0.0/15")
"""RFC 2544's benchmarking range: the only addresses a lab hands out."""

IP = IP_BIN
TC = "/usr/sbin/tc"
_CMD_TIMEOUT_S = 20.0
# Queue at most this much time worth of bytes in a shaper before dropping.
_SHAPER_LATENCY = "50ms"


class LabError(RuntimeError):
    """A namespace, link or shaper could not be set up."""


def unavailable_reason() -> str | None:
    """Why a lab cannot be built here (not root, no `ip`/`tc`), or None if it can."""
    if os.geteuid() != 0:
        return "network namespaces need root (run as root, as CI does, or use --loopback)"
    for tool in (IP, TC):
        if not Path(tool).exists():
            return f"{tool} is missing (apt-get install iproute2), or use --loopback"
    return None


@dataclass(frozen=True)
class Host:
    """A place to run processes: a lab namespace, or the machine itself (`netns` None).

    `addr` is what other hosts connect to; on loopback every host is 127.0.0.1
    and services need ports of their own.
    """

    role: str
    addr: str
    netns: str | None = None
    ifname: str = "eth0"

    def argv(self, argv: Sequence[str | os.PathLike[str]]) -> list[str]:
        """`argv` run on this host. `ip netns exec` execs it, so its pid is the program's."""
        return netns_argv(argv, self.netns)

    @property
    def isolated(self) -> bool:
        """Whether the host has a port space of its own (fixed ports are safe)."""
        return self.netns is not None


def loopback_host(role: str) -> Host:
    return Host(role=role, addr="127.0.0.1")


def _run(argv: Sequence[str]) -> str:
    try:
        proc = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=_CMD_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise LabError(f"{' '.join(argv)}: no answer within {_CMD_TIMEOUT_S:.0f} s") from None
    if proc.returncode != 0:
        raise LabError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def _tbf(rate_mbit: float) -> list[str]:
    # A burst of ~5 ms at line rate (at least 64 KiB, so GSO super-packets pass
    # without being split into many tiny dequeues).
    burst = max(64 * 1024, int(rate_mbit * 1e6 / 8 * 0.005))
    return ["tbf", "rate", f"{rate_mbit:g}mbit", "burst", str(burst), "latency", _SHAPER_LATENCY]


class Lab:
    """Namespaces on one bridge; see `open_lab`. Not thread-safe; hosts added serially."""

    def __init__(self, prefix: str, subnet: str = "198.18.0.0/24") -> None:
        net = ipaddress.IPv4Network(subnet)
        if not net.subnet_of(BENCH_NET):
            raise LabError(f"lab subnet {subnet} is not inside {BENCH_NET}")
        if len(prefix) > 40 or not prefix.replace("-", "").isalnum():
            raise LabError(f"lab prefix {prefix!r}: letters, digits and '-' only, ≤ 40")
        self.prefix = prefix
        self.subnet = net
        self.bridge_ns = f"{prefix}-br"
        self._created: list[str] = []
        self.hosts: dict[str, Host] = {}
        self._bridge_side: dict[str, str] = {}

    def _add_netns(self, name: str) -> None:
        _run([IP, "netns", "add", name])
        self._created.append(name)
        _run([IP, "-n", name, "link", "set", "lo", "up"])
        # No IPv6 chatter (router solicitations, MLD) in the link counters.
        for conf in ("all", "default"):
            with contextlib.suppress(LabError):
                _run(
                    [
                        IP,
                        "netns",
                        "exec",
                        name,
                        "sysctl",
                        "-q",
                        "-w",
                        f"net.ipv6.conf.{conf}.disable_ipv6=1",
                    ]
                )

    def start(self) -> None:
        self._add_netns(self.bridge_ns)
        _run([IP, "-n", self.bridge_ns, "link", "add", "br0", "type", "bridge"])
        _run([IP, "-n", self.bridge_ns, "link", "set", "br0", "up"])

    def add_host(
        self,
        role: str,
        index: int,
        *,
        up_mbit: float | None = None,
        down_mbit: float | None = None,
    ) -> Host:
        """A namespace `<prefix>-<role>` at the subnet's address number `index`.

        `up_mbit` shapes what the host sends, `down_mbit` what it receives
        (the bridge side of its veth); None leaves that direction at veth speed.
        """
        if role in self.hosts or not role.replace("-", "").isalnum() or len(role) > 12:
            raise LabError(f"bad or duplicate host role {role!r}")
        addr = self.subnet.network_address + index
        if addr not in self.subnet or index in (0, self.subnet.num_addresses - 1):
            raise LabError(f"host number {index} is outside {self.subnet}")
        ns = f"{self.prefix}-{role}"
        self._add_netns(ns)
        peer = f"v-{role}"
        # Made inside the bridge namespace with its other end put straight into
        # the host's: no interface name ever exists in the root namespace.
        _run(
            [
                IP,
                "-n",
                self.bridge_ns,
                "link",
                "add",
                peer,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns,
            ]
        )
        _run([IP, "-n", self.bridge_ns, "link", "set", peer, "master", "br0", "up"])
        _run([IP, "-n", ns, "addr", "add", f"{addr}/{self.subnet.prefixlen}", "dev", "eth0"])
        _run([IP, "-n", ns, "link", "set", "eth0", "up"])
        if up_mbit is not None:
            _run([TC, "-n", ns, "qdisc", "replace", "dev", "eth0", "root", *_tbf(up_mbit)])
        if down_mbit is not None:
            _run(
                [
                    TC,
                    "-n",
                    self.bridge_ns,
                    "qdisc",
                    "replace",
                    "dev",
                    peer,
                    "root",
                    *_tbf(down_mbit),
                ]
            )
        host = Host(role=role, addr=str(addr), netns=ns)
        self.hosts[role] = host
        self._bridge_side[role] = peer
        return host

    def link_bytes(self, host: Host) -> tuple[int, int]:
        """(received, sent) bytes on the host's link, as the kernel counts them.

        Counted on the veth, so they include IP/TCP headers (once per GSO
        super-packet) but not the Ethernet preamble.
        """
        if host.netns is None:
            raise LabError(f"{host.role} is not a lab host")
        out = _run([IP, "-n", host.netns, "-s", "-j", "link", "show", "dev", host.ifname])
        stats = json.loads(out)[0]["stats64"]
        return int(stats["rx"]["bytes"]), int(stats["tx"]["bytes"])

    def shaping(self) -> dict[str, str]:
        """Each host's qdiscs, as `tc` shows them: proof of what was shaped."""
        out: dict[str, str] = {}
        for role, host in self.hosts.items():
            assert host.netns is not None
            up = _run([TC, "-n", host.netns, "qdisc", "show", "dev", "eth0"]).strip()
            down = _run(
                [TC, "-n", self.bridge_ns, "qdisc", "show", "dev", self._bridge_side[role]]
            ).strip()
            out[role] = f"up: {up} | down: {down}"
        return out

    def close(self) -> list[str]:
        """Delete every namespace this lab made (hosts first); returns failures."""
        failed: list[str] = []
        while self._created:
            name = self._created.pop()
            try:
                _run([IP, "netns", "del", name])
            except LabError as e:
                failed.append(str(e))
        return failed


@contextlib.contextmanager
def open_lab(prefix: str, subnet: str = "198.18.0.0/24") -> Iterator[Lab]:
    """A lab whose namespaces are all removed when the block exits, however it exits."""
    lab = Lab(prefix, subnet)
    try:
        lab.start()
        yield lab
    finally:
        failures = lab.close()
        if failures:
            raise LabError("could not remove: " + "; ".join(failures))


def stale_namespaces(prefix_root: str) -> list[str]:
    """Namespaces named `<prefix_root>-<pid>-…` whose pid no longer runs."""
    names: list[str] = []
    if shutil.which(IP) is None:
        return names
    with contextlib.suppress(LabError):
        for line in _run([IP, "netns", "list"]).splitlines():
            name = line.split()[0] if line.strip() else ""
            parts = name.split("-")
            if (
                len(parts) >= 3
                and parts[0] == prefix_root
                and parts[1].isdigit()
                and not Path(f"/proc/{parts[1]}").exists()
            ):
                names.append(name)
    return names


def remove_namespaces(names: Sequence[str]) -> list[str]:
    """Delete the named namespaces; returns the errors."""
    errors: list[str] = []
    for name in names:
        try:
            _run([IP, "netns", "del", name])
        except LabError as e:
            errors.append(str(e))
    return errors
