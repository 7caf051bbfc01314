"""bench.serve's seed content: one random blob and a manifest, pushed to docker-registry.

Owns writing the pseudo-random blob (seeded, so runs are alike), its digest,
and the monolithic upload of it, a config and an OCI manifest referencing
both under REPO:TAG (POST, then PUT `?digest=`; the manifest by PUT). It talks
to the registry it is given and must not start one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import httpx

from bench.data import write_random

MiB = 1 << 20
REPO = "bench/blob"
TAG = "latest"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def make_blob(path: Path, size: int, seed: int = 20240601) -> str:
    """Write `size` pseudo-random bytes to `path` (the same every run); their sha256 hex."""
    return write_random(path, size, seed=seed)


def push_blob(http: httpx.Client, base: str, digest: str, body: Path | bytes) -> None:
    """Monolithic upload: POST opens the session, PUT ?digest= sends every byte and commits."""
    r = http.post(f"{base}/v2/{REPO}/blobs/uploads/")
    if r.status_code != 202:
        raise RuntimeError(f"upload POST: {r.status_code} {r.text[:200]}")
    location = r.headers["Location"]
    if location.startswith("/"):
        location = base + location
    sep = "&" if "?" in location else "?"

    def chunks(path: Path) -> Iterator[bytes]:
        with open(path, "rb") as f:
            while chunk := f.read(4 * MiB):
                yield chunk

    size = len(body) if isinstance(body, bytes) else body.stat().st_size
    r = http.put(
        f"{location}{sep}digest={digest}",
        content=body if isinstance(body, bytes) else chunks(body),
        headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
    )
    if r.status_code != 201:
        raise RuntimeError(f"upload PUT: {r.status_code} {r.text[:200]}")


def push_image(base: str, blob: Path, blob_hex: str) -> None:
    """Push the layer, a config and a manifest referencing both under REPO:TAG."""
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}
    ).encode()
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": len(config),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": f"sha256:{blob_hex}",
                "size": blob.stat().st_size,
            }
        ],
    }
    with httpx.Client(timeout=300.0, trust_env=False) as http:
        push_blob(http, base, f"sha256:{blob_hex}", blob)
        push_blob(http, base, config_digest, config)
        r = http.put(
            f"{base}/v2/{REPO}/manifests/{TAG}",
            content=json.dumps(manifest).encode(),
            headers={"Content-Type": OCI_MANIFEST},
        )
        if r.status_code != 201:
            raise RuntimeError(f"manifest PUT: {r.status_code} {r.text[:200]}")
