"""Debian's Prometheus, scraping the processes a test started, and asked over its HTTP API.

Owns writing a configuration that scrapes given `host:port` targets (grouped by
job) every second, running `/usr/bin/prometheus` on a free loopback port with
its own storage under a work directory, waiting until `/-/ready` answers, the
instant queries (`/api/v1/query`) and the target list tests read, and stopping
it by pid. It knows nothing of p2preg's metrics or of any dashboard; it must
not touch the packaged service's config or data (/etc/prometheus,
/var/lib/prometheus).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from harness.procs import Process, ProcessError, clean_env, free_port, wait_for_http

__all__ = ["PROMETHEUS_BIN", "PromQLError", "Prometheus", "open_prometheus", "write_config"]

PROMETHEUS_BIN = Path("/usr/bin/prometheus")
SCRAPE_INTERVAL_S = 1


class PromQLError(ProcessError):
    """Prometheus refused a query (a syntax error, an unknown function): waiting will not help."""


def write_config(path: Path, targets: Mapping[str, Sequence[str]]) -> Path:
    """Write a config scraping each job's `host:port` targets at /metrics every second.

    JSON is YAML, so the file needs no YAML library; the scrape timeout equals
    the interval, the longest Prometheus allows.
    """
    if not targets or not all(targets.values()):
        raise ValueError("write_config: give at least one target for every job")
    interval = f"{SCRAPE_INTERVAL_S}s"
    config = {
        "global": {
            "scrape_interval": interval,
            "scrape_timeout": interval,
            "evaluation_interval": interval,
        },
        "scrape_configs": [
            {
                "job_name": job,
                "metrics_path": "/metrics",
                "static_configs": [{"targets": list(addrs)}],
            }
            for job, addrs in targets.items()
        ],
    }
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


@dataclass(frozen=True)
class Prometheus:
    url: str
    process: Process

    def _get(self, path: str, params: Mapping[str, str]) -> Any:
        self.process.check_running()
        # trust_env=False: a proxy from the environment must never see our traffic.
        with httpx.Client(trust_env=False, timeout=10.0) as client:
            resp = client.get(f"{self.url}{path}", params=params)
        try:
            body = resp.json()
        except ValueError:
            raise ProcessError(f"prometheus {path}: {resp.status_code}, not JSON") from None
        if body.get("status") != "success":
            # 400 (bad_data) and 422 (execution) are the query's fault.
            error = PromQLError if resp.status_code in (400, 422) else ProcessError
            raise error(f"prometheus {path} {dict(params)}: {body.get('error', body)}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector (or scalar, as one sample) `expr` evaluates to now."""
        data = self._get("/api/v1/query", {"query": expr})
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def targets(self) -> list[dict[str, Any]]:
        """The active targets, each with `labels`, `health` ("up") and `lastError`."""
        active: list[dict[str, Any]] = self._get("/api/v1/targets", {"state": "active"})[
            "activeTargets"
        ]
        return active


@contextmanager
def open_prometheus(
    workdir: Path,
    targets: Mapping[str, Sequence[str]],
    *,
    port: int | None = None,
    start_timeout_s: float = 30.0,
) -> Iterator[Prometheus]:
    """Run Prometheus scraping `targets` (job → `host:port` list) until the block exits.

    Config, storage (`workdir/data`) and its log live under `workdir`; it
    listens on 127.0.0.1 (a free port unless given).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    config = write_config(workdir / "prometheus.yml", targets)
    port = port or free_port()
    argv: list[str | Path] = [
        PROMETHEUS_BIN,
        f"--config.file={config}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    proc = Process(argv, workdir, name="prometheus", env=clean_env(), term_grace_s=10.0)
    with proc:
        url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{url}/-/ready", timeout_s=start_timeout_s, statuses=[200], process=proc)
        yield Prometheus(url, proc)
