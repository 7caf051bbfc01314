"""Manifests, tags and referrers, resolved against the seed registry.

Owns the manifest caches: tag → digest in the tag map (tagmap.py: asked with
an upstream HEAD, never a GET of the tag, reused for a short TTL, and answered
stale while upstream is down) and manifests by digest for good (fetched with
one GET by digest when first needed, content-addressed, in the blob store,
verified against their digest), served without upstream to a repository the
tenancy ledger says holds them. With a tracker, a body by digest the node
lacks comes through the cluster (cluster_manifests.py: one upstream GET per
digest for all the nodes), once upstream said the repository holds it — the
tag's HEAD, or a HEAD by digest. Each resolved manifest proves to the tenancy
ledger that its repository holds what it references, and notes each image's
blob order for the P2P path (pullorder.py). Manifests are small and are never swarmed.
Each tag answer upstream gives, and each manifest with the repository upstream
showed holds it, is told to the cluster (clusterword.py); while upstream is
unreachable, a tag the node cannot answer itself resolves to the cluster's last
answer, and a manifest it may not serve on its own proof comes on the cluster's
word (the tracker's shelf, checked against its digest) — the tenancy ledger
keeps such grants apart, for the outage only (docs/SECURITY.md, "What rests on
another node's word").
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import trio

from p2preg.core.digest import Digest, DigestError
from p2preg.core.reference import Reference
from p2preg.node import listings
from p2preg.node import manifest as mf
from p2preg.node.cluster_manifests import ClusterManifests
from p2preg.node.clusterword import ClusterWord, Shelve
from p2preg.node.errors import ManifestUnknown, RegistryError, UpstreamError
from p2preg.node.metrics import NodeMetrics
from p2preg.node.pullorder import PullOrder
from p2preg.node.seams import UpstreamSeam
from p2preg.node.store import BlobStore, StoreError
from p2preg.node.tagmap import TagKey, TagMap, stale_allowed
from p2preg.node.tenancy import Tenancy

log = logging.getLogger(__name__)

MAX_MEMORY_MANIFESTS = 2048


@dataclass(frozen=True, slots=True)
class Manifest:
    digest: Digest
    media_type: str
    body: bytes

    @property
    def size(self) -> int:
        return len(self.body)


@dataclass(frozen=True, slots=True)
class ManifestHead:
    """What upstream's HEAD said of a manifest the node does not hold: no body."""

    digest: Digest
    media_type: str
    size: int


class Resolver:
    def __init__(
        self,
        store: BlobStore,
        tenancy: Tenancy,
        metrics: NodeMetrics,
        pull_order: PullOrder,
        tags: TagMap,
        *,
        clock: Callable[[], float] = time.time,
        cluster: ClusterManifests | None = None,
        word: ClusterWord | None = None,
    ) -> None:
        self._store = store
        # With a tracker: manifest bodies cross upstream once per cluster, and the
        # cluster's word stands in for upstream's during an outage.
        self._cluster = cluster
        self._word = word
        self._tenancy = tenancy
        self._metrics = metrics
        self._pull_order = pull_order
        self._tags = tags
        self._clock = clock
        self._memory: OrderedDict[Digest, Manifest] = OrderedDict()
        # Upstream's HEAD answers for manifests not held, so a client's HEAD
        # within the tag's TTL asks upstream nothing.
        self._heads: OrderedDict[Digest, ManifestHead] = OrderedDict()

    # -- manifests --------------------------------------------------------

    async def manifest(
        self, client: UpstreamSeam, repository: str, ref: Reference, accept: str | None
    ) -> Manifest:
        """The manifest `ref` names; a tag costs upstream a HEAD, a body a GET by digest."""
        proven = False  # that the repository holds the digest, by upstream's word
        if ref.digest is None:
            answer = await self._tag(client, repository, ref, accept)
            if isinstance(answer, Manifest):
                return answer
            ref, proven = Reference(digest=answer.digest), True
        elif self._tenancy.holds(client.upstream.ns, repository, ref.digest):
            proven = True  # a tag's HEAD or an index of the repository named it
            cached = await self._cached(ref.digest)
            if cached is not None:
                self._metrics.manifest_cache.labels("hit").inc()
                return cached
        self._metrics.manifest_cache.labels("miss").inc()
        ns, digest = client.upstream.ns, ref.digest
        down = None if digest is None else self._outage_for(ns, repository, digest)
        if digest is not None and down is not None:
            return await self._digest_on_word(down, ns, repository, digest)
        try:
            if digest is not None and self._cluster is not None:
                return await self._through_cluster(client, repository, digest, accept, proven)
            return await self._fetch(client, repository, ref, accept)
        except RegistryError as e:
            if digest is None or not stale_allowed(e):
                raise
            if self._word is not None:
                self._word.note_down(ns, e)
            return await self._digest_on_word(e, ns, repository, digest)

    async def head(
        self, client: UpstreamSeam, repository: str, ref: Reference, accept: str | None
    ) -> Manifest | ManifestHead:
        """What a client's HEAD answers: for a tag, never more than an upstream HEAD
        unless the registry's HEAD leaves the digest, size or type out."""
        if ref.digest is None:
            return await self._tag(client, repository, ref, accept)
        return await self.manifest(client, repository, ref, accept)

    async def _tag(
        self, client: UpstreamSeam, repository: str, ref: Reference, accept: str | None
    ) -> Manifest | ManifestHead:
        """Where a tag points: the stored manifest if the node holds it, else what
        upstream's HEAD said. Upstream is asked once per TTL; while it is down
        the last digest it gave answers (tagmap.py)."""
        assert ref.tag is not None
        ns = client.upstream.ns
        key = (ns, repository, ref.tag, mf.accept_key(accept))
        fresh = self._tags.fresh(key, self._clock())
        if fresh is not None:
            cached = await self._cached(fresh.digest)
            if cached is not None:
                self._metrics.manifest_cache.labels("hit").inc()
                if fresh.is_stale:
                    self._metrics.stale_tag_answers.labels(ns).inc()
                return cached
            heard = self._heads.get(fresh.digest)
            if heard is not None and not fresh.is_stale:
                return heard
        down = None if self._word is None else self._word.outage(ns)
        if down is not None and self._tags.get(key) is None:
            return await self._tag_on_word(down, repository, ref, key)
        try:
            answer = await self._ask_tag(client, repository, ref, accept)
        except ManifestUnknown:
            self._tags.forget(key)
            raise
        except RegistryError as e:
            return await self._stale(e, repository, ref, key)
        self._tags.seen(key, answer.digest, self._clock())
        if self._word is not None:
            self._word.heard(key, answer.digest)
        if isinstance(answer, Manifest):
            return answer
        cached = await self._cached(answer.digest)
        if cached is None:
            # Upstream's HEAD said the repository's tag points there: it holds the
            # manifest (what it references is proven once the body is parsed).
            self._tenancy.grant(ns, repository, [answer.digest])
            self._heads[answer.digest] = answer
            while len(self._heads) > MAX_MEMORY_MANIFESTS:
                self._heads.popitem(last=False)
            return answer
        # Upstream just said this repository's tag points at a manifest the
        # node holds (verified): the repository holds it and what it references.
        self._metrics.manifest_cache.labels("hit").inc()
        if not self._tenancy.holds(ns, repository, cached.digest):
            self._shelve(ns, repository, cached)
        self._grant(ns, repository, cached)
        return cached

    async def _ask_tag(
        self, client: UpstreamSeam, repository: str, ref: Reference, accept: str | None
    ) -> Manifest | ManifestHead:
        """Upstream's HEAD answer for a tag (Docker Hub does not count HEADs as pulls).

        A registry whose HEAD leaves out Docker-Content-Digest, Content-Length
        or Content-Type is asked with a GET of the tag instead, counted in
        p2preg_manifest_head_fallbacks_total: without them the node could not
        answer a HEAD, nor know which manifest to GET by digest.
        """
        headers = {"Accept": accept} if accept else {}
        heard = await client.fetch(
            "HEAD", repository, f"manifests/{ref}", headers=headers, max_bytes=0
        )
        if heard is None:
            raise ManifestUnknown(f"manifest {ref} of {repository} is unknown to the seed registry")
        claimed = heard.headers.get("Docker-Content-Digest", "")
        length = heard.headers.get("Content-Length", "")
        media_type = heard.headers.get("Content-Type", "").partition(";")[0].strip()
        if claimed and length.isascii() and length.isdigit() and media_type:
            try:
                digest = Digest.parse(claimed)
            except DigestError:
                raise UpstreamError(
                    "seed registry sent a malformed Docker-Content-Digest"
                ) from None
            return ManifestHead(digest, media_type, int(length))
        self._metrics.manifest_head_fallbacks.labels(client.upstream.ns).inc()
        log.info(
            "seed registry %s answered HEAD of %s:%s without digest, size or type; using GET",
            client.upstream.ns, repository, ref.tag,
        )
        self._metrics.manifest_cache.labels("miss").inc()
        found = await self._fetch(client, repository, ref, accept)
        self._shelve(client.upstream.ns, repository, found)
        return found

    async def _stale(
        self, error: RegistryError, repository: str, ref: Reference, key: TagKey
    ) -> Manifest:
        """While upstream is down, the last digest it gave for the tag, if held; else
        the cluster's last answer for it; else `error`."""
        if not stale_allowed(error):
            raise error
        if self._word is not None:
            self._word.note_down(key[0], error)
        now = self._clock()
        entry = self._tags.stale(key, now)
        cached = None if entry is None else await self._cached(entry.digest)
        if entry is None or cached is None:
            return await self._tag_on_word(error, repository, ref, key)
        self._metrics.stale_tag_answers.labels(key[0]).inc()
        log.warning(
            "tag %s:%s of %s answered with %s, seen %.0f s ago: %s",
            repository, ref.tag, key[0], entry.digest, now - entry.seen_at, error.message,
        )
        return cached

    async def _through_cluster(
        self,
        client: UpstreamSeam,
        repository: str,
        digest: Digest,
        accept: str | None,
        proven: bool,
    ) -> Manifest:
        """A body by digest from the cluster, once upstream said that the repository
        holds it: `proven` (a tag's HEAD, or a manifest of the repository, named it:
        the tenancy ledger), else a HEAD by digest. Upstream's GET only if no node has
        the body."""
        ns = client.upstream.ns
        headers = {"Accept": accept} if accept else {}
        if not proven:
            heard = await client.fetch(
                "HEAD", repository, f"manifests/{digest}", headers=headers, max_bytes=0
            )
            if heard is None:
                raise ManifestUnknown(
                    f"manifest {digest} of {repository} is unknown to the seed registry"
                )
        cached = await self._cached(digest)
        if cached is not None:  # held for another repository
            self._grant(ns, repository, cached)
            return cached

        async def upstream() -> tuple[str, bytes]:
            found = await self._fetch(client, repository, Reference(digest=digest), accept)
            return found.media_type, found.body

        assert self._cluster is not None
        body = await self._cluster.body(digest, ns, repository, upstream)
        found = self._accept(ns, repository, digest, body)
        await self._keep(found)
        return found

    async def _tag_on_word(
        self, error: RegistryError, repository: str, ref: Reference, key: TagKey
    ) -> Manifest:
        """The cluster's last answer for a tag this node cannot answer, while upstream is down."""
        word = self._word
        heard = None if word is None else await word.tag(key)
        if word is None or heard is None:
            raise error
        found = await self._cached(heard.digest)
        if found is None:
            found = await self._from_shelf(word, key[0], repository, heard.digest)
        if found is None:
            raise error
        self._grant_on_word(key[0], repository, found)
        word.taken("tag", f"tag {repository}:{ref.tag} of {key[0]} as {heard.digest}, reported "
                   f"by {heard.reported_by} {heard.age_s:.0f} s ago", error.message)  # fmt: skip
        return found

    async def _digest_on_word(
        self, error: RegistryError, ns: str, repository: str, digest: Digest
    ) -> Manifest:
        """A manifest by digest this node may not serve on its own proof, while upstream
        is down: one the cluster's word already granted this repository (a tag's answer,
        an index's child) and the node holds, or one the tracker's shelf holds."""
        word = self._word
        if word is None or not word.enabled:
            raise error
        found = None
        if self._tenancy.on_cluster_word(ns, repository, digest) is not None:
            found = await self._cached(digest)
        if found is None:
            found = await self._from_shelf(word, ns, repository, digest)
        if found is None:
            raise error
        self._grant_on_word(ns, repository, found)
        word.taken("manifest", f"manifest {digest} of {repository} on {ns}", error.message)
        return found

    def _outage_for(self, ns: str, repository: str, digest: Digest) -> RegistryError | None:
        """How upstream failed lately, if the cluster's word already granted `digest` here:
        then it is not asked again (clusterword.py, `recheck_s`)."""
        down = None if self._word is None else self._word.outage(ns)
        if down is None or self._tenancy.on_cluster_word(ns, repository, digest) is None:
            return None
        return down

    async def _from_shelf(
        self, word: ClusterWord, ns: str, repository: str, digest: Digest
    ) -> Manifest | None:
        """The tracker's body for `digest`, checked (clusterword.py) and parsed, kept."""
        body = await word.manifest(ns, repository, digest)
        if body is None:
            return None
        try:
            parsed = mf.parse(body)
        except mf.ManifestInvalid as e:
            log.warning("manifest %s from the tracker's shelf is unusable: %s", digest, e)
            return None
        found = Manifest(digest, parsed.media_type, body)
        self._pull_order.note(digest, parsed.pull_order)
        await self._keep(found)
        return found

    def _shelve(self, ns: str, repository: str, found: Manifest) -> None:
        if self._word is not None:
            self._word.shelve(
                Shelve(found.digest, ns, repository, found.media_type, found.body)
            )

    def _grant_on_word(self, ns: str, repository: str, found: Manifest) -> None:
        """What the cluster's word lets `repository` serve during the outage: the manifest,
        its children, and its blobs with the sizes it declares (no upstream HEAD)."""
        parsed = mf.parse(found.body)  # parsed before it was kept
        sizes = dict.fromkeys((found.digest, *parsed.manifests, *parsed.blobs), -1)
        sizes.update(mf.blob_sizes(found.body))
        self._tenancy.grant_on_cluster_word(ns, repository, sizes)

    async def _fetch(
        self, client: UpstreamSeam, repository: str, ref: Reference, accept: str | None
    ) -> Manifest:
        headers = {"Accept": accept} if accept else {}
        fetched = await client.fetch(
            "GET",
            repository,
            f"manifests/{ref}",
            headers=headers,
            max_bytes=mf.MAX_MANIFEST_BYTES,
        )
        if fetched is None:
            raise ManifestUnknown(f"manifest {ref} of {repository} is unknown to the seed registry")
        algorithm = ref.digest.algorithm if ref.digest is not None else "sha256"
        claimed = fetched.headers.get("Docker-Content-Digest")
        if ref.digest is None and claimed:
            try:
                algorithm = Digest.parse(claimed).algorithm
            except DigestError:
                raise UpstreamError(
                    "seed registry sent a malformed Docker-Content-Digest"
                ) from None
        digest = Digest.of(fetched.body, algorithm)
        expected = ref.digest or (Digest.parse(claimed) if claimed else None)
        if expected is not None and digest != expected:
            raise UpstreamError(f"seed registry sent a manifest that does not match {expected}")
        found = self._accept(client.upstream.ns, repository, digest, fetched.body)
        await self._keep(found)
        return found

    def _accept(self, ns: str, repository: str, digest: Digest, body: bytes) -> Manifest:
        """A verified body of `repository`: what it references is the repository's too."""
        try:
            parsed = mf.parse(body)
        except mf.ManifestInvalid as e:
            raise UpstreamError(f"seed registry sent an unusable manifest: {e}") from None
        self._tenancy.grant(ns, repository, [digest, *parsed.blobs, *parsed.manifests])
        self._pull_order.note(digest, parsed.pull_order)
        return Manifest(digest, parsed.media_type, body)

    def _grant(self, ns: str, repository: str, found: Manifest) -> None:
        parsed = mf.parse(found.body)  # parsed before it was kept
        self._tenancy.grant(ns, repository, [found.digest, *parsed.blobs, *parsed.manifests])

    async def _cached(self, digest: Digest) -> Manifest | None:
        found = self._memory.get(digest)
        if found is not None:
            self._memory.move_to_end(digest)
            return found
        size = self._store.size(digest)
        if size is None:
            return None
        # The bytes of a digest are known here, so a stored blob that is not a
        # manifest settles it: no manifest has this digest. (Asked upstream,
        # the seed answers such a request with a 500.) Layers are not read whole.
        not_a_manifest = ManifestUnknown(f"{digest} is a blob, not a manifest")
        if size > mf.MAX_MANIFEST_BYTES:
            raise not_a_manifest
        try:
            with self._store.reading(digest) as path:
                body = await trio.Path(path).read_bytes()
        except (OSError, KeyError):
            return None
        if Digest.of(body, digest.algorithm) != digest:
            log.error("store: manifest %s is corrupt on disk; dropping it", digest)
            self._store.remove(digest)
            return None
        try:
            parsed = mf.parse(body)
        except mf.ManifestInvalid:
            raise not_a_manifest from None
        self._pull_order.note(digest, parsed.pull_order)
        found = Manifest(digest, parsed.media_type, body)
        self._remember(found)
        return found

    def _remember(self, found: Manifest) -> None:
        self._memory[found.digest] = found
        while len(self._memory) > MAX_MEMORY_MANIFESTS:
            self._memory.popitem(last=False)

    async def _keep(self, found: Manifest) -> None:
        self._remember(found)
        if found.digest in self._store:
            return
        writer = self._store.writer(found.digest)

        def write() -> None:
            writer.write(found.body)
            writer.finish()

        try:
            await trio.to_thread.run_sync(write)
            writer.commit()
        except StoreError as e:
            # A manifest we cannot keep on disk is still served from memory.
            log.warning("store: cannot keep manifest %s: %s", found.digest, e)

    async def keep(self, found: Manifest) -> bool:
        """Put `found` in the store (a pin needs it on disk); True once it is there."""
        await self._keep(found)
        return found.digest in self._store

    # -- tags and referrers -----------------------------------------------

    async def tags(self, client: UpstreamSeam, repository: str) -> list[str]:
        return await listings.tags(client, repository)

    async def referrers(
        self, client: UpstreamSeam, repository: str, subject: Digest, artifact_type: str | None
    ) -> bytes:
        """Referrers of `subject` as an OCI index, from the API or the tag schema."""
        return await listings.referrers(self._tenancy, client, repository, subject, artifact_type)
