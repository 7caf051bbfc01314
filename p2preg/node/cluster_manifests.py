"""Manifest bodies through the cluster: one upstream GET per digest for all the nodes.

Owns how a node that lacks a manifest body (by digest) gets it while upstream
answers: from the tracker's shelf if a node already put it there; else under
the digest's upstream lease, the same lease book as blobs (leasewait.py reads
every reply but one): the holder GETs the body upstream (the caller's
`from_upstream`, which verifies it), puts it on the shelf and releases; the
others wait on the lease until the put answers them SEEDED, the one reply a
manifest's lease gives that a blob's does not, and take the body from the shelf.
Every body from the shelf is checked against its digest here, whoever put it.
A tracker that is away, refuses or fails, a wait that passes its bounds, a body
that does not match: the node GETs upstream itself, as without a tracker, and
offers the body to the shelf. Within the node, one flight per digest. It must
not decide whether a repository holds a manifest (the resolver asks upstream)
nor parse manifests.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from p2preg.core import errors as tracker_errors
from p2preg.core.digest import Digest
from p2preg.core.wire import LeaseReply, LeaseStatus, ManifestBody
from p2preg.node.holding import Renewals
from p2preg.node.leasewait import (
    Ask,
    AskAgain,
    Blob,
    Due,
    FallBack,
    FetchAsHolder,
    JoinSwarm,
    LeaseWait,
    Replied,
    TrackerFailed,
)
from p2preg.node.metrics import NodeMetrics
from p2preg.node.seams import HolderSeam

log = logging.getLogger(__name__)

# What a manifest body source is counted as (p2preg_manifest_bodies_total).
SOURCES = ("cluster", "upstream_holder", "upstream")
# Failed flights of a digest one asker waits through before fetching on its own.
MAX_FLIGHT_WAITS = 3


class ShelfSeam(HolderSeam, Protocol):
    """What of the tracker's control API this needs (tracker.client.TrackerClient)."""

    async def get_manifest(self, digest: Digest) -> ManifestBody | None: ...

    async def put_manifest(
        self, digest: Digest, ns: str, repository: str, media_type: str, body: bytes
    ) -> None: ...

    async def acquire_lease(
        self,
        digest: Digest,
        *,
        size: int | None = None,
        wait_s: float = 0.0,
        group: str | None = None,
        order: int = 0,
        manifest: bool = False,
    ) -> LeaseReply: ...


class ShelfReader(Protocol):
    async def get_manifest(self, digest: Digest) -> ManifestBody | None: ...


async def shelved_body(tracker: ShelfReader, digest: Digest) -> ManifestBody | None:
    """The tracker's shelved body for `digest` if it hashes to it; None if the shelf has
    none, the tracker fails, or it sent other bytes (whoever put them)."""
    try:
        found = await tracker.get_manifest(digest)
    except tracker_errors.TrackerError as e:
        log.info("manifest %s: the tracker's shelf did not answer: %s", digest, e)
        return None
    if found is not None and Digest.of(found.body, digest.algorithm) != digest:
        log.error("manifest %s: the tracker's shelf sent other bytes; refused", digest)
        return None
    return found


class _Shelved:
    """The tracker answered a manifest's lease SEEDED: the body is on the shelf."""


class _Flight:
    """One fetch of a digest on this node; `body` once it succeeded."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.body: bytes | None = None


Upstream = Callable[[], Awaitable[tuple[str, bytes]]]


class ClusterManifests:
    def __init__(
        self,
        tracker: ShelfSeam,
        metrics: NodeMetrics,
        lease_wait_max_s: float,
        *,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self._tracker = tracker
        self._metrics = metrics
        self._wait_max_s = lease_wait_max_s
        self._clock = clock
        # Fetches in flight on this node, by digest: a second asker waits for the first.
        self._flights: dict[Digest, _Flight] = {}

    async def body(
        self, digest: Digest, ns: str, repository: str, from_upstream: Upstream
    ) -> bytes:
        """The body of `digest`, verified; `from_upstream` GETs it (media type, verified
        body) from `ns`'s `repository`, which the caller knows holds it."""
        for _ in range(MAX_FLIGHT_WAITS):
            flight = self._flights.get(digest)
            if flight is None:
                break
            await flight.done.wait()
            if flight.body is not None:
                return flight.body
            # It failed (an upstream error of its own, or its asker left): try again.
        else:
            return await self._fetch(digest, ns, repository, from_upstream)
        mine = self._flights[digest] = _Flight()
        try:
            mine.body = await self._fetch(digest, ns, repository, from_upstream)
            return mine.body
        finally:
            if self._flights.get(digest) is mine:
                del self._flights[digest]
            mine.done.set()

    async def _fetch(
        self, digest: Digest, ns: str, repository: str, from_upstream: Upstream
    ) -> bytes:
        found = await self._shelved(digest, ns, repository)
        if found is not None:
            return found
        outcome = await self._await_lease(digest)
        if isinstance(outcome, _Shelved):
            found = await self._shelved(digest, ns, repository)
            if found is not None:
                return found
            outcome = FallBack("tracker", "the shelf lost the body it said it holds")
        if isinstance(outcome, FetchAsHolder):
            try:
                media_type, body = await self._renewing(digest, outcome, from_upstream)
                self._metrics.manifest_bodies.labels("upstream_holder").inc()
                await self._put(digest, ns, repository, media_type, body)
            finally:
                with trio.CancelScope(shield=True):
                    await self._release(digest, outcome.lease_id)
            return body
        assert isinstance(outcome, FallBack)
        log.warning("manifest %s: fetching it upstream (%s): %s", digest, outcome.reason,
                    outcome.message)  # fmt: skip
        media_type, body = await from_upstream()
        self._metrics.manifest_bodies.labels("upstream").inc()
        await self._put(digest, ns, repository, media_type, body)
        return body

    async def _shelved(self, digest: Digest, ns: str, repository: str) -> bytes | None:
        """The shelf's body if it matches `digest`; None if none, or the tracker fails.

        A shelf that does not list `repository` among the body's places is told it:
        upstream proved the repository holds it, and the outage fallback
        (clusterword.py) serves a body only where the shelf places it."""
        found = await shelved_body(self._tracker, digest)
        if found is None:
            return None
        self._metrics.manifest_bodies.labels("cluster").inc()
        if f"{ns}/{repository}" not in found.places:
            await self._put(digest, ns, repository, found.media_type, found.body)
        return found.body

    async def _await_lease(self, digest: Digest) -> _Shelved | FetchAsHolder | FallBack:
        """Ask for the digest's lease until it is ours, the body is shelved, or we give up."""
        wait = LeaseWait(self._wait_max_s, self._clock, blob=Blob(str(digest)))
        action = wait.step(Due())
        while True:
            if isinstance(action, Ask):
                try:
                    reply = await self._tracker.acquire_lease(
                        digest, wait_s=action.wait_s, manifest=True
                    )
                except tracker_errors.TrackerError as e:
                    action = wait.step(TrackerFailed(str(e), e.code))
                    continue
                if reply.status is LeaseStatus.SEEDED:
                    return _Shelved()
                action = wait.step(Replied(reply))
            elif isinstance(action, AskAgain):
                if action.after_s > 0:
                    await trio.sleep(action.after_s)
                action = wait.step(Due())
            elif isinstance(action, JoinSwarm):  # SEEDED never reaches the wait
                return FallBack("tracker", "tracker named a torrent for a manifest")
            else:
                return action

    async def _put(
        self, digest: Digest, ns: str, repository: str, media_type: str, body: bytes
    ) -> None:
        try:
            await self._tracker.put_manifest(digest, ns, repository, media_type, body)
        except tracker_errors.TrackerError as e:
            log.info("manifest %s: not put on the tracker's shelf: %s", digest, e)

    async def _renewing(
        self, digest: Digest, lease: FetchAsHolder, from_upstream: Upstream
    ) -> tuple[str, bytes]:
        """`from_upstream()` with the lease renewed meanwhile; its error comes out as
        itself (the resolver reads an unreachable upstream), not in a group."""
        got: list[tuple[str, bytes]] = []
        failed: list[Exception] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(Renewals(self._tracker, digest, lease, None).run)
            try:
                got.append(await from_upstream())
            except Exception as e:
                failed.append(e)
            nursery.cancel_scope.cancel()
        if failed:
            raise failed[0]
        return got[0]

    async def _release(self, digest: Digest, lease_id: str) -> None:
        try:
            await self._tracker.release_lease(digest, lease_id)
        except tracker_errors.TrackerError as e:
            log.info("lease release for manifest %s: %s", digest, e)
