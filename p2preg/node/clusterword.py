"""The cluster's word about tags: told to the tracker always, taken only during an outage.

Owns what the node tells the tracker and asks it about tags. Each tag → digest
its seed registry gives is reported (tracker/tags.py) when it differs from
the last report of that tag, or `REPORT_EVERY_S` after it: at most one report
per tag per 10 minutes while the tag does not move, sent in the background
(at most `MAX_PENDING` queued; past that a report is dropped and made again
at the next answer), so no pull waits for the tracker. When the resolver asks
— only while upstream is unreachable and only if `enabled` (config
`cluster_fallback`) — it gives the cluster's last answer for a tag if it is no
older than `max_age_s` (the node's own `serve_stale_s`). It counts and logs
each answer served on the cluster's word (`taken`). A tracker that fails is
no answer, never an error. It must not decide when upstream counts as down
(tagmap.stale_allowed does), nor verify or grant anything (the resolver and
the tenancy ledger do).
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
from p2preg.node.metrics import NodeMetrics
from p2preg.node.seams import TagWordSeam
from p2preg.node.tagmap import MAX_TAG_ENTRIES, TagKey

log = logging.getLogger(__name__)

REPORT_EVERY_S = 600.0
MAX_PENDING = 256


@dataclass(frozen=True, slots=True)
class ClusterTag:
    """The cluster's last answer for a tag: the digest, how old, and whose word."""

    digest: Digest
    age_s: float
    reported_by: str


class ClusterWord:
    def __init__(
        self,
        tracker: TagWordSeam,
        metrics: NodeMetrics,
        *,
        enabled: bool,
        max_age_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.enabled = enabled
        self._tracker = tracker
        self._metrics = metrics
        self._max_age_s = max_age_s
        self._clock = clock
        self._outbox, self._inbox = trio.open_memory_channel[tuple[TagKey, Digest]](MAX_PENDING)
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

    async def report_forever(self) -> None:
        """Send the queued reports, one at a time; run it in the node's nursery."""
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

    def taken(self, kind: str, what: str, why: str) -> None:
        """An answer was served on the cluster's word (`kind`: tag, manifest or blob)."""
        self._metrics.cluster_fallback_answers.labels(kind).inc()
        log.warning("stale: %s served on the cluster's word while upstream is unreachable (%s)",
                    what, why)  # fmt: skip
