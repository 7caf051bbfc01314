"""Byte rates: how an operator writes them, a token bucket, and a meter.

Owns the grammar of a rate (`262144`, `256KiB`, `10MiB`, `80Mbit`, each per
second, `0` for unlimited) and its one-line error, `ByteRate` (the config
type of the node's caps), `TokenBucket` (how many bytes may go now, given the
time: the upstream cap's arithmetic) and `RateMeter` (bytes per second over
the last few seconds, for the metrics). Sans-IO: every method takes `now`, so
the tests drive them without a clock or a socket; it must not sleep or do I/O.
"""

from __future__ import annotations

import re

from p2preg.core.config import ConfigError

_RATE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)([a-z]*)(/s)?$", re.IGNORECASE)
_PREFIX = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}
_BITS = frozenset({"bit", "bits", "bps"})
_BYTES = frozenset({"", "B"})
# libtorrent keeps a rate limit in a signed 32-bit int.
MAX_RATE = 2**31 - 1
RATE_HELP = "a rate per second such as 262144, 256KiB, 10MiB, 80Mbit, or 0 for unlimited"


def parse_rate(text: str | int) -> int:
    """Bytes per second: `10MiB`, `10MB`, `10M` are bytes; `80Mbit`, `80Mbps` are bits.

    A lone lowercase `b` (`10Mb`) is refused: people mean bits and bytes by it alike.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ConfigError(f"expected {RATE_HELP}, got {str(text)!r}")
        return _bounded(text, str(text))
    m = _RATE_RE.match(str(text).strip())
    unit = m.group(4) if m is not None else ""
    known = unit in _BYTES or unit.lower() in _BITS or unit.lower() in ("byte", "bytes")
    if m is None or not known or (m.group(3) and not m.group(2)):
        raise ConfigError(f"expected {RATE_HELP}, got {str(text)[:40]!r}")
    scale = (1024 if m.group(3) else 1000) ** _PREFIX[m.group(2).lower()]
    bits = unit.lower() in _BITS
    return _bounded(round(float(m.group(1)) * scale / (8 if bits else 1)), str(text))


def _bounded(rate: int, text: str) -> int:
    if rate > MAX_RATE:
        raise ConfigError(f"a rate is at most 2GiB per second (0 for unlimited), got {text[:40]!r}")
    return rate


def format_rate(n: int) -> str:
    """`262144` → `256 KiB/s`, `0` → `unlimited`."""
    if n <= 0:
        return "unlimited"
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            value = n / (1 << shift)
            return f"{value:.4g} {unit}/s ({n * 8 / 1e6:.4g} Mbit/s)"
    return f"{n} B/s"


class ByteRate(int):
    """A cap in bytes per second (0: unlimited), given as `parse_rate` reads it."""

    @classmethod
    def from_config(cls, value: object) -> ByteRate:
        if not isinstance(value, str | int) or isinstance(value, bool):
            raise ConfigError(f"expected {RATE_HELP}, got {value!r}")
        return cls(parse_rate(value))


# How long a burst at the full rate the bucket holds: enough that one read of
# the socket (up to 64 KiB) passes at once after a pause, short enough that an
# idle link does not buy a long burst above the cap.
BURST_S = 0.25
MIN_BURST_BYTES = 64 * 1024


class TokenBucket:
    """Tokens are bytes; `rate` 0 means unlimited. Not thread-safe (one trio thread).

    A take reserves its bytes at once, running the bucket into debt if need
    be, and is told how long to wait before using them: the bytes released by
    any time t are at most burst + rate * (t - start), whatever the number of
    takers, and a later take never goes before an earlier one.
    """

    def __init__(self, rate: int, now: float) -> None:
        self.rate = 0
        self.tokens = 0.0
        self._last = now
        self.set_rate(rate, now)
        self.tokens = self.burst

    @property
    def burst(self) -> float:
        return max(MIN_BURST_BYTES, self.rate * BURST_S)

    def _refill(self, now: float) -> None:
        if now > self._last and self.rate > 0:
            self.tokens = min(self.burst, self.tokens + (now - self._last) * self.rate)
        self._last = max(self._last, now)

    def set_rate(self, rate: int, now: float) -> None:
        """A new cap from now on; a debt run up under the old one is forgiven."""
        if rate < 0:
            raise ValueError("a rate is ≥ 0")
        self._refill(now)
        self.rate = rate
        self.tokens = self.burst if rate == 0 else min(max(self.tokens, 0.0), self.burst)

    def take(self, n: int, now: float) -> float:
        """Reserve `n` bytes; returns the seconds until they may be used (0: now)."""
        if self.rate == 0:
            return 0.0
        self._refill(now)
        self.tokens -= n
        return max(0.0, -self.tokens / self.rate)


class RateMeter:
    """Bytes per second over the last `window_s`, in `bins` slots (bounded memory)."""

    def __init__(self, window_s: float = 5.0, bins: int = 10) -> None:
        self._width = window_s / bins
        self._bins = [0] * bins
        self._slot = 0  # the absolute slot number of the newest bin
        self._window_s = window_s

    def _advance(self, now: float) -> None:
        slot = int(now / self._width)
        if slot <= self._slot:
            return
        for s in range(max(self._slot + 1, slot - len(self._bins) + 1), slot + 1):
            self._bins[s % len(self._bins)] = 0
        self._slot = slot

    def add(self, n: int, now: float) -> None:
        self._advance(now)
        self._bins[self._slot % len(self._bins)] += n

    def rate(self, now: float) -> float:
        self._advance(now)
        return sum(self._bins) / self._window_s
