"""The tag book's records in Redis: the keys and fenced commands `RedisStore` runs for them.

Each tag answer (tracker/tags.py) is one hash, `p2preg:t:<name>` {ns, repo,
tag, accept, digest, by, at}, indexed in the set `p2preg:t`; `<name>` is a
hash of the tag's key, since registry, repository, tag and Accept together do
not make a safe key name. This module only builds commands and reads records:
`RedisStore` applies them under its term's fence, like every other write.
"""

from __future__ import annotations

import hashlib
from typing import Any

from tracker.state import StoredTag

P = "p2preg:"
INDEX = "t"

TagKey = tuple[str, str, str, str]


def name_of(key: TagKey) -> str:
    return hashlib.sha256("\0".join(key).encode()).hexdigest()[:40]


def put_commands(tag: StoredTag, dropped: list[TagKey]) -> list[list[Any]]:
    """Forget each dropped key, then keep `tag` in place of its key's last answer."""
    batch: list[list[Any]] = []
    for key in dropped:
        name = name_of(key)
        batch += [["DEL", P + f"t:{name}"], ["SREM", P + INDEX, name]]
    name = name_of((tag.ns, tag.repository, tag.tag, tag.accept))
    fields = {"ns": tag.ns, "repo": tag.repository, "tag": tag.tag, "accept": tag.accept,
              "digest": tag.digest, "by": tag.reported_by, "at": repr(tag.seen_at_unix)}
    flat = [x for kv in fields.items() for x in kv]
    return [*batch, ["DEL", P + f"t:{name}"], ["HSET", P + f"t:{name}", *flat],
            ["SADD", P + INDEX, name]]


def record(fields: dict[bytes, bytes]) -> StoredTag:
    def text(field: str) -> str:
        return fields.get(field.encode(), b"").decode()

    return StoredTag(text("ns"), text("repo"), text("tag"), text("accept"), text("digest"),
                     text("by"), float(text("at") or 0))
