"""nginx as the benchmarks' reference server: one worker, sendfile, one file at /blob.

Debian's nginx, as a user would run it to serve static files fast (`sendfile
on`, `tcp_nopush on`, no access log). Every benchmark that compares against
nginx writes its configuration and starts it here (on loopback, or inside a
network namespace), so they all compare against the same server, and stops it
by pid, its worker too. It serves the one file it is given and nothing else.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from harness.procs import Process, child_pids, free_port, wait_for_port

__all__ = ["NGINX_BIN", "Nginx", "configure", "open_nginx"]

NGINX_BIN = Path("/usr/sbin/nginx")


def configure(root: Path, addr: str, port: int, blob: Path, *, master: bool = True) -> list[str]:
    """Write `root/nginx.conf` serving `blob` at `http://addr:port/blob`; return its argv.

    With `master=False` one process does everything (its pid is the worker's),
    else a master starts one worker. It runs in the foreground; every path it
    writes (pid, error log, temp dirs) is under `root`.
    """
    temps = "\n".join(
        f"  {kind}_temp_path {root / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = root / "nginx.conf"
    conf.write_text(f"""daemon off;
master_process {"on" if master else "off"};
worker_processes 1;
user root;
pid {root / "nginx.pid"};
error_log {root / "error.log"} warn;
events {{ worker_connections 256; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
{temps}
  server {{
    listen {addr}:{port};
    location = /blob {{ alias {blob}; default_type application/octet-stream; }}
  }}
}}
""")
    return [
        os.fspath(NGINX_BIN),
        "-e",
        os.fspath(root / "error.log"),
        "-p",
        os.fspath(root),
        "-c",
        os.fspath(conf),
    ]


@dataclass(frozen=True)
class Nginx:
    """A running nginx; see `open_nginx`. `process` is the master (or the only process)."""

    url: str
    process: Process

    @property
    def pid(self) -> int:
        return self.process.pid


@contextlib.contextmanager
def open_nginx(
    root: Path,
    blob: Path,
    *,
    addr: str = "127.0.0.1",
    port: int | None = None,
    netns: str | None = None,
    master: bool = True,
    start_timeout_s: float = 10.0,
) -> Iterator[Nginx]:
    """nginx serving `blob` at `http://addr:port/blob` (a free port unless given) until the
    block exits; config, logs and temp files under `root`. `netns` runs it inside that
    namespace, where `addr` is an address of its own."""
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    argv = configure(root, addr, port, blob, master=master)
    proc = Process(argv, root, name="nginx", netns=netns)
    with proc:
        wait_for_port(addr, port, timeout_s=start_timeout_s, process=proc, netns=netns)
        workers = child_pids(proc.pid)
        try:
            yield Nginx(f"http://{addr}:{port}/blob", proc)
        finally:
            proc.stop()
            for pid in workers:  # only if the master was killed before it could stop them
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
