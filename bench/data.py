"""The random files benchmarks move: written once, hashed while written.

Owns writing `size` random bytes to a file in 4 MiB chunks and returning their
sha256 (hex), from the OS's random source or, with a seed, from a seeded
generator so that runs move the same bytes. It must not decide what a
benchmark does with the file.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

_CHUNK = 4 << 20


def write_random(path: Path, size: int, *, seed: int | None = None) -> str:
    """Write `size` random bytes to `path` (seeded if `seed` is given); their sha256 hex."""
    rng = random.Random(seed) if seed is not None else None
    h = hashlib.sha256()
    with path.open("wb") as f:
        left = size
        while left:
            n = min(left, _CHUNK)
            chunk = rng.randbytes(n) if rng is not None else os.urandom(n)
            f.write(chunk)
            h.update(chunk)
            left -= n
    return h.hexdigest()
