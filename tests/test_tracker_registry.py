"""The metainfo registry (tracker/registry.py) on its own: decisions, then changes.

Including a CA rotation: metainfo rooted at the tracker's current CA replaces a
digest's metainfo rooted at another CA; any other second torrent is a conflict.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.tlscerts import ClusterCA
from p2preg.core import errors
from p2preg.core.metainfo import Metainfo, canonical_roots
from tests.tracker_helpers import blob_meta, blob_path, remake
from tracker.metainfo import make_metainfo
from tracker.registry import MetainfoRegistry, Rerooted


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


# -- a CA rotation ----------------------------------------------------------------


def _rooted(tmp_path: Path, meta: Metainfo, ca: ClusterCA) -> Metainfo:
    path = blob_path(tmp_path, meta.digest)
    return make_metainfo(path, meta.digest, meta.size, root=ca.cert_pem)


def _root(ca: ClusterCA) -> bytes:
    return canonical_roots([ca.cert_pem])[0]


def test_metainfo_rooted_at_the_trackers_current_ca_replaces_an_older_roots(
    tmp_path: Path,
) -> None:
    old_ca, new_ca = ClusterCA.make("rot"), ClusterCA.make("rot")
    plain = blob_meta(tmp_path, 20_000)
    old, new = _rooted(tmp_path, plain, old_ca), _rooted(tmp_path, plain, new_ca)
    digest = str(plain.digest)
    registry = MetainfoRegistry(max_metainfo=1)
    registry.install(old, "n1")
    # The tracker still on the old CA: the new root is the odd one out.
    with pytest.raises(errors.MetainfoConflict, match="already has metainfo"):
        registry.check_publish(new, current_root=_root(old_ca))
    # The tracker moved to the new CA: the cluster is moving, the old torrent goes
    # (even at the cap: nothing is added).
    decision = registry.check_publish(new, current_root=_root(new_ca))
    assert decision == Rerooted(old)
    entry = registry.reroot(old, new, "n2")
    assert entry.published_by == "n2" and registry.lookup(digest).metainfo == new.data
    assert registry.digest_of(old.swarm_keys[0]) is None
    assert registry.digest_of(new.swarm_keys[0]) == digest
    assert len(registry) == 1
    # Re-publishing it is idempotent; the old root cannot come back while the
    # tracker is on the new one (a node not yet re-issued), whatever it claims.
    assert registry.check_publish(new, current_root=_root(new_ca)) == entry
    with pytest.raises(errors.MetainfoConflict, match="already has metainfo"):
        registry.check_publish(old, current_root=_root(new_ca))
    # A root change is not a verdict on the torrent: the old one was not marked bad.
    fresh = MetainfoRegistry(max_metainfo=1)
    fresh.install(new, "n2")
    assert fresh.check_publish(old, current_root=_root(old_ca)) == Rerooted(new)


def test_same_root_different_torrent_stays_a_conflict_whatever_the_current_root(
    tmp_path: Path,
) -> None:
    ca = ClusterCA.make("rot")
    plain = blob_meta(tmp_path, 20_000)
    rooted = _rooted(tmp_path, plain, ca)
    hybrid = make_metainfo(
        blob_path(tmp_path, plain.digest), plain.digest, plain.size, hybrid=True,
        root=ca.cert_pem,
    )
    registry = MetainfoRegistry(max_metainfo=10)
    registry.install(rooted, "n1")
    for current in (_root(ca), None, _root(ClusterCA.make("rot"))):
        with pytest.raises(errors.MetainfoConflict, match="already has metainfo"):
            registry.check_publish(hybrid, current_root=current)
    # A plain cluster has no current root: plain torrents keep today's rule.
    other = blob_meta(tmp_path, 30_000)
    registry.install(other, "n1")
    with pytest.raises(errors.MetainfoConflict, match="already has metainfo"):
        registry.check_publish(remake(tmp_path, other, hybrid=True), current_root=None)


def test_a_torrent_reported_bad_is_not_brought_back_by_a_rotation(tmp_path: Path) -> None:
    old_ca, new_ca = ClusterCA.make("rot"), ClusterCA.make("rot")
    plain = blob_meta(tmp_path, 20_000)
    old, new = _rooted(tmp_path, plain, old_ca), _rooted(tmp_path, plain, new_ca)
    registry = MetainfoRegistry(max_metainfo=10)
    registry.install(old, "n1")
    registry.mark_bad(str(plain.digest), new.info_hash_v2)
    with pytest.raises(errors.MetainfoConflict, match="reported bad"):
        registry.check_publish(new, current_root=_root(new_ca))
