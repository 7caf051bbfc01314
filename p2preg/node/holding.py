"""A lease holder's side of its lease: renewals on a cadence, and the release.

Owns how a node that holds an upstream lease (a blob's, fetch.py; a manifest
body's, cluster_manifests.py) keeps it: the grant acknowledged at once (the
tracker's grant is provisional until then, `lease_grant_ack_s`; a holder
acknowledges before its first upstream byte, so a grant the tracker passed on
meanwhile costs no copy), then a renewal every `renew_s` until the release,
each with the most bytes fetched yet and a timeout of its own, so a hung
tracker replica costs a renewal, not the lease (the tracker passes the fetch
on from a holder silent for `lease_silence_s`); and a release whose failure
is only logged. It must not decide whether to hold a lease
(leasewait.py does) nor fetch anything.
"""

from __future__ import annotations

import logging

import trio

from p2preg.core import errors as tracker_errors
from p2preg.core.digest import Digest
from p2preg.node.leasewait import FetchAsHolder
from p2preg.node.seams import HolderSeam

log = logging.getLogger(__name__)


class Renewals:
    """A holder's renewals: one at once (the grant's acknowledgement), then every
    `renew_s` until `stop` (the release).

    Each renewal carries the most bytes fetched yet and gets `renew_timeout_s`
    per tracker, so a hung one costs a renewal, not the lease: the tracker
    passes the fetch on from a holder silent for `lease_silence_s`. One that
    timed out is followed at once (the client has moved to the next tracker). `run` goes
    in the node's nursery, not around the fetch: the fetch's own exception (an
    upstream that failed) comes out as itself, not in a group.
    """

    def __init__(
        self, tracker: HolderSeam, digest: Digest, lease: FetchAsHolder, size: int | None
    ) -> None:
        self.digest = digest
        self.lease = lease
        self._tracker = tracker
        self._size: int | None = size
        self._done = 0
        self._scope = trio.CancelScope()
        self._acknowledged = False

    async def acknowledge(self) -> bool:
        """The first renewal, at once: False if the tracker passed the grant on before
        it arrived (then this node must not fetch). Any other failure counts as sent
        and is followed at once by `run`, as a renewal lost to a hung tracker is."""
        try:
            await self._tracker.renew_lease(
                self.digest, self.lease.lease_id, self._done, self._size,
                timeout_s=self.lease.renew_timeout_s,
            )
        except tracker_errors.LeaseLost as e:
            log.info("lease for %s passed on before this node acknowledged it: %s",
                     self.digest, e)  # fmt: skip
            return False
        except tracker_errors.TrackerError as e:  # `run` sends the next at once
            log.warning("lease acknowledgement for %s failed: %s", self.digest, e)
            return True
        self._acknowledged = True
        return True

    def progress(self, n: int) -> None:
        # The tracker refuses progress that goes backwards; a retry after a
        # digest mismatch starts again from 0, so report the most fetched yet.
        self._done = max(self._done, n)

    def fetched(self, size: int) -> None:
        self._done = self._size = size

    def stop(self) -> None:
        self._scope.cancel()

    async def run(self) -> None:
        lease = self.lease
        # The first at once unless `acknowledge` sent it: the tracker passes on a
        # grant not acknowledged within its lease_grant_ack_s, as a dead node's.
        due = trio.current_time() - (0.0 if self._acknowledged else lease.renew_s)
        with self._scope:
            while True:
                # On a fixed cadence: a renewal that timed out is followed at once.
                due = max(due + lease.renew_s, trio.current_time())
                await trio.sleep_until(due)
                try:
                    await self._tracker.renew_lease(
                        self.digest, lease.lease_id, self._done, self._size,
                        timeout_s=lease.renew_timeout_s,
                    )
                except tracker_errors.LeaseLost as e:
                    log.warning("lease for %s lost; finishing the copy anyway: %s",
                                self.digest, e)  # fmt: skip
                    return
                except tracker_errors.TrackerError as e:
                    log.warning("lease renewal for %s failed: %s", self.digest, e)


async def release(tracker: HolderSeam, digest: Digest, lease_id: str) -> None:
    try:
        await tracker.release_lease(digest, lease_id)
    except tracker_errors.TrackerError as e:
        log.info("lease release for %s: %s", digest, e)
