"""The p2preg tracker as a real process, for integration tests, the demo and benchmarks.

Owns starting `python -m p2preg tracker` (or a given command line that ends in
the same CLI) on a free loopback port or a given address and port, on the
machine or inside a network namespace, optionally pinned to CPUs, with its data
directory under a work directory; with a `tls_dir` (mutual TLS), also a plain
metrics listener on a free port, since its `/healthz` is what readiness is
read from when the main port wants a client certificate; `insecure` for a
plain tracker bound beyond loopback; waiting until `/healthz` answers 200; and
stopping it by pid. A restart on the same directory keeps its metainfo. It
passes the tracker's other flags through and must not interpret them.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from harness.procs import Process, clean_env, free_port, wait_for_http

__all__ = ["TRACKER_COMMAND", "TrackerProcess", "open_tracker"]

TRACKER_COMMAND: tuple[str, ...] = (sys.executable, "-m", "p2preg")
"""The console script, as this interpreter runs it (PYTHONPATH picks the tree)."""


@dataclass(frozen=True)
class TrackerProcess:
    # https://… under mutual TLS, http://… otherwise.
    url: str
    data_dir: Path
    process: Process
    # The plain /metrics and /healthz listener (with tls_dir), else None.
    metrics_url: str | None = None


@contextmanager
def open_tracker(
    workdir: Path,
    *,
    port: int | None = None,
    token: str | None = None,
    args: Sequence[str] = (),
    name: str = "tracker",
    host: str = "127.0.0.1",
    netns: str | None = None,
    cpus: str | None = None,
    command: Sequence[str] = TRACKER_COMMAND,
    cwd: Path | None = None,
    start_timeout_s: float = 20.0,
    tls_dir: Path | None = None,
    insecure: bool = False,
    metrics_port: int | None = None,
) -> Iterator[TrackerProcess]:
    """Run `<command> tracker --listen host:port --data-dir workdir/data ARGS…`.

    `netns` runs it inside that namespace (`host` is then an address there);
    `cpus` pins it (`taskset -c`); `command` replaces `python -m p2preg` (a
    benchmark that patches a rule before the CLI runs), run in `cwd`.
    `tls_dir` makes it an mTLS tracker with `--metrics-listen host:metrics_port`
    (a free port if not given); `insecure` passes `--insecure`.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir = workdir / "data"
    port = port or free_port()
    argv = [*command, "tracker", "--listen", f"{host}:{port}"]
    argv += ["--data-dir", str(data_dir)]
    metrics_url = None
    if tls_dir is not None:
        metrics_port = metrics_port or free_port()
        argv += ["--tls-dir", str(tls_dir), "--metrics-listen", f"{host}:{metrics_port}"]
        metrics_url = f"http://{host}:{metrics_port}"
    if insecure:
        argv.append("--insecure")
    argv += args
    env = clean_env(drop_prefixes=["P2PREG_"])
    if token is not None:
        env["P2PREG_TOKEN"] = token
    proc = Process(argv, workdir, name=name, env=env, cwd=cwd, netns=netns, cpus=cpus)
    with proc:
        url = f"{'https' if tls_dir is not None else 'http'}://{host}:{port}"
        wait_for_http(
            f"{metrics_url or url}/healthz",
            timeout_s=start_timeout_s,
            statuses=[200],
            process=proc,
            netns=netns,
        )
        yield TrackerProcess(url, data_dir, proc, metrics_url)
