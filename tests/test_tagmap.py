"""The tag map's rules (p2preg/node/tagmap.py), driven directly with explicit times.

Which upstream failures let a stale tag answer, how long it may, what a 404
does to it, when upstream is asked again, and the map's bound.
"""

from __future__ import annotations

import pytest

from p2preg.core.digest import Digest
from p2preg.node.errors import (
    Denied,
    ManifestUnknown,
    RegistryError,
    UpstreamError,
    UpstreamServerError,
    UpstreamUnauthorized,
    UpstreamUnavailable,
)
from p2preg.node.tagmap import TagKey, TagMap, stale_allowed

KEY: TagKey = ("seed.test", "team/app", "latest", "")
OLD = Digest.of(b"old", "sha256")
NEW = Digest.of(b"new", "sha256")
TTL_S, STALE_S = 30.0, 3600.0


@pytest.mark.parametrize(
    ("error", "allowed"),
    [
        (UpstreamUnavailable("seed registry seed.test unreachable: ConnectError"), True),
        (UpstreamUnavailable("seed registry seed.test unreachable: ConnectTimeout"), True),
        (UpstreamUnavailable("seed registry rate-limited team/app/manifests/latest"), True),
        (UpstreamServerError("seed registry answered 503 for team/app/manifests/latest"), True),
        (UpstreamServerError("token service answered 500"), True),
        (ManifestUnknown("manifest latest of team/app is unknown to the seed registry"), False),
        (UpstreamUnauthorized("seed registry denied access to team/app"), False),
        (Denied("no"), False),
        (UpstreamError("seed registry sent a manifest that does not match sha256:…"), False),
        (RegistryError("anything else"), False),
    ],
)
def test_only_an_upstream_that_is_down_lets_a_stale_tag_answer(
    error: RegistryError, allowed: bool
) -> None:
    assert stale_allowed(error) is allowed


def test_a_tag_is_fresh_for_one_ttl_after_upstream_answered() -> None:
    tags = TagMap(ttl_s=TTL_S, stale_s=STALE_S)
    assert tags.fresh(KEY, 100.0) is None
    tags.seen(KEY, OLD, 100.0)
    entry = tags.fresh(KEY, 100.0 + TTL_S - 1)
    assert entry is not None and entry.digest == OLD and not entry.is_stale
    assert tags.fresh(KEY, 100.0 + TTL_S) is None
    assert tags.fresh(KEY, 99.0) is None  # the clock went back: ask upstream


def test_a_stale_answer_is_bounded_by_when_upstream_last_gave_it() -> None:
    tags = TagMap(ttl_s=TTL_S, stale_s=STALE_S)
    tags.seen(KEY, OLD, 0.0)
    entry = tags.stale(KEY, STALE_S)
    assert entry is not None and entry.digest == OLD
    # Asking again during the outage does not move the bound: it counts from
    # upstream's last answer, not from the last stale one.
    assert tags.stale(KEY, STALE_S + 1) is None
    assert tags.stale(("seed.test", "team/app", "other", ""), 1.0) is None


def test_after_a_stale_answer_upstream_is_asked_again_one_ttl_later() -> None:
    tags = TagMap(ttl_s=TTL_S, stale_s=STALE_S)
    tags.seen(KEY, OLD, 0.0)
    assert tags.stale(KEY, 500.0) is not None
    held = tags.fresh(KEY, 500.0 + TTL_S - 1)
    assert held is not None and held.digest == OLD and held.is_stale
    assert tags.fresh(KEY, 500.0 + TTL_S) is None  # upstream is asked: a moved tag shows
    tags.seen(KEY, NEW, 500.0 + TTL_S)
    moved = tags.fresh(KEY, 500.0 + TTL_S)
    assert moved is not None and moved.digest == NEW and not moved.is_stale


def test_serve_stale_zero_never_answers_stale() -> None:
    tags = TagMap(ttl_s=TTL_S, stale_s=0)
    tags.seen(KEY, OLD, 0.0)
    assert tags.stale(KEY, 0.0) is None


def test_a_tag_upstream_says_is_gone_is_forgotten_and_never_answered_stale() -> None:
    tags = TagMap(ttl_s=TTL_S, stale_s=STALE_S)
    tags.seen(KEY, OLD, 0.0)
    tags.take_unsaved()
    tags.forget(KEY)
    assert tags.stale(KEY, 1.0) is None and tags.fresh(KEY, 1.0) is None
    assert tags.take_unsaved() == [(KEY, None)]


def test_the_map_is_bounded_and_its_changes_are_handed_over_once() -> None:
    tags = TagMap(ttl_s=TTL_S, stale_s=STALE_S, max_entries=2)
    for i in range(3):
        tags.seen(("seed.test", "team/app", f"t{i}", ""), OLD, float(i))
    assert len(tags) == 2 and tags.get(("seed.test", "team/app", "t0", "")) is None
    assert [key[2] for key, _ in tags.take_unsaved()] == ["t1", "t2"]
    assert tags.take_unsaved() == []


def test_loaded_entries_count_as_asked_when_upstream_gave_them() -> None:
    tags = TagMap(ttl_s=TTL_S, stale_s=STALE_S)
    tags.load([(KEY, OLD, 100.0)])
    assert tags.fresh(KEY, 110.0) is not None and tags.fresh(KEY, 100.0 + TTL_S) is None
    assert tags.take_unsaved() == []  # already on disk
    with pytest.raises(ValueError):
        TagMap(ttl_s=-1, stale_s=0)
