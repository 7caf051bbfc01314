"""Which blobs make up which image, as far as lease requests have said.

A node asking for a blob's upstream lease names the image it pulls (`group`,
the manifest digest) and the blob's place in it (`order`); nothing else tells
the tracker what an image is. `ImageIndex` keeps those pairs so the cluster
page can show how far each image spread. It is sans-IO, in memory only (after
a restart it fills again from the next lease requests), and bounded: the least
recently named images go first, an image keeps at most `max_blobs` blobs, and a
group too long to be a digest is not kept. Nothing decides on it: it must not
hold leases, queues or peers, and must not be read on the announce path.
"""

from __future__ import annotations

from collections import OrderedDict

# Images remembered, least recently named first out.
MAX_IMAGES = 1000
# Blobs kept per image: far more layers than any real image has.
MAX_BLOBS_PER_IMAGE = 256
# A manifest digest is 71 characters (sha256) or 135 (sha512).
MAX_GROUP_CHARS = 160


class ImageIndex:
    def __init__(self, max_images: int = MAX_IMAGES, max_blobs: int = MAX_BLOBS_PER_IMAGE) -> None:
        self._max_images = max_images
        self._max_blobs = max_blobs
        # Image → blob digest → its place in the manifest.
        self._images: OrderedDict[str, dict[str, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._images)

    def note(self, group: str, digest: str, order: int) -> None:
        """A lease request named `digest` as blob `order` of image `group`."""
        if not group or len(group) > MAX_GROUP_CHARS:
            return
        blobs = self._images.get(group)
        if blobs is None:
            blobs = self._images[group] = {}
            while len(self._images) > self._max_images:
                self._images.popitem(last=False)
        self._images.move_to_end(group)
        if digest in blobs or len(blobs) < self._max_blobs:
            blobs[digest] = order

    def images(self) -> dict[str, list[str]]:
        """Every image's blob digests in manifest order, most recently named image first."""
        return {
            group: sorted(blobs, key=lambda d: (blobs[d], d))
            for group, blobs in reversed(self._images.items())
        }
