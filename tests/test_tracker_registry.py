"""The metainfo registry (tracker/registry.py) and its disputes (tracker/disputes.py)
on their own: decisions, then changes.

Including a CA rotation: metainfo rooted at the tracker's current CA replaces a
digest's metainfo rooted at another CA; any other second torrent is a conflict.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness.tlscerts import ClusterCA
from p2preg.core import errors
from p2preg.core.metainfo import Metainfo, canonical_roots
from tests.tracker_helpers import blob_meta, blob_path, remake
from tracker.disputes import (
    OVERTURNED,
    REPLACED,
    UPHELD,
    Dispute,
    Quarantines,
    Settlement,
    check_definer,
    settle,
    verifier_of,
)
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


def _garbage(tmp_path: Path, like: Metainfo) -> Metainfo:
    """A well-formed torrent for `like`'s digest and size, made from other bytes."""
    path = tmp_path / f"garbage-{like.digest.hex}"
    path.write_bytes(os.urandom(like.size))
    return make_metainfo(path, like.digest, like.size, root=like.root_cert)


def test_a_report_opens_a_dispute_and_replaces_nothing(tmp_path: Path) -> None:
    registry = MetainfoRegistry(max_metainfo=10)
    honest = blob_meta(tmp_path, 20_000)
    digest = str(honest.digest)
    garbage = _garbage(tmp_path, honest)
    registry.install(honest, "honest")
    with pytest.raises(errors.NotFound):
        registry.check_report("sha256:" + "00" * 32, honest.swarm_keys[0], garbage, "evil")
    with pytest.raises(errors.InvalidMetainfo, match="replacement is the metainfo"):
        registry.check_report(digest, honest.swarm_keys[0], honest, "evil")
    with pytest.raises(errors.InvalidRequest, match="published this metainfo itself"):
        registry.check_report(digest, honest.swarm_keys[0], garbage, "honest")
    dispute = registry.check_report(digest, honest.swarm_keys[0], garbage, "evil", reason="x")
    assert dispute is not None and dispute.party("evil") and dispute.party("honest")
    registry.open_dispute(digest, dispute)
    # The stored torrent stays stored and keeps its swarm; the report's is not indexed.
    assert registry.lookup(digest).metainfo == honest.data
    assert registry.digest_of(honest.swarm_keys[0]) == digest
    assert registry.digest_of(garbage.swarm_keys[0]) is None
    # The same report again is the same dispute; another one waits for its settlement.
    assert registry.check_report(digest, honest.swarm_keys[0], garbage, "other") is None
    with pytest.raises(errors.MetainfoConflict, match="disputed already"):
        registry.check_report(digest, honest.swarm_keys[0], _garbage(tmp_path, honest), "o")
    # Publishing either candidate settles nothing unless the verifier does it.
    assert registry.check_publish(honest) == registry.get(digest)
    with pytest.raises(errors.MetainfoConflict, match="disputed"):
        registry.check_publish(garbage)


def test_the_issue_sequence_the_honest_side_wins_by_verification(tmp_path: Path) -> None:
    """Honest publish → a report with a torrent made from garbage → the honest
    torrent stays, by a third node's verification, and the reporter loses."""
    registry = MetainfoRegistry(max_metainfo=10)
    honest = blob_meta(tmp_path, 20_000)
    digest = str(honest.digest)
    garbage = _garbage(tmp_path, honest)
    registry.install(honest, "honest")
    dispute = registry.check_report(digest, honest.swarm_keys[0], garbage, "evil")
    assert dispute is not None
    registry.open_dispute(digest, dispute)
    # The verifier fetched the blob upstream and made the deterministic torrent.
    verified = remake(tmp_path, honest, hybrid=False)
    settlement = registry.check_publish(verified, verifier="third")
    assert isinstance(settlement, Settlement)
    assert (settlement.outcome, settlement.losers, settlement.changed) == (
        UPHELD, ("evil",), False
    )
    entry = registry.apply(digest, settlement)
    assert entry.meta == honest and entry.published_by == "honest"
    assert registry.dispute(digest) is None and registry.disputes() == 0
    # Nothing is blacklisted: the loser's torrent is just another conflicting one.
    with pytest.raises(errors.MetainfoConflict, match="already has metainfo"):
        registry.check_publish(garbage)


def test_poison_published_first_is_overturned_by_verification(tmp_path: Path) -> None:
    registry = MetainfoRegistry(max_metainfo=10)
    honest = blob_meta(tmp_path, 20_000)
    digest = str(honest.digest)
    garbage = _garbage(tmp_path, honest)
    registry.install(garbage, "evil")
    dispute = registry.check_report(digest, garbage.swarm_keys[0], honest, "honest")
    assert dispute is not None
    registry.open_dispute(digest, dispute)
    settlement = registry.check_publish(honest, verifier="third")
    assert isinstance(settlement, Settlement)
    assert (settlement.outcome, settlement.losers) == (OVERTURNED, ("evil",))
    entry = registry.apply(digest, settlement)
    assert entry.meta == honest and entry.published_by == "honest"
    assert registry.digest_of(garbage.swarm_keys[0]) is None
    assert registry.digest_of(honest.swarm_keys[0]) == digest


def test_when_neither_candidate_is_the_verified_one_both_authors_lose(tmp_path: Path) -> None:
    honest = blob_meta(tmp_path, 20_000)
    stored, challenger = _garbage(tmp_path, honest), _garbage(tmp_path, honest)
    dispute = Dispute(challenger, "r", "x", "p", 0.0)
    settlement = settle(stored, dispute, honest, "v")
    assert settlement == Settlement(REPLACED, honest, "v", ("p", "r"), True)
    # A candidate rooted at another CA is a rotation, not a lie: its author keeps its rights.
    ca = ClusterCA.make("rot")
    rooted = _rooted(tmp_path, honest, ca)
    other_root = make_metainfo(
        blob_path(tmp_path, honest.digest), honest.digest, honest.size,
        root=ClusterCA.make("rot").cert_pem,
    )
    dispute = Dispute(other_root, "r", "x", "p", 0.0)
    assert settle(_rooted_garbage(tmp_path, honest, ca), dispute, rooted, "v").losers == ("p",)


def _rooted_garbage(tmp_path: Path, like: Metainfo, ca: ClusterCA) -> Metainfo:
    path = tmp_path / f"rg-{like.digest.hex}"
    path.write_bytes(os.urandom(like.size))
    return make_metainfo(path, like.digest, like.size, root=ca.cert_pem)


def test_who_may_define_and_quarantines_expire(tmp_path: Path) -> None:
    now = [100.0]
    book = Quarantines(60.0, lambda: now[0])
    check_definer("sha256:x", "holder", "holder")
    with pytest.raises(errors.Forbidden, match="only the holder of the upstream lease"):
        check_definer("sha256:x", "other", "holder")
    with pytest.raises(errors.Forbidden):
        check_definer("sha256:x", "other", None)
    dispute = Dispute(blob_meta(tmp_path, 20_000), "r", "x", "p", 0.0)
    assert verifier_of(dispute, "v", "v") == "v"
    assert verifier_of(dispute, "v", "w") is None  # not the lease holder
    assert verifier_of(dispute, "r", "r") is None and verifier_of(dispute, "p", "p") is None
    assert verifier_of(None, "v", "v") is None
    assert book.add("evil", "sha256:x") == 160.0
    with pytest.raises(errors.Forbidden, match="may not publish metainfo for 60 s more"):
        book.check("evil", "publish metainfo")
    book.check("honest", "publish metainfo")
    now[0] = 160.0
    book.check("evil", "publish metainfo")
    assert book.until("evil") is None and len(book) == 0
    book.add("a", "d")
    now[0] = 500.0
    assert book.expire() == ["a"]


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


def test_a_rotation_cannot_swap_a_disputed_torrent(tmp_path: Path) -> None:
    old_ca, new_ca = ClusterCA.make("rot"), ClusterCA.make("rot")
    plain = blob_meta(tmp_path, 20_000)
    old, new = _rooted(tmp_path, plain, old_ca), _rooted(tmp_path, plain, new_ca)
    registry = MetainfoRegistry(max_metainfo=10)
    registry.install(old, "n1")
    dispute = registry.check_report(
        str(plain.digest), old.swarm_keys[0], _rooted_garbage(tmp_path, plain, old_ca), "n2"
    )
    assert dispute is not None
    registry.open_dispute(str(plain.digest), dispute)
    with pytest.raises(errors.MetainfoConflict, match="disputed"):
        registry.check_publish(new, current_root=_root(new_ca))
