"""Pinned images: what each pin holds, whether a new one fits, and the file that keeps them.

Owns the pin records (an image, the digest it resolved to, and every digest it
holds — index, platform manifests, configs, layers — with its size), the
budget rule (the union of every pin's bytes must fit `store_max_bytes`, so a
pin never makes room by evicting another pin), and `<data_dir>/pins.json`,
written whole or not at all (temp file, fsync, rename, fsync of the
directory) at every change, so pins survive a restart and a crash. Sans-IO
apart from that one file: it must not resolve images or touch the store
(pins.py does both).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from p2preg.core.digest import Digest, DigestError
from p2preg.core.hostfiles import write_private
from p2preg.node.errors import RegistryError

log = logging.getLogger(__name__)

PINS_FILE = "pins.json"
PINS_PATH = "/_p2preg/pins"
FILE_VERSION = 1
SOURCES = ("config", "runtime")


class PinRefused(RegistryError):
    """A pin the store's budget cannot hold beside the others."""

    status, code = 507, "DENIED"


class PinFromConfig(RegistryError):
    """An unpin of an image the node's config pins."""

    status, code = 409, "DENIED"


@dataclass(frozen=True, slots=True)
class Pin:
    """`image` as `registry/repository:tag` (or `@digest`); `blobs` maps each
    digest the pin holds to its size; `platforms` None means every platform."""

    image: str
    digest: Digest
    platforms: tuple[str, ...] | None
    source: str
    blobs: tuple[tuple[Digest, int], ...]

    @property
    def bytes(self) -> int:
        return sum(size for _, size in self.blobs)

    @property
    def digests(self) -> list[Digest]:
        return [d for d, _ in self.blobs]

    def as_json(self) -> dict[str, object]:
        return {
            "image": self.image,
            "digest": str(self.digest),
            "platforms": None if self.platforms is None else list(self.platforms),
            "source": self.source,
            "bytes": self.bytes,
            "blobs": {str(d): size for d, size in self.blobs},
        }

    @classmethod
    def from_json(cls, doc: object) -> Pin:
        if not isinstance(doc, dict):
            raise ValueError("a pin is a JSON object")
        image, source, platforms = doc.get("image"), doc.get("source"), doc.get("platforms")
        blobs = doc.get("blobs")
        if not isinstance(image, str) or source not in SOURCES or not isinstance(blobs, dict):
            raise ValueError("a pin needs image, source and blobs")
        if platforms is not None and not (
            isinstance(platforms, list) and all(isinstance(p, str) for p in platforms)
        ):
            raise ValueError("platforms is a list of strings or null")
        try:
            held = tuple((Digest.parse(d), int(n)) for d, n in blobs.items())
            digest = Digest.parse(str(doc.get("digest")))
        except (DigestError, TypeError, ValueError):
            raise ValueError(f"pin {image[:200]!r} holds a malformed digest or size") from None
        if any(n < 0 for _, n in held):
            raise ValueError(f"pin {image[:200]!r} holds a negative size")
        return cls(image, digest, None if platforms is None else tuple(platforms), source, held)


class PinBook:
    """The pins of one node, by image; `save` after every change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pins: dict[str, Pin] = {}

    def load(self) -> list[Pin]:
        """Read the file (none yet: no pins). A file that does not parse is kept
        aside as `pins.json.corrupt`, logged, and the node starts without pins
        rather than not at all."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or doc.get("version") != FILE_VERSION:
                raise ValueError(f"not a version {FILE_VERSION} pins file")
            entries = doc.get("pins")
            if not isinstance(entries, list):
                raise ValueError("pins is not a list")
            pins = [Pin.from_json(e) for e in entries]
        except ValueError as e:
            aside = self.path.with_name(self.path.name + ".corrupt")
            os.replace(self.path, aside)
            log.error("pins: %s is unreadable (%s): moved to %s; no image is pinned",
                      self.path, e, aside)
            return []
        self._pins = {p.image: p for p in pins}
        return pins

    def save(self) -> None:
        """Write every pin, whole or not at all (blocking: a worker thread)."""
        doc = {"version": FILE_VERSION, "pins": [p.as_json() for p in self._pins.values()]}
        write_private(self.path, json.dumps(doc, indent=1).encode() + b"\n")
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself survives a power cut
        finally:
            os.close(fd)

    def get(self, image: str) -> Pin | None:
        return self._pins.get(image)

    def __iter__(self) -> Iterator[Pin]:
        return iter(list(self._pins.values()))

    def __len__(self) -> int:
        return len(self._pins)

    def planned_bytes(self, *, without: str | None = None) -> int:
        """Bytes of every digest some pin holds (each once), leaving out pin `without`."""
        sizes: dict[Digest, int] = {}
        for pin in self._pins.values():
            if pin.image != without:
                sizes.update(pin.blobs)
        return sum(sizes.values())

    def check_fits(self, pin: Pin, budget: int) -> None:
        """Raise PinRefused when `pin`, beside every other pin, exceeds `budget`.

        A pin that replaces one of the same image counts only once; blobs shared
        with other pins count once.
        """
        sizes: dict[Digest, int] = {}
        for other in self._pins.values():
            if other.image != pin.image:
                sizes.update(other.blobs)
        others = sum(sizes.values())
        sizes.update(pin.blobs)
        total = sum(sizes.values())
        if total > budget:
            raise PinRefused(
                f"cannot pin {pin.image}: it needs {total - others} bytes, {others} bytes are "
                f"pinned already and the store budget is {budget} bytes (store_max_bytes); "
                "unpin an image or raise the budget"
            )

    def add(self, pin: Pin) -> Pin | None:
        """Add `pin`, replacing the pin of the same image; returns the one replaced."""
        old = self._pins.get(pin.image)
        self._pins[pin.image] = pin
        return old

    def remove(self, image: str) -> Pin | None:
        return self._pins.pop(image, None)
