"""Which repository the seed registry has shown to hold which digest.

A blob or manifest is served under repository R only once the upstream proved
that R holds it for this node: a manifest of R resolved here references it,
or an upstream `HEAD` of it in R succeeded. This keeps a blob cached for a
private repository from leaking through another repository name. The ledger
is bounded (least recently proven entries go first; forgetting one only costs
an upstream HEAD). It keeps the grants not yet written down for
servingstate.py, which keeps the ledger across a restart (a node restarted
while upstream is down still serves what it held). Apart from it, and never
written down nor counted by `holds`, it keeps what the cluster's word granted
while upstream was unreachable (clusterword.py): a repository another node
said holds a manifest, and the sizes that manifest declares for its blobs, so
a word from the cluster never outlives the outage as if upstream had said it.
It must not ask the upstream itself (blobs.py and the resolver do), nor touch
the disk.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from p2preg.core.digest import Digest

DEFAULT_MAX_ENTRIES = 1_000_000

TenancyKey = tuple[str, str, Digest]  # registry (the upstream's ns), repository, digest


class Tenancy:
    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self._held: OrderedDict[TenancyKey, None] = OrderedDict()
        self.max_entries = max_entries
        # Granted since servingstate.py last took them, oldest grant first.
        self._unsaved: OrderedDict[TenancyKey, None] = OrderedDict()
        # Granted on the cluster's word, with the blob's size (-1: a manifest).
        self._cluster: OrderedDict[TenancyKey, int] = OrderedDict()

    def grant(self, ns: str, repository: str, digests: Iterable[Digest]) -> None:
        for digest in digests:
            key = (ns, repository, digest)
            for held in (self._held, self._unsaved):
                held[key] = None
                held.move_to_end(key)
        for held in (self._held, self._unsaved):
            while len(held) > self.max_entries:
                held.popitem(last=False)

    def holds(self, ns: str, repository: str, digest: Digest) -> bool:
        return (ns, repository, digest) in self._held

    def __len__(self) -> int:
        return len(self._held)

    def grant_on_cluster_word(self, ns: str, repository: str, sizes: dict[Digest, int]) -> None:
        """The cluster said `repository` holds these (digest → size, -1 for a manifest)."""
        for digest, size in sizes.items():
            key = (ns, repository, digest)
            self._cluster[key] = size
            self._cluster.move_to_end(key)
        while len(self._cluster) > self.max_entries:
            self._cluster.popitem(last=False)

    def on_cluster_word(self, ns: str, repository: str, digest: Digest) -> int | None:
        """The size the cluster's word gave (-1: a manifest), or None if it said nothing."""
        return self._cluster.get((ns, repository, digest))

    def take_unsaved(self) -> list[TenancyKey]:
        """The grants since the last call, oldest first; the ledger forgets they were unsaved."""
        taken = list(self._unsaved)
        self._unsaved.clear()
        return taken

    def load(self, keys: Iterable[TenancyKey]) -> None:
        """Grants kept by an earlier run, oldest first (not unsaved: they are on disk)."""
        for key in keys:
            self._held[key] = None
            self._held.move_to_end(key)
        while len(self._held) > self.max_entries:
            self._held.popitem(last=False)
