"""Content-addressed blob store on local disk.

Owns `<data_dir>/blobs/<algorithm>/<hex>` and `<data_dir>/tmp/`. A blob is
written to a temp file while it is hashed, fsynced, and renamed under its
digest only when the digest matches, so nothing unverified is ever visible
under a digest, whatever crashes when. Temp files left by a crash are removed
when the store opens. The store keeps itself under one size budget by evicting
the least recently used blobs that nobody is reading (those it is asked to
`spare`, such as the last seeder's copy of a live swarm, only when nothing
else frees enough), and never a pinned blob (`pin`: an image an operator
keeps for an outage, which still counts in the budget); before a download it
makes room on the disk under it the same way (`reserve`), or refuses at once
when even that would not fit the blob. What to spare and whom to tell of a
removal are given at construction; which images are pinned is pins.py's. It
knows nothing of registries, repositories, HTTP or libtorrent.

Writers are synchronous and meant to run in a worker thread (hashing and disk
writes must not block the event loop); the index of sizes and use order is
only touched from the trio thread.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from p2preg.core.digest import Digest, DigestError, Hasher
from p2preg.core.hostfiles import FILE_MODE, open_private, private_dir, tighten

log = logging.getLogger(__name__)

# Free space `reserve` keeps on the disk beyond the blob itself: file system
# metadata, the torrent files, a download's last batch.
DISK_MARGIN_BYTES = 1 << 20


class StoreError(Exception):
    pass


class DigestMismatch(StoreError):
    def __init__(self, expected: Digest, got: Digest, size: int) -> None:
        super().__init__(f"content has digest {got} ({size} bytes), expected {expected}")
        self.expected, self.got, self.size = expected, got, size


class NoSpace(StoreError):
    pass


class BlobWriter:
    """A temp file that becomes the blob `digest` only if its bytes hash to it.

    Not thread-safe: one writer is driven by one task (its calls may run in a
    worker thread, one at a time).
    """

    def __init__(self, store: BlobStore, digest: Digest) -> None:
        self.digest = digest
        self._store = store
        self._tmp = store.tmp_dir / f"{digest.hex[:16]}.{secrets.token_hex(6)}"
        # 0600 whatever the umask: a private layer is nobody else's to read.
        self._file = os.fdopen(open_private(self._tmp, exclusive=True), "wb")
        self._hasher = digest.hasher()

    @property
    def size(self) -> int:
        return self._hasher.size

    def write(self, chunk: bytes | memoryview) -> None:
        try:
            self._file.write(chunk)
        except OSError as e:
            raise (NoSpace(str(e)) if e.errno == errno.ENOSPC else StoreError(str(e))) from e
        self._hasher.update(chunk)

    def reset(self) -> None:
        """Start over (an upstream that does not resume answers from byte 0)."""
        self._file.seek(0)
        self._file.truncate()
        self._hasher = Hasher(self.digest.algorithm)

    def finish(self) -> int:
        """Verify, fsync and close; returns the size. The caller then calls commit()."""
        got = self._hasher.digest()
        if got != self.digest:
            self.abort()
            raise DigestMismatch(self.digest, got, self._hasher.size)
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as e:
            self.abort()
            raise (NoSpace(str(e)) if e.errno == errno.ENOSPC else StoreError(str(e))) from e
        self._file.close()
        return self._hasher.size

    def commit(self) -> None:
        """Make the verified blob visible under its digest (trio thread)."""
        self._store._publish(self.digest, self._tmp, self._hasher.size)

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)


def _keep_nothing(digest: Digest) -> bool:
    return False


def _ignore(digest: Digest) -> None:
    return None


class BlobStore:
    """The store under `data_dir`, within `max_bytes`.

    `on_remove` is called with each digest the store drops (so that its seeding
    stops too); `spare` names the blobs eviction takes last, only when nothing
    else frees enough (the node passes "this node is the last seeder of a live
    swarm"). Both are fixed at construction.
    """

    def __init__(
        self,
        data_dir: Path,
        max_bytes: int,
        *,
        on_remove: Callable[[Digest], None] = _ignore,
        spare: Callable[[Digest], bool] = _keep_nothing,
    ) -> None:
        self.blob_dir = data_dir / "blobs"
        self.tmp_dir = data_dir / "tmp"
        self.max_bytes = max_bytes
        # digest → size, least recently used first.
        self._index: OrderedDict[Digest, int] = OrderedDict()
        self._readers: Counter[Digest] = Counter()
        # Digest → how many pins hold it (several images may share a layer).
        self._pins: Counter[Digest] = Counter()
        self.used_bytes = 0
        self.evictions = 0
        self._on_remove = on_remove
        self._spare = spare

    def open(self) -> None:
        """Create the layout, drop temp files of a crashed run, index what is stored."""
        private_dir(self.tmp_dir)
        private_dir(self.blob_dir)
        for leftover in self.tmp_dir.iterdir():
            leftover.unlink(missing_ok=True)
        found: list[tuple[float, Digest, int]] = []
        for alg_dir in self.blob_dir.iterdir():
            private_dir(alg_dir)
            for path in alg_dir.iterdir():
                # A store written by an older version (default modes) is tightened.
                tighten(path)
                try:
                    digest = Digest.parse(f"{alg_dir.name}:{path.name}")
                except DigestError:
                    log.warning("store: ignoring stray file %s", path)
                    continue
                st = path.stat()
                found.append((st.st_mtime, digest, st.st_size))
        for _, digest, size in sorted(found, key=lambda t: (t[0], str(t[1]))):
            self._index[digest] = size
            self.used_bytes += size

    def path(self, digest: Digest) -> Path:
        return self.blob_dir / digest.algorithm / digest.hex

    def size(self, digest: Digest) -> int | None:
        return self._index.get(digest)

    def __contains__(self, digest: Digest) -> bool:
        return digest in self._index

    def __len__(self) -> int:
        return len(self._index)

    def digests(self) -> list[Digest]:
        return list(self._index)

    def pin(self, digests: Iterable[Digest]) -> None:
        """Keep `digests` from eviction, stored or still to come, until `unpin`."""
        self._pins.update(set(digests))

    def unpin(self, digests: Iterable[Digest]) -> None:
        self._pins.subtract(set(digests))
        for digest in [d for d, n in self._pins.items() if n <= 0]:
            del self._pins[digest]

    def pinned(self, digest: Digest) -> bool:
        return digest in self._pins

    @property
    def pinned_bytes(self) -> int:
        """Bytes of pinned blobs held now (part of `used_bytes`)."""
        return sum(self._index.get(d, 0) for d in self._pins)

    def writer(self, digest: Digest) -> BlobWriter:
        return BlobWriter(self, digest)

    def link_verified(self, digest: Digest, source: Path) -> Path:
        """Hard-link a file whose whole digest the caller verified into the temp dir.

        Blocking (worker thread). The swarm's finished download keeps being
        seeded from its own path; the store gets the same bytes without a copy.
        Pass the result to `adopt`.
        """
        tmp = self.tmp_dir / f"{digest.hex[:16]}.{secrets.token_hex(6)}"
        try:
            os.link(source, tmp)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                # libtorrent created the file with its own modes; the inode is ours.
                os.fchmod(fd, FILE_MODE)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise (NoSpace(str(e)) if e.errno == errno.ENOSPC else StoreError(str(e))) from e
        return tmp

    def adopt(self, digest: Digest, tmp: Path, size: int) -> None:
        """Make a `link_verified` temp file the blob `digest` (trio thread)."""
        try:
            self._publish(digest, tmp, size)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @contextmanager
    def reading(self, digest: Digest) -> Iterator[Path]:
        """Pin a stored blob while it is read, so that eviction leaves it alone."""
        if digest not in self._index:
            raise KeyError(digest)
        self._index.move_to_end(digest)
        self._readers[digest] += 1
        try:
            yield self.path(digest)
        finally:
            self._readers[digest] -= 1
            if not self._readers[digest]:
                del self._readers[digest]

    def _publish(self, digest: Digest, tmp: Path, size: int) -> None:
        if digest in self._index:
            tmp.unlink(missing_ok=True)
            self._index.move_to_end(digest)
            return
        self._make_room(size)
        final = self.path(digest)
        if not final.parent.is_dir():
            private_dir(final.parent)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        self._index[digest] = size
        self.used_bytes += size

    def reserve(self, size: int) -> None:
        """Make room on the disk for a blob of `size` bytes about to be written.

        The budget is one limit; the file system under the data directory is
        another, and it may hold less than the budget allows. Evicts least
        recently used blobs that nobody reads until the disk has `size` bytes
        (and a margin) free. Raises NoSpace, evicting nothing, when the blob
        exceeds the budget or would not fit even with every unread blob gone:
        then the caller fails fast instead of downloading into a full disk.
        """
        if size > self.max_bytes:
            raise NoSpace(f"a blob of {size} bytes exceeds the store budget of {self.max_bytes}")
        free = _free_bytes(self.tmp_dir)
        need = size + DISK_MARGIN_BYTES - free
        if need <= 0:
            return
        if need > self._evictable_bytes():
            raise NoSpace(f"{size} bytes do not fit on the disk ({free} bytes free)")
        for victim in self._victims():
            if need <= 0:
                return
            need -= self._index[victim]
            self.remove(victim)
            self.evictions += 1
            log.info("store: evicted %s to make room on the disk", victim)

    def _victims(self) -> Iterator[Digest]:
        """What eviction may take, in order: never a blob being read nor a pinned
        one; least recently used first, but the ones `spare` asks for after all others.

        Lazy: `spare` (a call into libtorrent) is asked only of blobs eviction
        reaches. The caller removes each blob it takes before the next.
        """
        spared: list[Digest] = []
        for digest in list(self._index):
            if self._readers[digest] or digest in self._pins:
                continue
            if self._spare(digest):
                spared.append(digest)
                continue
            yield digest
        yield from (d for d in spared if d in self._index)

    def _evictable_bytes(self) -> int:
        return sum(n for d, n in self._index.items() if not (self._readers[d] or d in self._pins))

    def _make_room(self, size: int) -> None:
        if self.used_bytes + size <= self.max_bytes:
            return
        if self.used_bytes - self._evictable_bytes() + size > self.max_bytes:
            # Refused before anything goes: what is read or pinned leaves too little.
            raise NoSpace(
                f"store budget of {self.max_bytes} bytes cannot fit {size} more bytes "
                f"({self.pinned_bytes} bytes are pinned)"
            )
        for victim in self._victims():
            if self.used_bytes + size <= self.max_bytes:
                return
            self.remove(victim)
            self.evictions += 1
            log.info("store: evicted %s to stay under %d bytes", victim, self.max_bytes)
        if self.used_bytes + size > self.max_bytes:
            raise NoSpace(
                f"store budget of {self.max_bytes} bytes cannot fit {size} more bytes "
                f"({self.pinned_bytes} bytes are pinned)"
            )

    def remove(self, digest: Digest) -> None:
        size = self._index.pop(digest, None)
        if size is None:
            return
        self.used_bytes -= size
        self.path(digest).unlink(missing_ok=True)
        self._on_remove(digest)


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
