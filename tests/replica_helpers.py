"""Tracker replicas on Redis as real processes, for tests/test_tracker_replicas*.py.

`replicas` starts `p2preg tracker --store …` processes on one store (a short
term, the password in a file); `serving` finds the one that serves (`/readyz`
200) and fails if two ever do; `metric` reads one sample of a replica's
`/metrics`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx

from harness.node import metric_value
from harness.procs import wait_until
from harness.tracker import TrackerProcess, open_tracker

TERM_S = "2"


@contextmanager
def replicas(
    workdir: Path,
    store_url: str,
    count: int,
    *,
    token: str | None,
    password: str,
    first: int = 0,
    tls_dirs: Sequence[Path] = (),
    extra: Sequence[str] = (),
) -> Iterator[list[TrackerProcess]]:
    """`count` replicas, each also given `extra` flags; with `tls_dirs` (one tracker
    certificate each), mutual TLS."""
    secret = workdir / "store-password"
    secret.write_text(password)
    args = ["--store", store_url, "--store-password-file", str(secret),
            "--replica-term-s", TERM_S, *extra]  # fmt: skip
    with ExitStack() as stack:
        yield [
            stack.enter_context(
                open_tracker(
                    workdir / f"t{n}", token=token, args=args, name=f"t{n}",
                    tls_dir=tls_dirs[n - first] if tls_dirs else None,
                )
            )
            for n in range(first, first + count)
        ]


def ready(t: TrackerProcess) -> bool:
    """`/readyz` says 200 (read on the plain metrics port under mutual TLS)."""
    try:
        return httpx.get(f"{t.metrics_url or t.url}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def serving(trackers: Sequence[TrackerProcess], timeout_s: float = 30) -> TrackerProcess:
    """The one live replica that serves, once there is one; no two ever do."""
    found: list[TrackerProcess] = []

    def one() -> bool:
        found[:] = [t for t in trackers if t.process.returncode is None and ready(t)]
        assert len(found) <= 1, "two replicas serve at once"
        return len(found) == 1

    wait_until(one, timeout_s=timeout_s, what="a replica to serve", interval_s=0.1)
    return found[0]


def metric(t: TrackerProcess, name: str, **labels: str) -> float:
    return metric_value(httpx.get(f"{t.metrics_url or t.url}/metrics", timeout=5).text, name,
                        **labels)  # fmt: skip
