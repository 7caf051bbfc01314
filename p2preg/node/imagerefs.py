"""Image references and platform choice for `p2preg preheat`, sans-IO.

Owns reading an image reference the way containerd does (`nginx` is
`docker.io/library/nginx:latest`, `host:5000/app@sha256:…`), platforms
(`linux/arm64/v8`) and choosing an index's manifests for them. Pure functions
and frozen dataclasses: this module must not do I/O or know of nodes.
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from p2preg.core.reference import InvalidReference, Reference, parse_name

DOCKER_HUB = "docker.io"
GOARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


class PreheatError(Exception):
    """An image cannot be resolved or a node cannot be asked; the message says which."""


@dataclass(frozen=True, slots=True)
class ImageRef:
    """`registry` is the name containerd sends as `?ns=` (docker.io for Docker Hub)."""

    registry: str
    repository: str
    reference: str

    def __str__(self) -> str:
        sep = "@" if ":" in self.reference else ":"
        return f"{self.registry}/{self.repository}{sep}{self.reference}"


def parse_image(text: str) -> ImageRef:
    """`nginx`, `ghcr.io/org/app:1.2`, `host:5000/app@sha256:…`, as containerd reads them."""
    name, _, digest = text.partition("@")
    tag = None
    slash, colon = name.rfind("/"), name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        registry, repository = first, rest
    else:
        registry, repository = DOCKER_HUB, name
    if registry == "index.docker.io":
        registry = DOCKER_HUB
    if registry == DOCKER_HUB and "/" not in repository:
        repository = "library/" + repository
    reference = digest or tag or "latest"
    try:
        parse_name(repository)
        Reference.parse(reference)
    except InvalidReference as e:
        raise PreheatError(f"{text!r} is not an image reference: {e}") from None
    return ImageRef(registry, repository, reference)


@dataclass(frozen=True, slots=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise PreheatError(f"a platform is OS/ARCH[/VARIANT], got {text!r}")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    def matches(self, doc: object) -> bool:
        if not isinstance(doc, dict):
            return False
        if (doc.get("os"), doc.get("architecture")) != (self.os, self.architecture):
            return False
        return self.variant is None or doc.get("variant") == self.variant

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def host_platform() -> Platform:
    """This machine's platform, which is what ctr and kubelet pull by default."""
    machine = platform.machine().lower()
    return Platform("linux", GOARCH.get(machine, machine))


def select_manifests(index: dict[str, Any], platforms: Sequence[Platform] | None) -> list[str]:
    """Digests of an index's manifests for `platforms` (None: every real platform)."""
    chosen = []
    for entry in index.get("manifests") or []:
        if not isinstance(entry, dict) or not isinstance(entry.get("digest"), str):
            continue
        plat = entry.get("platform")
        if platforms is None:
            # BuildKit's attestation manifests claim the platform unknown/unknown.
            if isinstance(plat, dict) and plat.get("os") == "unknown":
                continue
            chosen.append(entry["digest"])
        elif any(p.matches(plat) for p in platforms):
            chosen.append(entry["digest"])
    return chosen
