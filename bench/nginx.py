"""nginx as the benchmarks' reference server: one worker, sendfile, one file at /blob.

Debian's nginx, as a user would run it to serve static files fast (`sendfile
on`, `tcp_nopush on`, no access log). Every benchmark that compares against
nginx writes its configuration here, so they all compare against the same
server; each starts and stops the process its own way (on loopback, or in a
network namespace).
"""

from __future__ import annotations

import os
from pathlib import Path

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
