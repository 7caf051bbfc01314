"""Pushing the harness's image layouts into a registry with skopeo, and saying what was pushed.

Owns running `skopeo` (bounded, no proxy), `push` (`skopeo copy` of a layout
as OCI, or as Docker schema2 through a local `dir:` conversion made once), and
describing what was pushed from local files only — the layout, or skopeo's
conversion of it — checked against skopeo's `--digestfile`. It never reads
the registry back, so tests can check the registry against it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from harness.images import Blob, ImageManifest, OciLayout, PushedImage, PushFormat
from harness.procs import clean_env

__all__ = ["SKOPEO_BIN", "push", "skopeo"]

SKOPEO_BIN = Path("/usr/bin/skopeo")


def skopeo(
    *args: str | os.PathLike[str], timeout_s: float = 300.0, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run skopeo with a bounded wait; a failure raises with its stderr."""
    argv = [os.fspath(SKOPEO_BIN), *(os.fspath(a) for a in args)]
    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        stdin=subprocess.DEVNULL,
        env=clean_env(),
    )
    if check and proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, argv, proc.stdout, proc.stderr)
    return proc


def _manifest_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def push(
    layout: OciLayout,
    registry_host: str,
    repository: str,
    tag: str | None = None,
    *,
    format: PushFormat = "oci",
    creds: str | None = None,
    timeout_s: float = 300.0,
) -> PushedImage:
    """`skopeo copy` the layout to `docker://registry_host/repository:tag`.

    `format="oci"` pushes the layout's manifests unchanged, so their digests
    are the layout's. `format="v2s2"` first has skopeo convert the layout into
    a `dir:` copy beside it (`<layout>.v2s2/`, made once and reused): every
    manifest rewritten with Docker media types and an index turned into a
    Docker manifest list, blobs unchanged; that copy is then pushed as is, so
    what was pushed is known from local files. Either way the digest skopeo
    writes to `--digestfile` must match, or this raises.
    """
    tag = tag or layout.tag
    if format == "oci":
        source = f"oci:{layout.path}:{layout.tag}"
        expected_digest = layout.digest
        media_type = layout.media_type
        manifests = layout.manifests
    else:
        converted = _convert_v2s2(layout, timeout_s)
        source = f"dir:{converted}"
        top = (converted / "manifest.json").read_bytes()
        expected_digest = _manifest_digest(top)
        media_type, manifests = _describe_dir(layout, converted, top)

    with tempfile.TemporaryDirectory(prefix="p2preg-push-") as tmp:
        digestfile = Path(tmp) / "digest"
        args: list[str] = ["copy", "--quiet", "--dest-tls-verify=false"]
        args += ["--digestfile", str(digestfile)]
        if layout.is_index:
            args.append("--all")
        args += ["--dest-creds", creds] if creds is not None else ["--dest-no-creds"]
        skopeo(*args, source, f"docker://{registry_host}/{repository}:{tag}", timeout_s=timeout_s)
        pushed_digest = digestfile.read_text().strip()
    if pushed_digest != expected_digest:
        raise AssertionError(
            f"skopeo pushed {pushed_digest} but the source manifest is {expected_digest}: "
            "it rewrote a manifest it should have copied"
        )
    return PushedImage(
        registry_host, repository, tag, expected_digest, media_type, manifests, layout
    )


def _convert_v2s2(layout: OciLayout, timeout_s: float) -> Path:
    out = layout.path.with_name(layout.path.name + ".v2s2")
    if (out / "manifest.json").exists():
        return out
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        args = ["copy", "--quiet", "--format", "v2s2"]
        if layout.is_index:
            args.append("--all")
        skopeo(*args, f"oci:{layout.path}:{layout.tag}", f"dir:{tmp}", timeout_s=timeout_s)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _describe_dir(
    layout: OciLayout, converted: Path, top: bytes
) -> tuple[str, tuple[ImageManifest, ...]]:
    """Media type and per-platform manifests of a skopeo `dir:` copy.

    A list's children are stored as `<hex>.manifest.json`; platforms are
    matched to the layout's by os/architecture to carry the diff_ids over.
    """
    doc = json.loads(top)
    media_type = str(doc["mediaType"])
    if not layout.is_index:
        (m,) = layout.manifests
        return media_type, (_from_manifest_doc(m, doc, _manifest_digest(top), len(top)),)
    by_platform = {
        f"{c['platform']['os']}/{c['platform']['architecture']}": c for c in doc["manifests"]
    }
    out = []
    for m in layout.manifests:
        child = by_platform[m.platform]
        raw = (converted / f"{child['digest'].removeprefix('sha256:')}.manifest.json").read_bytes()
        if _manifest_digest(raw) != child["digest"]:
            raise AssertionError(f"skopeo's dir copy of {m.platform} does not match its list")
        out.append(_from_manifest_doc(m, json.loads(raw), child["digest"], len(raw)))
    return media_type, tuple(out)


def _from_manifest_doc(
    m: ImageManifest, doc: Mapping[str, Any], digest: str, size: int
) -> ImageManifest:
    def blob(d: Mapping[str, Any]) -> Blob:
        return Blob(str(d["digest"]), int(d["size"]), str(d["mediaType"]))

    return replace(
        m,
        digest=digest,
        size=size,
        media_type=str(doc["mediaType"]),
        config=blob(doc["config"]),
        layers=tuple(blob(d) for d in doc["layers"]),
    )
