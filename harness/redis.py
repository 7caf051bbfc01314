"""Debian's redis-server and redis-sentinel as real processes, for the tracker's shared store.

Owns starting a Redis on a free loopback port with its own directory and config
file under a work directory (no persistence unless asked), a replica of another
(`replicaof`, `masterauth`), and a group of Sentinels watching a primary, each
with its own config file (Sentinel rewrites it); waiting, always with a bound,
until a replica has synced, until the Sentinels know each other and the
replicas, and until they have promoted a new primary; and stopping or killing
(-9) each by its own pid. Passwords go into the config files (mode 0600), never
onto a command line or into an error. It asks the servers with `redis-cli`; it
knows nothing of what the tracker keeps in Redis.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from harness.procs import Process, ProcessError, WaitTimeout, clean_env, free_port, wait_until

__all__ = [
    "REDIS_CLI",
    "REDIS_SENTINEL_BIN",
    "REDIS_SERVER_BIN",
    "RedisServer",
    "SentinelGroup",
    "SentinelServer",
    "redis_cli",
    "start_redis",
    "start_sentinels",
    "wait_for_failover",
]

REDIS_SERVER_BIN = Path("/usr/bin/redis-server")
REDIS_SENTINEL_BIN = Path("/usr/bin/redis-sentinel")
REDIS_CLI = Path("/usr/bin/redis-cli")

_HOST = "127.0.0.1"
_CLI_TIMEOUT_S = 3.0


def redis_cli(host: str, port: int, *args: str, password: str | None = None) -> list[str]:
    """Run one `redis-cli` command against host:port; its reply, one element a line.

    The password travels in REDISCLI_AUTH, never in argv. Raises ProcessError if
    redis-cli cannot connect or the server answers with an error.
    """
    env = clean_env()
    env.pop("REDISCLI_AUTH", None)
    if password is not None:
        env["REDISCLI_AUTH"] = password
    argv = [os.fspath(REDIS_CLI), "-h", host, "-p", str(port), *args]
    try:
        done = subprocess.run(
            argv, env=env, capture_output=True, timeout=_CLI_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise ProcessError(f"redis-cli {host}:{port} {args[0]}: no answer") from e
    out = done.stdout.decode("utf-8", "replace")
    # redis-cli exits 0 on a server error reply, and writes it to stdout.
    if done.returncode != 0 or out.startswith(("ERR", "NOAUTH", "WRONGPASS", "Could not")):
        detail = (out + done.stderr.decode("utf-8", "replace")).strip()
        raise ProcessError(f"redis-cli {host}:{port} {args[0]}: {detail}")
    return out.splitlines()


def _pairs(lines: Sequence[str]) -> dict[str, str]:
    """A flat key/value reply (SENTINEL MASTER) as a dict."""
    return dict(zip(lines[::2], lines[1::2], strict=False))


def _info(host: str, port: int, section: str, password: str | None) -> dict[str, str]:
    fields = {}
    for line in redis_cli(host, port, "INFO", section, password=password):
        key, sep, value = line.strip().partition(":")
        if sep:
            fields[key] = value
    return fields


def _write_private(path: Path, text: str) -> None:
    """Write a config that may hold a password: readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


class _Server:
    """What a redis-server and a redis-sentinel share: a Process on host:port."""

    def __init__(self, host: str, port: int, workdir: Path, process: Process) -> None:
        self.host = host
        self.port = port
        self.workdir = workdir
        self.process = process

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    def stop(self) -> int | None:
        """Stop by pid: SIGTERM, then SIGKILL after the grace period."""
        return self.process.stop()

    def kill(self, timeout_s: float = 10.0) -> None:
        """SIGKILL by pid, as a crash: no shutdown, no goodbye to replicas or clients."""
        if self.running:
            os.kill(self.pid, signal.SIGKILL)
        wait_until(lambda: not self.running, timeout_s=timeout_s, what=f"{self!r} to die")
        self.process.stop()  # reaps it and closes nothing else

    def __enter__(self) -> _Server:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.host}:{self.port} pid={self.process.pid}>"


class RedisServer(_Server):
    """A running redis-server; see `start_redis`. `url` carries no password."""

    def __init__(
        self,
        host: str,
        port: int,
        workdir: Path,
        process: Process,
        *,
        password: str | None,
        persist: bool,
    ) -> None:
        super().__init__(host, port, workdir, process)
        self.password = password
        self.persist = persist

    def url(self, db: int = 0) -> str:
        return f"redis://{self.host}:{self.port}/{db}"

    def cli(self, *args: str) -> list[str]:
        """One redis-cli command against this server, with its password."""
        return redis_cli(self.host, self.port, *args, password=self.password)

    def role(self) -> str:
        """'master' or 'slave', as INFO replication says."""
        return _info(self.host, self.port, "replication", self.password).get("role", "")

    def restart(self, *, start_timeout_s: float = 10.0) -> RedisServer:
        """Stop this server if it runs, and start a new one on the same port and directory.

        It comes back as a primary (a replica it had been is not restored); with
        `persist` its data comes back too.
        """
        self.stop()
        return start_redis(
            self.workdir,
            password=self.password,
            port=self.port,
            persist=self.persist,
            start_timeout_s=start_timeout_s,
        )

    def __enter__(self) -> RedisServer:
        return self


def _redis_conf(
    workdir: Path,
    port: int,
    *,
    password: str | None,
    replica_of: RedisServer | None,
    persist: bool,
) -> str:
    lines = [
        f"port {port}",
        f"bind {_HOST}",
        "daemonize no",
        f"dir {workdir}",
        # Logs go to stdout, which the Process sends to <workdir>/redis.log.
        'logfile ""',
        'save ""',
        f"appendonly {'yes' if persist else 'no'}",
        "appendfsync always",
        # A replica's first sync starts at once, not after the default 5 s wait for others.
        "repl-diskless-sync-delay 0",
    ]
    if password is not None:
        # masterauth too: after a failover a former primary rejoins as a replica.
        lines += [f"requirepass {password}", f"masterauth {password}"]
    if replica_of is not None:
        lines.append(f"replicaof {replica_of.host} {replica_of.port}")
    return "\n".join(lines) + "\n"


def start_redis(
    workdir: Path,
    *,
    password: str | None = None,
    replica_of: RedisServer | None = None,
    port: int | None = None,
    persist: bool = False,
    start_timeout_s: float = 10.0,
) -> RedisServer:
    """Start a redis-server on 127.0.0.1 (a free port unless given), files under `workdir`.

    With `replica_of` it replicates that server (and takes its password unless
    given one) and returns once the link is up and the first sync is done.
    `persist` keeps an append-only file, so `restart()` brings the data back.
    Use it as a context manager, or call `stop()`.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    if replica_of is not None and password is None:
        password = replica_of.password
    port = port or free_port()
    conf = workdir / "redis.conf"
    _write_private(
        conf, _redis_conf(workdir, port, password=password, replica_of=replica_of, persist=persist)
    )
    proc = Process([REDIS_SERVER_BIN, conf], workdir, name="redis").start()
    server = RedisServer(_HOST, port, workdir, proc, password=password, persist=persist)
    try:
        wait_until(
            lambda: _answers_ping(server),
            timeout_s=start_timeout_s,
            what=f"redis-server {_HOST}:{port}",
            process=proc,
        )
        if replica_of is not None:
            wait_until(
                lambda: _replica_synced(server),
                timeout_s=start_timeout_s,
                what=f"replica {_HOST}:{port} of {replica_of.host}:{replica_of.port} to sync",
                process=proc,
            )
    except BaseException:
        proc.stop()
        raise
    return server


def _answers_ping(server: RedisServer) -> bool:
    try:
        # While loading its data Redis answers LOADING, which redis_cli raises as an error.
        return server.cli("PING") == ["PONG"]
    except ProcessError:
        return False


def _replica_synced(server: RedisServer) -> bool:
    try:
        info = _info(server.host, server.port, "replication", server.password)
    except ProcessError:
        return False
    return info.get("master_link_status") == "up" and info.get("master_sync_in_progress") == "0"


class SentinelServer(_Server):
    """One running redis-sentinel (no password of its own); see `start_sentinels`."""

    def primary_address(self, service: str) -> tuple[str, int] | None:
        """What this sentinel answers to SENTINEL GET-MASTER-ADDR-BY-NAME, None if unknown."""
        reply = redis_cli(self.host, self.port, "SENTINEL", "get-master-addr-by-name", service)
        if len(reply) != 2:
            return None
        return (reply[0], int(reply[1]))

    def primary_state(self, service: str) -> dict[str, str]:
        """SENTINEL MASTER <service>: flags, num-slaves, num-other-sentinels, …"""
        return _pairs(redis_cli(self.host, self.port, "SENTINEL", "master", service))

    def __enter__(self) -> SentinelServer:
        return self


@dataclass(frozen=True)
class SentinelGroup:
    """The Sentinels watching one primary under `service`; iterate for the members."""

    service: str
    members: tuple[SentinelServer, ...]
    password: str | None = field(default=None, repr=False)

    def __iter__(self) -> Iterator[SentinelServer]:
        return iter(self.members)

    def __len__(self) -> int:
        return len(self.members)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [s.address for s in self.members]

    def url(self, db: int | None = None) -> str:
        """`redis+sentinel://H1:P1,H2:P2,H3:P3/SERVICE[/DB]`, without the password."""
        hosts = ",".join(f"{h}:{p}" for h, p in self.addresses)
        return f"redis+sentinel://{hosts}/{self.service}" + (f"/{db}" if db is not None else "")

    def stop(self) -> None:
        for member in self.members:
            member.stop()

    def __enter__(self) -> SentinelGroup:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _sentinel_conf(
    workdir: Path,
    port: int,
    primary: RedisServer,
    *,
    service: str,
    quorum: int,
    down_after_ms: int,
    failover_timeout_ms: int,
) -> str:
    lines = [
        f"port {port}",
        f"bind {_HOST}",
        "daemonize no",
        f"dir {workdir}",
        'logfile ""',
        # Announce the loopback address the others reach this one on, as in a pod.
        f"sentinel announce-ip {_HOST}",
        f"sentinel announce-port {port}",
        f"sentinel monitor {service} {primary.host} {primary.port} {quorum}",
        f"sentinel down-after-milliseconds {service} {down_after_ms}",
        f"sentinel failover-timeout {service} {failover_timeout_ms}",
        f"sentinel parallel-syncs {service} 1",
    ]
    if primary.password is not None:
        lines.append(f"sentinel auth-pass {service} {primary.password}")
    return "\n".join(lines) + "\n"


def start_sentinels(
    workdir: Path,
    primary: RedisServer,
    count: int = 3,
    service: str = "p2preg",
    down_after_ms: int = 1000,
    failover_timeout_ms: int = 10_000,
    *,
    quorum: int | None = None,
    start_timeout_s: float = 30.0,
) -> SentinelGroup:
    """Start `count` redis-sentinels on 127.0.0.1 watching `primary` as `service`.

    Each has its own directory `workdir/sentinel-<i>` and config file there.
    The quorum is a majority unless given. Returns once every sentinel knows
    the primary, the replicas it has now and all the other sentinels, so that a
    failover can begin as soon as the primary is gone.
    """
    if count < 1:
        raise ValueError(f"start_sentinels: count must be at least 1, not {count}")
    quorum = quorum if quorum is not None else count // 2 + 1
    replicas = int(
        _info(primary.host, primary.port, "replication", primary.password).get(
            "connected_slaves", "0"
        )
    )
    members: list[SentinelServer] = []
    try:
        for i in range(count):
            home = workdir / f"sentinel-{i}"
            port = free_port()
            conf = home / "sentinel.conf"
            _write_private(
                conf,
                _sentinel_conf(
                    home,
                    port,
                    primary,
                    service=service,
                    quorum=quorum,
                    down_after_ms=down_after_ms,
                    failover_timeout_ms=failover_timeout_ms,
                ),
            )
            proc = Process([REDIS_SENTINEL_BIN, conf], home, name="sentinel").start()
            members.append(SentinelServer(_HOST, port, home, proc))
        for member in members:
            wait_until(
                functools.partial(_sentinel_ready, member, service, count - 1, replicas),
                timeout_s=start_timeout_s,
                what=f"sentinel {member.host}:{member.port} to see {count - 1} others "
                f"and {replicas} replicas",
                process=member.process,
                interval_s=0.2,
            )
    except BaseException:
        for member in members:
            member.stop()
        raise
    return SentinelGroup(service, tuple(members), primary.password)


def _sentinel_ready(member: SentinelServer, service: str, others: int, replicas: int) -> bool:
    try:
        state = member.primary_state(service)
    except ProcessError:
        return False
    return (
        int(state.get("num-other-sentinels", "-1")) >= others
        and int(state.get("num-slaves", "-1")) >= replicas
    )


def wait_for_failover(
    sentinels: SentinelGroup, old_primary: RedisServer, timeout_s: float = 30.0
) -> tuple[str, int]:
    """Wait until every running sentinel names one new primary that says it is one.

    Returns its (host, port). Raises WaitTimeout after `timeout_s` with what each
    sentinel last said.
    """
    seen: dict[tuple[str, int], tuple[str, int] | None] = {}
    elected: list[tuple[str, int]] = []

    def promoted() -> bool:
        for member in sentinels:
            if not member.running:
                continue
            try:
                seen[member.address] = member.primary_address(sentinels.service)
            except ProcessError:
                seen[member.address] = None
        named = set(seen[m.address] for m in sentinels if m.running)
        if len(named) != 1:
            return False
        (address,) = named
        if address is None or address == old_primary.address:
            return False
        try:
            role = _info(*address, "replication", sentinels.password).get("role")
        except ProcessError:
            return False
        if role != "master":
            return False
        elected.append(address)
        return True

    try:
        wait_until(
            promoted,
            timeout_s=timeout_s,
            what="the sentinels to promote a new primary",
            interval_s=0.1,
        )
    except WaitTimeout as e:
        raise WaitTimeout(f"{e}\nsentinels said: {seen}") from None
    return elected[-1]
