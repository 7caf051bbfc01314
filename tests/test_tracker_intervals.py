"""Which interval an announce answer carries, and how long its peer is kept (tracker/intervals.py).

Sans-IO: `AnnounceIntervals` with the jitter source pinned, then the
coordinator over a clock the test steps, then the settings' checks.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from p2preg.core import wire
from p2preg.core.config import ConfigError, HostPort
from tests.tracker_helpers import SteppedClock, blob_meta, publish_as_holder
from tracker.announce import AnnounceRequest, Event
from tracker.config import TrackerConfig
from tracker.coordinator import Tracker
from tracker.intervals import SEEDER_TTL_FACTOR, AnnounceIntervals, Cadence
from tracker.state import MemoryStore


def ann(ih: bytes, n: int, *, left: int = 1, event: Event = Event.NONE) -> AnnounceRequest:
    """Node `n<n>`'s announce from port 7000 + n."""
    peer_id = bytes([n]) * 20
    return AnnounceRequest(ih, peer_id, 7000 + n, 0, 0, left, event, None, None, None, f"n{n}")


def intervals(u: float = 0.5, **overrides: int) -> AnnounceIntervals:
    settings = dict(interval_s=60, seeder_interval_s=1800, peer_ttl_s=150)
    settings.update(overrides)
    return AnnounceIntervals(
        interval_s=settings["interval_s"],
        seeder_interval_s=settings["seeder_interval_s"],
        peer_ttl_s=settings["peer_ttl_s"],
        jitter=lambda: u,
    )


def test_a_known_seeder_gets_the_long_interval_jittered_within_ten_percent() -> None:
    assert intervals().bounds() == (1620, 1980)
    for u, told in ((0.0, 1620), (0.25, 1710), (0.5, 1800), (0.75, 1890), (0.999_999, 1980)):
        cadence = intervals(u).choose(seeding=True, event=Event.NONE, known_seeder=True)
        assert cadence == Cadence(told, 2250.0)
    # Whatever the source says within its contract, the answer is within the bounds.
    low, high = intervals().bounds()
    for n in range(1000):
        told = intervals(n / 1000).choose(seeding=True, event=Event.STARTED, known_seeder=True)
        assert low <= told.interval_s <= high
        # Kept past the latest announce it may make.
        assert told.ttl_s > high


@pytest.mark.parametrize(
    ("seeding", "event", "known"),
    [
        (False, Event.NONE, False),  # a leecher
        (False, Event.STARTED, True),  # a leecher whose identity seeded before (a new torrent)
        (True, Event.COMPLETED, True),  # a new seeder: the announce of its completion
        (True, Event.NONE, False),  # a seeder the tracker has not seen (restarted tracker)
        (True, Event.STARTED, False),  # a node that starts seeding a blob it holds
    ],
)
def test_leechers_and_new_seeders_keep_the_short_interval(
    seeding: bool, event: Event, known: bool
) -> None:
    cadence = intervals(0.0).choose(seeding=seeding, event=event, known_seeder=known)
    assert cadence == Cadence(60, 150.0)


def test_one_interval_for_everyone_when_both_are_equal() -> None:
    same = intervals(0.999, seeder_interval_s=60)
    assert same.bounds() == (60, 60)
    assert same.choose(seeding=True, event=Event.NONE, known_seeder=True) == Cadence(60, 150.0)


def test_a_seeders_interval_is_never_below_a_leechers_nor_its_lifetime() -> None:
    close = intervals(0.0, seeder_interval_s=62, peer_ttl_s=200)
    assert close.bounds() == (60, 68)
    cadence = close.choose(seeding=True, event=Event.NONE, known_seeder=True)
    assert cadence == Cadence(60, 200.0)  # 1.25 x 62 is shorter than a leecher's 200
    assert intervals().seeder_ttl_s == SEEDER_TTL_FACTOR * 1800


def _tracker(tmp_path: Path, clock: SteppedClock) -> Tracker:
    config = TrackerConfig(listen=HostPort("127.0.0.1", 0), data_dir=tmp_path)
    return Tracker(config, MemoryStore(), clock=clock)


async def test_over_the_clock_seeders_announce_rarely_and_are_kept_longer(
    tmp_path: Path,
) -> None:
    clock = SteppedClock()
    t = _tracker(tmp_path, clock)
    meta = blob_meta(tmp_path)
    digest = str(meta.digest)
    await publish_as_holder(t, meta, "n1")
    (ih,) = meta.swarm_keys
    low, high = t.swarms.intervals.bounds()
    assert (low, high) == (1620, 1980)

    # n1 published; its first announce as a seeder is news: the short interval.
    assert t.announce(ann(ih, 1, left=0, event=Event.STARTED), "10.0.0.1", "http").interval == 60
    assert t.announce(ann(ih, 2, event=Event.STARTED), "10.0.0.2", "http").interval == 60
    clock.step(60)
    # Its next one, as a seeder the tracker holds: the long one; a leecher stays short.
    assert low <= t.announce(ann(ih, 1, left=0), "10.0.0.1", "http").interval <= high
    assert t.announce(ann(ih, 2), "10.0.0.2", "http").interval == 60
    # The leecher completes: short once more, then long.
    done = t.announce(ann(ih, 2, left=0, event=Event.COMPLETED), "10.0.0.2", "http")
    assert done.interval == 60 and done.min_interval == 15
    await t.confirm_seed(digest, wire.ConfirmSeed("n2", meta.info_hash_v2))  # it verified the blob
    clock.step(60)
    assert low <= t.announce(ann(ih, 2, left=0), "10.0.0.2", "http").interval <= high
    # A third node, a leecher, goes silent: gone after peer_ttl_s; the seeders stay.
    t.announce(ann(ih, 3), "10.0.0.3", "http")
    clock.step(151)
    await t.sweep()
    assert t.peers.totals().peers == 2 and t.peers.seeders(digest) == 2
    # A seeder is kept past its longest interval (1980 s), then dropped.
    clock.step(1980 - 151)
    await t.sweep()
    assert t.peers.seeders(digest) == 2
    clock.step(2250 - 1980 - 60)  # n1 announced 60 s before n2
    await t.sweep()
    assert t.peers.seeders(digest) == 1
    clock.step(60)
    await t.sweep()
    assert t.peers.totals().peers == 0


async def test_stopped_goes_at_once_and_a_returning_seeder_is_news_again(
    tmp_path: Path,
) -> None:
    clock = SteppedClock()
    t = _tracker(tmp_path, clock)
    meta = blob_meta(tmp_path)
    await publish_as_holder(t, meta, "n1")
    (ih,) = meta.swarm_keys
    t.announce(ann(ih, 1, left=0, event=Event.STARTED), "10.0.0.1", "http")
    assert t.announce(ann(ih, 1, left=0), "10.0.0.1", "http").interval >= 1620
    stopped = t.announce(ann(ih, 1, left=0, event=Event.STOPPED), "10.0.0.1", "http")
    assert stopped.interval == 60 and t.peers.totals().peers == 0
    # Back (a restarted node): not seen since, so the short interval first.
    assert t.announce(ann(ih, 1, left=0, event=Event.STARTED), "10.0.0.1", "http").interval == 60


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"seeder_announce_interval_s": 59}, "seeder_announce_interval_s must be ≥"),
        ({"seeder_announce_interval_s": 1801}, "at least twice seeder_announce_interval_s"),
        (
            {"seeder_announce_interval_s": 600, "metainfo_idle_expiry_s": 1199},
            "at least twice seeder_announce_interval_s",
        ),
    ],
)
def test_bad_interval_settings_are_clear_errors(settings: dict[str, int], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrackerConfig(listen=HostPort("127.0.0.1", 0), **settings)  # type: ignore[arg-type]


def test_the_defaults_fit_each_other() -> None:
    config = TrackerConfig()
    assert config.seeder_announce_interval_s == 1800
    assert config.metainfo_idle_expiry_s >= 2 * config.seeder_announce_interval_s
    TrackerConfig(seeder_announce_interval_s=600, metainfo_idle_expiry_s=1200)
