"""The cluster's word on tags and manifests: told to the tracker always, taken only in an outage.

Owns what the node tells the tracker and asks it about tags and manifests.
Each tag → digest its seed registry gives is reported (tracker/tags.py) when
it differs from the last report of that tag, or `REPORT_EVERY_S` after it: at
most one report per tag per 10 minutes while the tag does not move. A
manifest the node already holds that upstream showed another repository to
hold (a tag's HEAD), or one a registry without digest HEADs gave for a tag, is
put on the tracker's shelf with that place (tracker/manifest_shelf.py); bodies
fetched by digest are put by cluster_manifests.py.
Both are sent in the background, a bounded number queued (past that one is
dropped: the next answer reports it again), so no pull waits for the tracker.
When the resolver asks — only while upstream is unreachable and only if
`enabled` (config `cluster_fallback`) — it gives the cluster's last answer for
a tag if no older than `max_age_s` (the node's own `serve_stale_s`), and a
manifest body from the shelf only if it hashes to the digest asked for and
the shelf names the repository among its places. It remembers, for
`recheck_s` (the node's `tag_ttl_s`), that a seed registry failed as if down,
so that what the cluster's word already granted is served without asking it
again on every request (a dead registry costs each request its retries); a
registry back within that time is heard at the next ask after it, as tags are.
It counts and logs each answer served on the cluster's word (`taken`). A
tracker that fails is no answer, never an error. It must not decide when upstream counts as down
(tagmap.stale_allowed does), nor parse or grant anything (the resolver and the
tenancy ledger do).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import trio

from p2preg.core import errors as tracker_errors
from p2preg.core.digest import Digest, DigestError
from p2preg.node.cluster_manifests import shelved_body
from p2preg.node.errors import RegistryError
from p2preg.node.metrics import NodeMetrics
from p2preg.node.seams import ClusterWordSeam
from p2preg.node.tagmap import MAX_TAG_ENTRIES, TagKey

log = logging.getLogger(__name__)

REPORT_EVERY_S = 600.0
MAX_PENDING = 256
# Manifests waiting to be put on the shelf (each at most 4 MiB, most a few KiB).
MAX_PENDING_MANIFESTS = 32


@dataclass(frozen=True, slots=True)
class Shelve:
    """A manifest to put on the tracker's shelf, and the place upstream showed holds it."""

    digest: Digest
    ns: str
    repository: str
    media_type: str
    body: bytes


@dataclass(frozen=True, slots=True)
class ClusterTag:
    """The cluster's last answer for a tag: the digest, how old, and whose word."""

    digest: Digest
    age_s: float
    reported_by: str


class ClusterWord:
    def __init__(
        self,
        tracker: ClusterWordSeam,
        metrics: NodeMetrics,
        *,
        enabled: bool,
        max_age_s: float,
        recheck_s: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.enabled = enabled
        self._recheck_s = recheck_s
        # Per seed registry (one per configured upstream): when it last failed as if
        # down, and how.
        self._down: dict[str, tuple[float, RegistryError]] = {}
        self._tracker = tracker
        self._metrics = metrics
        self._max_age_s = max_age_s
        self._clock = clock
        self._outbox, self._inbox = trio.open_memory_channel[tuple[TagKey, Digest]](MAX_PENDING)
        self._shelf_out, self._shelf_in = trio.open_memory_channel[Shelve](MAX_PENDING_MANIFESTS)
        # What was last queued for each tag, and when.
        self._reported: OrderedDict[TagKey, tuple[Digest, float]] = OrderedDict()

    # -- telling -------------------------------------------------------------------

    def heard(self, key: TagKey, digest: Digest) -> None:
        """Upstream just said the tag `key` points at `digest`: report it if it is news."""
        now = self._clock()
        last = self._reported.get(key)
        if last is not None and last[0] == digest and 0 <= now - last[1] < REPORT_EVERY_S:
            return
        try:
            self._outbox.send_nowait((key, digest))
        except trio.WouldBlock:
            return  # the tracker is slow: upstream's next answer for the tag reports it
        self._reported[key] = (digest, now)
        self._reported.move_to_end(key)
        while len(self._reported) > MAX_TAG_ENTRIES:
            self._reported.popitem(last=False)

    def shelve(self, item: Shelve) -> None:
        """Upstream gave this manifest (verified), or showed `repository` holds it."""
        try:
            self._shelf_out.send_nowait(item)
        except trio.WouldBlock:
            log.info("manifest %s not put on the tracker's shelf: too many queued", item.digest)

    async def report_forever(self) -> None:
        """Send the queued reports and manifests; run it in the node's nursery."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._send_manifests)
            await self._send_tags()

    async def _send_manifests(self) -> None:
        async for m in self._shelf_in:
            try:
                await self._tracker.put_manifest(m.digest, m.ns, m.repository, m.media_type,
                                                 m.body)  # fmt: skip
            except tracker_errors.TrackerError as e:
                log.info("manifest %s not put on the tracker's shelf: %s", m.digest, e)

    async def _send_tags(self) -> None:
        async for key, digest in self._inbox:
            ns, repository, tag, accept = key
            try:
                await self._tracker.report_tag(ns, repository, tag, digest, accept)
            except tracker_errors.TrackerError as e:
                self._reported.pop(key, None)  # reported again at the next answer
                log.info("tag %s:%s of %s not reported to the tracker: %s", repository, tag, ns, e)

    # -- asking --------------------------------------------------------------------

    async def tag(self, key: TagKey) -> ClusterTag | None:
        """The cluster's last answer for the tag, if allowed, known and recent enough."""
        if not self.enabled:
            return None
        ns, repository, tag, accept = key
        try:
            answer = await self._tracker.query_tag(ns, repository, tag, accept)
        except tracker_errors.TrackerError as e:
            log.warning("tag %s:%s of %s: the tracker did not answer: %s", repository, tag, ns, e)
            return None
        if answer.digest is None:
            return None
        if answer.age_s > self._max_age_s:
            log.info("tag %s:%s of %s: the cluster's answer is %.0f s old, past serve_stale_s",
                     repository, tag, ns, answer.age_s)  # fmt: skip
            return None
        try:
            digest = Digest.parse(answer.digest)
        except DigestError:
            log.warning("tag %s:%s of %s: the tracker sent a malformed digest", repository, tag, ns)
            return None
        return ClusterTag(digest, answer.age_s, answer.reported_by or "?")

    async def manifest(self, ns: str, repository: str, digest: Digest) -> bytes | None:
        """The shelf's body for `digest`, if allowed, verified, and said to be `repository`'s."""
        if not self.enabled:
            return None
        shelved = await shelved_body(self._tracker, digest)
        if shelved is None:
            return None
        if f"{ns}/{repository}" not in shelved.places:
            said = ", ".join(shelved.places[:4]) or "no place"
            log.warning("manifest %s: refused for %s on %s: the cluster said it is in %s only",
                        digest, repository, ns, said)  # fmt: skip
            return None
        return shelved.body

    def note_down(self, ns: str, error: RegistryError) -> None:
        """Seed registry `ns` just failed as if down (tagmap.stale_allowed said so)."""
        self._down[ns] = (self._clock(), error)

    def outage(self, ns: str) -> RegistryError | None:
        """How `ns` failed, if it did within `recheck_s`: ask it nothing until then."""
        seen = self._down.get(ns)
        if not self.enabled or seen is None or not 0 <= self._clock() - seen[0] < self._recheck_s:
            return None
        return seen[1]

    def taken(self, kind: str, what: str, why: str) -> None:
        """An answer was served on the cluster's word (`kind`: tag, manifest or blob)."""
        self._metrics.cluster_fallback_answers.labels(kind).inc()
        log.warning("stale: %s served on the cluster's word while upstream is unreachable (%s)",
                    what, why)  # fmt: skip
