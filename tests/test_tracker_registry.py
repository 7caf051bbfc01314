"""The metainfo registry (tracker/registry.py) on its own: decisions, then changes."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2preg.core import errors
from tests.tracker_helpers import blob_meta, remake
from tracker.registry import MetainfoRegistry


def test_publish_decisions_and_the_cap_counts_reservations(tmp_path: Path) -> None:
    registry = MetainfoRegistry(max_metainfo=2)
    first, second, third = (blob_meta(tmp_path, 20_000) for _ in range(3))
    assert registry.check_publish(first) is None
    entry = registry.install(first, "n1")
    # The same torrent again: the filed entry, whoever asks.
    assert registry.check_publish(first) == entry
    assert registry.digest_of(first.swarm_keys[0]) == str(first.digest)
    # A place reserved for a commit in flight counts against the cap.
    registry.reserve(str(second.digest))
    with pytest.raises(errors.LimitReached):
        registry.check_publish(third)
    registry.unreserve(str(second.digest))
    assert registry.check_publish(third) is None
    # Another torrent for a filed digest is a conflict.
    with pytest.raises(errors.MetainfoConflict, match="already has metainfo"):
        registry.check_publish(remake(tmp_path, first, hybrid=True))


def test_a_report_replaces_and_the_bad_torrent_never_comes_back(tmp_path: Path) -> None:
    registry = MetainfoRegistry(max_metainfo=10)
    meta = blob_meta(tmp_path, 20_000)
    digest = str(meta.digest)
    hybrid = remake(tmp_path, meta, hybrid=True)
    registry.install(meta, "n1")
    with pytest.raises(errors.NotFound):
        registry.check_report("sha256:" + "00" * 32, meta.swarm_keys[0], hybrid)
    with pytest.raises(errors.InvalidMetainfo, match="replacement is the metainfo"):
        registry.check_report(digest, meta.swarm_keys[0], meta)
    old = registry.check_report(digest, meta.swarm_keys[0], hybrid)
    assert old == meta
    entry = registry.replace(old, hybrid, "n2")
    assert entry.published_by == "n2" and registry.lookup(digest).metainfo == hybrid.data
    assert registry.digest_of(meta.swarm_keys[0]) is None
    assert {registry.digest_of(k) for k in hybrid.swarm_keys} == {digest}
    with pytest.raises(errors.MetainfoConflict, match="reported bad"):
        registry.check_publish(meta)
    with pytest.raises(errors.MetainfoConflict, match="no longer"):
        registry.check_report(digest, meta.swarm_keys[0], meta)
    assert len(registry) == 1
