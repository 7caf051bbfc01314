"""The blob → (image, place) notes the resolver leaves for the P2P path."""

from __future__ import annotations

from p2preg.core.digest import Digest
from p2preg.node.pullorder import Place, PullOrder

IMAGE_1, IMAGE_2, CONFIG, L1, L2 = (Digest("sha256", ch * 64) for ch in "12cde")


def test_places_follow_the_last_image_noted_and_the_oldest_go_first() -> None:
    order = PullOrder(max_entries=3)
    order.note(IMAGE_1, [CONFIG, L1, L2])
    assert order.of(L2) == Place(IMAGE_1, 2)
    # A shared base layer takes the place it has in the image asked for last.
    order.note(IMAGE_2, [L1])
    assert order.of(L1) == Place(IMAGE_2, 0)
    assert len(order) == 3
    order.note(IMAGE_2, [Digest("sha256", "f" * 64)])
    # Bounded: the least recently noted blob (the config) was forgotten.
    assert order.of(CONFIG) is None and len(order) == 3
