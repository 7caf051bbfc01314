"""Byte rates (p2preg/node/rates.py): the grammar, the token bucket's bound, the meter.

Sans-IO: the bucket and the meter are driven with explicit times, no clock.
"""

from __future__ import annotations

import random

import pytest

from p2preg.core.config import ConfigError, load
from p2preg.node.config import NodeConfig
from p2preg.node.rates import (
    MIN_BURST_BYTES,
    ByteRate,
    RateMeter,
    TokenBucket,
    format_rate,
    parse_rate,
)

KiB = 1024
MiB = 1024 * KiB


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("262144", 262144), ("256KiB", 256 * KiB), ("256 KiB/s", 256 * KiB), ("10MiB", 10 * MiB),
        ("10MB", 10_000_000), ("10M", 10_000_000), ("80Mbit", 10_000_000),
        ("80mbps", 10_000_000), ("1Gbit", 125_000_000), ("1.5MiB", 3 * MiB // 2), ("0", 0),
        ("2GiB", None), (0, 0), (4096, 4096),
    ],
)
def test_rates_read_as_operators_write_them(text: str | int, rate: int | None) -> None:
    if rate is None:  # above libtorrent's int: refused, not wrapped around
        with pytest.raises(ConfigError, match="at most 2GiB"):
            parse_rate(text)
        return
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["10Mb", "fast", "-5", "10Xi", "5 MiBs", "10iB", "", "1e9", -1])
def test_a_bad_rate_is_one_line_naming_it(text: str | int) -> None:
    with pytest.raises(ConfigError) as e:
        parse_rate(text)
    message = str(e.value)
    assert "\n" not in message and "10MiB" in message and repr(str(text)) in message


def test_node_config_takes_rates_from_flags_env_and_toml() -> None:
    config = load(
        NodeConfig,
        cli={"upstream": ["http://127.0.0.1:1"], "peer_upload_limit_bytes_s": "80Mbit"},
        env={"P2PREG_PEER_DOWNLOAD_LIMIT_BYTES_S": "1MiB"},
    )
    assert config.peer_upload_limit_bytes_s == 10_000_000
    assert config.peer_download_limit_bytes_s == MiB
    assert config.upstream_download_limit_bytes_s == 0
    assert ByteRate.from_config(262144) == 256 * KiB  # a TOML integer
    with pytest.raises(ConfigError, match="10Mb"):
        load(NodeConfig, cli={"upstream": ["http://127.0.0.1:1"],
                              "upstream_download_limit_bytes_s": "10Mb"})


def test_format_rate() -> None:
    assert format_rate(0) == "unlimited"
    assert format_rate(256 * KiB) == "256 KiB/s (2.097 Mbit/s)"
    assert format_rate(100) == "100 B/s"


def test_the_bucket_never_releases_more_than_burst_plus_rate_times_time() -> None:
    """Many takers at random times: by every release time t, at most burst + rate*t went."""
    rng = random.Random(7)
    rate = 256 * KiB
    bucket = TokenBucket(rate, now=0.0)
    burst = bucket.burst
    releases: list[tuple[float, int]] = []
    now = 0.0
    for _ in range(2000):
        now += rng.uniform(0, 0.01)
        n = rng.choice((1, 1500, 16 * KiB, 64 * KiB, 200 * KiB))
        releases.append((now + bucket.take(n, now), n))
    releases.sort()
    released = 0
    for at, n in releases:
        released += n
        assert released <= burst + rate * at + 1e-6
    # and it is not a stall: the last release is near when the bytes were due
    assert releases[-1][0] <= (released - burst) / rate + 0.01


def test_a_new_rate_applies_at_once_and_forgives_the_old_debt() -> None:
    bucket = TokenBucket(KiB, now=0.0)  # 1 KiB/s: a 1 MiB take would wait ~17 minutes
    assert bucket.take(MIN_BURST_BYTES, 0.0) == 0.0
    assert bucket.take(MiB, 0.0) == pytest.approx(MiB / KiB)
    bucket.set_rate(MiB, now=1.0)
    # the old debt is gone: this waits for its own bytes only
    assert bucket.take(64 * KiB, 1.0) == pytest.approx(64 * KiB / MiB)
    bucket.set_rate(0, now=1.0)
    assert all(bucket.take(MiB, 1.0) == 0.0 for _ in range(10))  # unlimited
    with pytest.raises(ValueError):
        bucket.set_rate(-1, now=1.0)


def test_the_meter_averages_over_its_window_and_forgets() -> None:
    meter = RateMeter(window_s=5.0, bins=10)
    for i in range(50):  # 100 KB every 0.1 s for 5 s: 1 MB/s
        meter.add(100_000, 10.0 + i * 0.1)
    assert meter.rate(15.0) == pytest.approx(1_000_000, rel=0.15)
    assert meter.rate(30.0) == 0.0
