"""What an idle, verified node connection costs the tracker in memory.

Starts an mTLS tracker (harness, loopback), opens `--connections` TLS
connections with a node certificate, each sending one `GET /healthz` and then
staying open and idle (as a node's control connection does between its
relay's batches, kept KEEP_ALIVE_VERIFIED_S), and reports the tracker's RSS
before and after: the difference over the count is the cost per idle
connection. Usage: `python -m bench.tracker_idle --connections 2000`.
"""

from __future__ import annotations

import argparse
import socket
import ssl
import tempfile
import time
from pathlib import Path

from harness.tlscerts import ClusterCA, client_ssl_context
from harness.tracker import open_tracker


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def idle_connection(host: str, port: int, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    sock = ctx.wrap_socket(socket.create_connection((host, port), timeout=10),
                           server_hostname=host)  # fmt: skip
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
    got = b""
    while b"\r\n\r\n" not in got:  # the head; /healthz's body is small and follows
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("the tracker closed a fresh connection")
        got += chunk
    return sock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connections", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ca = ClusterCA.make("idle")
        tls = ca.tls_dir(Path(tmp) / "t", "tracker", "t", ips=["127.0.0.1"])
        node = ca.tls_dir(Path(tmp) / "n", "node", "n")
        with open_tracker(Path(tmp) / "tracker", tls_dir=tls) as t:
            host, port = t.url.rsplit("/", 1)[-1].rsplit(":", 1)
            ctx = client_ssl_context(node)
            pid = t.process.pid
            warm = [idle_connection(host, int(port), ctx) for _ in range(50)]
            time.sleep(1.0)
            before = rss_kib(pid)
            held = [idle_connection(host, int(port), ctx) for _ in range(args.connections)]
            time.sleep(2.0)
            after = rss_kib(pid)
            per = (after - before) / args.connections
            print(f"tracker RSS {before} KiB -> {after} KiB with {args.connections} idle "
                  f"verified TLS connections: {per:.1f} KiB each")  # fmt: skip
            for s in warm + held:
                s.close()


if __name__ == "__main__":
    main()
