"""OCI content digests: parsing, validation and incremental verification.

Owns the digest grammar of the OCI image spec and the set of algorithms this
project can verify. It must not touch files or the network; callers feed bytes.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

# Grammar from the OCI image spec (descriptor.md, "Digests").
_DIGEST_RE = re.compile(r"^([a-z0-9]+(?:[+._-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)$")
# Registered algorithms and the exact shape of their encoded part.
_ENCODED = {
    "sha256": re.compile(r"^[a-f0-9]{64}$"),
    "sha512": re.compile(r"^[a-f0-9]{128}$"),
}
MAX_DIGEST_LENGTH = 7 + 128 + 8


class DigestError(ValueError):
    """A string is not a digest this project accepts."""


@dataclass(frozen=True, slots=True, order=True)
class Digest:
    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        if len(text) > MAX_DIGEST_LENGTH:
            raise DigestError("digest is too long")
        m = _DIGEST_RE.match(text)
        if m is None:
            raise DigestError(f"malformed digest {text[:80]!r}")
        algorithm, encoded = m.groups()
        pattern = _ENCODED.get(algorithm)
        if pattern is None:
            raise DigestError(f"unsupported digest algorithm {algorithm!r}")
        if not pattern.match(encoded):
            raise DigestError(f"malformed {algorithm} digest")
        return cls(algorithm, encoded)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def hasher(self) -> Hasher:
        return Hasher(self.algorithm)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


class Hasher:
    """Incremental digest of a byte stream, comparable to an expected Digest."""

    __slots__ = ("_h", "algorithm", "size")

    def __init__(self, algorithm: str = "sha256") -> None:
        self.algorithm = algorithm
        self._h = hashlib.new(algorithm)
        self.size = 0

    def update(self, chunk: bytes | memoryview) -> None:
        self._h.update(chunk)
        self.size += len(chunk)

    def digest(self) -> Digest:
        return Digest(self.algorithm, self._h.hexdigest())
