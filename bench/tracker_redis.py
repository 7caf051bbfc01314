"""What a Redis store costs the tracker benchmark's announces: Redis commands and Redis CPU.

Owns starting the store a benchmarked tracker is given (`--store redis://…`):
a real redis-server from harness/redis.py on its own loopback port, with a
password the tracker reads from a file (mode 0600), pinned to the tracker's
core, stopped by pid after; waiting until the tracker serves (`/readyz` 200,
a replica that took its term); and reading Redis's own counters around a load:
`INFO stats cpu commandstats` before and after, as one `RedisStats` each. The
arithmetic is pure (`parse_info`, `cost_between`): commands are
`total_commands_processed`, which counts the commands a script runs as well
as the script itself, less the snapshots' own (the first one's INFO and the
second one's AUTH fall between them); CPU is `used_cpu_sys` + `used_cpu_user`.
Holds no assertions on speed and knows nothing of what the tracker keeps.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from harness.procs import wait_until
from harness.redis import RedisServer, start_redis
from tracker.replica import PEER_FLUSH_S

# The commands one snapshot sends that the next one counts: redis-cli with a
# password sends AUTH, then INFO (each reply counts what came before it).
PROBE_COMMANDS: Mapping[str, int] = {"info": 1, "auth": 1}
READY_TIMEOUT_S = 30.0
# The serving replica writes its peers' changes a flush period after they come:
# a snapshot taken this long after announces stop counts all of their writes.
SETTLE_S = PEER_FLUSH_S + 0.5


@dataclass(frozen=True)
class RedisStats:
    """One `INFO stats cpu commandstats` reply: the counters a cost is taken between."""

    total_commands: int
    cpu_s: float
    calls: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class RedisCost:
    """What Redis did between two snapshots, the snapshots' own commands left out."""

    commands: int
    cpu_s: float
    calls: Mapping[str, int] = field(default_factory=dict)

    def commands_per(self, announces: int) -> float:
        return self.commands / announces if announces > 0 else float("nan")

    def cpu_us_per(self, announces: int) -> float:
        return self.cpu_s * 1e6 / announces if announces > 0 else float("nan")


def parse_info(lines: Sequence[str]) -> RedisStats:
    """A `RedisStats` from INFO's lines; ValueError if a counter is missing or malformed."""
    fields: dict[str, str] = {}
    for line in lines:
        key, sep, value = line.strip().partition(":")
        if sep and not key.startswith("#"):
            fields[key] = value
    try:
        total = int(fields["total_commands_processed"])
        cpu = float(fields["used_cpu_sys"]) + float(fields["used_cpu_user"])
        calls = {}
        for key, value in fields.items():
            if key.startswith("cmdstat_"):
                stats = dict(part.partition("=")[::2] for part in value.split(","))
                calls[key.removeprefix("cmdstat_")] = int(stats["calls"])
    except (KeyError, ValueError) as e:
        raise ValueError(f"not an INFO stats/cpu/commandstats reply: {e}") from None
    return RedisStats(total, cpu, calls)


def cost_between(
    before: RedisStats, after: RedisStats, probe: Mapping[str, int] = PROBE_COMMANDS
) -> RedisCost:
    """Commands and CPU from `before` to `after`, less `probe` (the snapshots' own commands).

    ValueError if a counter went back (a restarted server, or the snapshots swapped).
    """
    commands = after.total_commands - before.total_commands - sum(probe.values())
    calls = {}
    for name, n in after.calls.items():
        calls[name] = n - before.calls.get(name, 0) - probe.get(name, 0)
    if commands < 0 or after.cpu_s < before.cpu_s or any(n < 0 for n in calls.values()):
        raise ValueError("a Redis counter went back between the snapshots")
    return RedisCost(commands, after.cpu_s - before.cpu_s, {k: v for k, v in calls.items() if v})


@dataclass(frozen=True)
class RedisUnderTest:
    """A running redis-server and the tracker flags that make a tracker use it."""

    server: RedisServer
    tracker_args: tuple[str, ...]

    def stats(self) -> RedisStats:
        return parse_info(self.server.cli("INFO", "stats", "cpu", "commandstats"))

    def settled_stats(self) -> RedisStats:
        """A snapshot once the tracker's last announces are written (`SETTLE_S` from now)."""
        time.sleep(SETTLE_S)
        return self.stats()

    def cost_since(self, before: RedisStats) -> RedisCost:
        """What Redis did from `before` until the last announces' writes are in."""
        return cost_between(before, self.settled_stats())


@contextmanager
def open_redis_store(workdir: Path, *, core: int | None) -> Iterator[RedisUnderTest]:
    """A redis-server with a fresh password under `workdir` (pinned to `core`, if given)."""
    password = secrets.token_urlsafe(24)
    secret = workdir / "store-password"
    workdir.mkdir(parents=True, exist_ok=True)
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(password)
    with start_redis(workdir / "redis", password=password) as server:
        if core is not None:
            os.sched_setaffinity(server.pid, {core})
        args = ("--store", server.url(), "--store-password-file", str(secret))
        yield RedisUnderTest(server, args)


def wait_serving(url: str, *, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Wait until the tracker at `url` (plain: its main or metrics listener) answers /readyz 200."""

    def ready() -> bool:
        try:
            return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(ready, timeout_s=timeout_s, what=f"the tracker at {url} to serve (/readyz)")
