"""Which image each blob was last asked for in, and its place in that image.

containerd asks a registry for all of an image's blobs at once, by digest
alone. The resolver notes, for each image manifest it resolves, where every
blob sits in it (config first, then the layers in manifest order); the P2P path
names that place in its upstream lease request, so the tracker can let an
image's blobs cross the upstream link earliest first. Only a hint: a blob with
no place noted (a restart, or a client that skipped the manifest) is fetched
without one. Bounded, least recently noted first out; memory only. It must
not be used to refuse or delay a fetch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from p2preg.core.digest import Digest

DEFAULT_MAX_ENTRIES = 100_000


@dataclass(frozen=True, slots=True)
class Place:
    image: Digest  # the image manifest's digest
    index: int  # 0 is the config, 1… the layers in order


class PullOrder:
    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self._places: OrderedDict[Digest, Place] = OrderedDict()
        self._max = max_entries

    def note(self, image: Digest, blobs: Sequence[Digest]) -> None:
        """`blobs` are `image`'s config and layers, in manifest order."""
        for index, blob in enumerate(blobs):
            self._places[blob] = Place(image, index)
            self._places.move_to_end(blob)
        while len(self._places) > self._max:
            self._places.popitem(last=False)

    def of(self, blob: Digest) -> Place | None:
        return self._places.get(blob)

    def __len__(self) -> int:
        return len(self._places)
