"""Pinning images on a node: resolve, check the budget, hold, and the admin endpoint.

Owns turning an image reference into a pin — its manifests resolved through
the node's resolver (so tenancy and the manifest store are the pull path's),
every digest it holds sized from the manifests, the budget checked (pinbook.py)
before a byte moves, the digests held in the store (never evicted), the
manifests written to the store and the blobs fetched as a pull would — and
removing one; re-applying the saved pins at start and the node config's
`pinned_images` in the background (upstream may be away then: a saved pin
holds meanwhile). `POST|DELETE /_p2preg/pins?image=…` on the facade, behind the
admin token. It must not decide where a blob comes from (blobs.py and fetch.py
do) nor evict anything itself.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

import trio
from quart import Response, g, request
from quart_trio import QuartTrio

from p2preg.core.digest import Digest, DigestError
from p2preg.core.reference import Reference
from p2preg.node import manifest as mf
from p2preg.node.adminauth import AdminAuth
from p2preg.node.blobs import Blobs
from p2preg.node.errors import (
    AdminUnauthorized,
    Denied,
    NameInvalid,
    NotFound,
    RegistryError,
    StoreFull,
    UpstreamError,
)
from p2preg.node.imagerefs import (
    ImageRef,
    Platform,
    PreheatError,
    host_platform,
    parse_image,
    select_manifests,
)
from p2preg.node.pinbook import PINS_PATH, Pin, PinBook, PinFromConfig, PinRefused
from p2preg.node.resolver import Manifest, Resolver
from p2preg.node.seams import UpstreamSeam
from p2preg.node.store import BlobStore
from p2preg.node.upstream import Upstreams

log = logging.getLogger(__name__)

MANIFEST_ACCEPT = ", ".join((mf.OCI_INDEX, mf.DOCKER_LIST, mf.OCI_MANIFEST, mf.DOCKER_MANIFEST))
# A configured pin that cannot be resolved at start (upstream away) is tried
# again this often, this many times (an hour), while its saved pin, if any, holds.
CONFIG_RETRY_S = 30.0
CONFIG_ATTEMPTS = 120
# Blobs of one pin fetched at once (as `p2preg preheat --per-node`).
PIN_FETCHES = 4


def _descriptors(body: bytes) -> list[tuple[Digest, int]]:
    """An image manifest's config and layers with their sizes."""
    doc = json.loads(body)
    out = []
    for desc in [doc.get("config"), *(doc.get("layers") or [])]:
        if not isinstance(desc, dict):
            continue
        size = desc.get("size")
        try:
            digest = Digest.parse(str(desc.get("digest")))
        except DigestError:
            raise UpstreamError("a manifest descriptor has a malformed digest") from None
        if not isinstance(size, int) or size < 0:
            raise UpstreamError(f"the manifest gives {digest} no size")
        out.append((digest, size))
    return out


class Pins:
    """The node's pins over its store; one change at a time."""

    def __init__(
        self,
        book: PinBook,
        store: BlobStore,
        resolver: Resolver,
        blobs: Blobs,
        upstreams: Upstreams,
        configured: Sequence[str] = (),
    ) -> None:
        self._book, self._store, self._resolver = book, store, resolver
        self._blobs, self._upstreams = blobs, upstreams
        self._configured = [str(parse_image(i)) for i in configured]
        self._lock = trio.Lock()

    async def open(self) -> None:
        """Hold every saved pin; a saved config pin the config no longer names is dropped."""
        saved = await trio.to_thread.run_sync(self._book.load)
        dropped = 0
        for pin in saved:
            if pin.source == "config" and pin.image not in self._configured:
                self._book.remove(pin.image)
                dropped += 1
                log.info("pins: %s is no longer in pinned_images: unpinned", pin.image)
                continue
            self._store.pin(pin.digests)
        if dropped:
            await trio.to_thread.run_sync(self._book.save)
        log.info("pins: %d image(s) pinned, %d bytes", len(self._book),
                 self._book.planned_bytes())

    def __len__(self) -> int:
        return len(self._book)

    def listing(self) -> list[dict[str, object]]:
        """Each pin: image, digest, bytes, the bytes held now, source, platforms."""
        return [
            {
                "image": p.image,
                "digest": str(p.digest),
                "bytes": p.bytes,
                "held_bytes": sum(n for d, n in p.blobs if d in self._store),
                "source": p.source,
                "platforms": None if p.platforms is None else list(p.platforms),
            }
            for p in self._book
        ]

    async def _manifest(self, client: UpstreamSeam, image: ImageRef, ref: Reference) -> Manifest:
        return await self._resolver.manifest(client, image.repository, ref, MANIFEST_ACCEPT)

    async def _resolve(
        self, client: UpstreamSeam, image: ImageRef, platforms: Sequence[Platform] | None
    ) -> tuple[list[Manifest], list[tuple[Digest, int]]]:
        """The image's manifests, and its configs and layers with their sizes."""
        top = await self._manifest(client, image, Reference.parse(image.reference))
        manifests = [top]
        if mf.parse(top.body).media_type in mf.INDEX_TYPES:
            chosen = select_manifests(json.loads(top.body), platforms)
            if not chosen:
                wanted = ", ".join(map(str, platforms or ())) or "any"
                raise NotFound(f"{image} has no manifest for platform {wanted}")
            for d in chosen:
                ref = Reference(digest=Digest.parse(d))
                manifests.append(await self._manifest(client, image, ref))
        blobs = dict(b for m in manifests for b in _descriptors(m.body))
        return manifests, list(blobs.items())

    async def pin(
        self, text: str, platforms: Sequence[Platform] | None, *, source: str = "runtime"
    ) -> tuple[Pin, dict[str, str]]:
        """Pin `text` for `platforms` (None: every one); returns the pin and, per
        blob, where it came from (`store` when it was held already)."""
        image = _image(text)
        client = self._upstreams.client_for(image.registry)
        if client is None:
            raise Denied(f"registry {image.registry!r} is not mirrored by this node")
        async with self._lock:
            old = self._book.get(str(image))
            if old is not None and old.source == "config":
                source = "config"  # a config pin stays one, whoever refreshes it
            manifests, blobs = await self._resolve(client, image, platforms)
            held = [(m.digest, len(m.body)) for m in manifests] + blobs
            names = None if platforms is None else tuple(map(str, platforms))
            pin = Pin(str(image), manifests[0].digest, names, source, tuple(dict(held).items()))
            self._book.check_fits(pin, self._store.max_bytes)
            self._store.pin(pin.digests)
            try:
                sources = await self._hold(client, image, manifests, blobs)
            except BaseException:
                self._store.unpin(pin.digests)
                raise
            replaced = self._book.add(pin)
            if replaced is not None:
                self._store.unpin(replaced.digests)
            await trio.to_thread.run_sync(self._book.save)
        log.info("pins: pinned %s (%s, %d bytes, %s)", pin.image, pin.digest, pin.bytes, source)
        return pin, sources

    async def _hold(
        self,
        client: UpstreamSeam,
        image: ImageRef,
        manifests: list[Manifest],
        blobs: list[tuple[Digest, int]],
    ) -> dict[str, str]:
        for m in manifests:
            if not await self._resolver.keep(m):
                raise StoreFull(f"cannot keep manifest {m.digest} of {image} in the store")
        sources: dict[str, str] = {}
        limit = trio.Semaphore(PIN_FETCHES)

        async def ensure(digest: Digest) -> None:
            async with limit:
                held = digest in self._store
                await self._blobs.ensure(client, image.repository, digest)
            fetched = [r for r in self._blobs.recent if r.digest == str(digest)]
            sources[str(digest)] = "store" if held or not fetched else fetched[-1].source

        try:
            async with trio.open_nursery() as nursery:
                for digest, _ in blobs:
                    nursery.start_soon(ensure, digest)
        except BaseExceptionGroup as group:
            # One blob's error, as the pull path would answer it.
            failed, _ = group.split(RegistryError)
            if failed is None:
                raise
            first: BaseException = failed
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first from None
        return sources

    async def unpin(self, text: str) -> Pin:
        image = str(_image(text))
        async with self._lock:
            pin = self._book.get(image)
            if pin is None:
                raise NotFound(f"{image} is not pinned on this node")
            if pin.source == "config":
                raise PinFromConfig(
                    f"{image} is pinned by this node's config (pinned_images): remove it "
                    "there and restart the node; it cannot be unpinned at runtime"
                )
            self._book.remove(image)
            self._store.unpin(pin.digests)
            await trio.to_thread.run_sync(self._book.save)
        log.info("pins: unpinned %s (%d bytes)", image, pin.bytes)
        return pin

    async def apply_config(self) -> None:
        """Pin each of `pinned_images` for this machine's platform, retrying while
        upstream is away; one that does not fit is logged, not retried."""
        waiting = list(self._configured)
        for attempt in range(CONFIG_ATTEMPTS):
            for image in list(waiting):
                try:
                    await self.pin(image, [host_platform()], source="config")
                except PinRefused as e:
                    log.error("pins: pinned_images: %s", e.message)
                except RegistryError as e:
                    if attempt == 0:
                        log.warning("pins: cannot pin %s yet (%s); retrying every %.0f s",
                                    image, e.message, CONFIG_RETRY_S)
                    continue
                waiting.remove(image)
            if not waiting:
                return
            await trio.sleep(CONFIG_RETRY_S)
        log.error("pins: gave up pinning %s (a pin saved before this start still holds)",
                  ", ".join(waiting))


def _image(text: str) -> ImageRef:
    try:
        return parse_image(text)
    except PreheatError as e:
        raise NameInvalid(str(e)) from None


def _platforms(given: list[str]) -> list[Platform] | None:
    if "all" in given:
        return None
    try:
        return [Platform.parse(p) for p in given] or [host_platform()]
    except PreheatError as e:
        raise NameInvalid(str(e)) from None


def add_pin_routes(app: QuartTrio, pins: Pins, auth: AdminAuth) -> None:
    """`POST /_p2preg/pins?image=…&platform=…` pins (platform repeatable, `all`,
    default this machine's); `DELETE /_p2preg/pins?image=…` unpins."""

    @app.route(PINS_PATH, methods=["POST", "DELETE"])
    async def pin_route() -> Response:
        g.route = "pins"
        if not auth.allows(request.headers.get("Authorization")):
            raise AdminUnauthorized("pins need the node's admin token (admin.token)")
        image = request.args.get("image")
        if not image:
            raise NameInvalid(f"{PINS_PATH} takes ?image=REGISTRY/REPOSITORY[:TAG|@DIGEST]")
        if request.method == "DELETE":
            doc = (await pins.unpin(image)).as_json()
        else:
            pin, sources = await pins.pin(image, _platforms(request.args.getlist("platform")))
            doc = {**pin.as_json(), "sources": sources}
        return Response(json.dumps(doc).encode(), 200, {"Content-Type": "application/json"})
