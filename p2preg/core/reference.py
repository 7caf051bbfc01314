"""Repository names, tags and references from the OCI distribution spec.

Owns the grammar the facade applies before anything reaches the store or an
upstream registry; the spec's limits are enforced here, not by the seed
registry (which answers some malformed input with a 500).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from p2preg.core.digest import Digest, DigestError

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG_RE = re.compile(r"^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$")
# distribution caps the whole name (with the registry host) at 255 characters.
MAX_NAME_LENGTH = 255


class InvalidReference(ValueError):
    """Base for malformed names, tags and references."""


class InvalidName(InvalidReference):
    pass


class InvalidTag(InvalidReference):
    pass


def parse_name(name: str) -> str:
    if not name or len(name) > MAX_NAME_LENGTH or not _NAME_RE.match(name):
        raise InvalidName(f"invalid repository name {name[:80]!r}")
    return name


def parse_tag(tag: str) -> str:
    if not _TAG_RE.match(tag):
        raise InvalidTag(f"invalid tag {tag[:80]!r}")
    return tag


@dataclass(frozen=True, slots=True)
class Reference:
    """A manifest reference: exactly one of a tag or a digest."""

    tag: str | None = None
    digest: Digest | None = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        if ":" in text:
            try:
                return cls(digest=Digest.parse(text))
            except DigestError as e:
                raise InvalidReference(str(e)) from None
        return cls(tag=parse_tag(text))

    def __str__(self) -> str:
        return str(self.digest) if self.digest is not None else str(self.tag)
