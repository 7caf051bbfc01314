"""Which repository the seed registry has shown to hold which digest.

A blob or manifest is served under repository R only once the upstream proved
that R holds it for this node: a manifest of R resolved here references it,
or an upstream `HEAD` of it in R succeeded. This keeps a blob cached for a
private repository from leaking through another repository name. The ledger
is bounded (least recently proven entries go first; forgetting one only costs
an upstream HEAD) and lives in memory: a restart re-proves on first use. It
must not ask the upstream itself (blobs.py and the resolver do).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from p2preg.core.digest import Digest

DEFAULT_MAX_ENTRIES = 1_000_000


class Tenancy:
    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self._held: OrderedDict[tuple[str, str, Digest], None] = OrderedDict()
        self._max = max_entries

    def grant(self, ns: str, repository: str, digests: Iterable[Digest]) -> None:
        for digest in digests:
            key = (ns, repository, digest)
            self._held[key] = None
            self._held.move_to_end(key)
        while len(self._held) > self._max:
            self._held.popitem(last=False)

    def holds(self, ns: str, repository: str, digest: Digest) -> bool:
        return (ns, repository, digest) in self._held

    def __len__(self) -> int:
        return len(self._held)
