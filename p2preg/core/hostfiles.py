"""Files and directories on the host that only this process's user may read.

Owns the one rule for everything a node or a tracker keeps on disk (blobs,
the swarm directory, torrents, the tracker's database, keys and tokens):
directories 0700, files 0600, set explicitly rather than left to the umask,
which an operator's shell or a container runtime may have widened. A data
directory that already exists is tightened when it is ours, and refused when
another user owns it (that user could read or swap our files whatever its
mode says). `private_umask` covers what third-party code creates inside
(libtorrent's downloads, SQLite's journal). Only `os` here: no I/O library.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from p2preg.core.config import ConfigError

DIR_MODE = 0o700
FILE_MODE = 0o600
# Group and other bits: none of them may be set on anything we keep.
OPEN_BITS = 0o077


def private_umask() -> int:
    """Make files created from now on by anyone in this process owner-only; returns the old."""
    return os.umask(OPEN_BITS)


def private_dir(path: Path) -> Path:
    """`path` as a directory only its owner may enter: created 0700, or checked and tightened.

    Missing parents are created 0700 too. Raises ConfigError when `path` is not
    a directory, is a symbolic link, or belongs to another user.
    """
    missing: list[Path] = []
    probe = path
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=DIR_MODE)
        except FileExistsError:
            pass
        except OSError as e:
            raise ConfigError(f"cannot create directory {d}: {e.strerror}") from None
    try:
        st = path.lstat()
    except OSError as e:
        raise ConfigError(f"cannot read directory {path}: {e.strerror}") from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{path} must be a directory, not a link or a file")
    if st.st_uid != os.geteuid():
        raise ConfigError(
            f"{path} belongs to uid {st.st_uid}, not to this process's uid {os.geteuid()}: "
            "refusing to keep private files there"
        )
    if stat.S_IMODE(st.st_mode) != DIR_MODE:
        os.chmod(path, DIR_MODE)
    return path


def tighten(path: Path) -> None:
    """Drop group and other bits from an existing file of ours (a store from an older run)."""
    st = path.lstat()
    if stat.S_ISREG(st.st_mode) and st.st_mode & OPEN_BITS:
        os.chmod(path, stat.S_IMODE(st.st_mode) & ~OPEN_BITS)


def open_private(path: Path, *, exclusive: bool = False) -> int:
    """A new (or truncated) file for writing, mode 0600 whatever the umask; returns the fd.

    Never follows a symbolic link: a link planted in a data directory cannot
    redirect our write.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    if exclusive:
        flags |= os.O_EXCL
    fd = os.open(path, flags, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    except OSError:
        os.close(fd)
        raise
    return fd


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` whole or not at all (temp file, fsync, rename), mode 0600."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = open_private(tmp, exclusive=True)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_secret_file(path: Path, what: str) -> None:
    """Refuse a secret file that group or other may read or write (0600 or 0400 expected)."""
    try:
        st = path.stat()
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{what} {path} is not a regular file")
    if st.st_mode & OPEN_BITS:
        raise ConfigError(
            f"{what} {path} has mode {stat.S_IMODE(st.st_mode):04o}: other users may read it; "
            "chmod 600 it"
        )


def read_secret_file(path: Path, what: str, *, check_mode: bool = True) -> str:
    """The secret in `path`, stripped; ConfigError when unreadable, too open, or empty."""
    if check_mode:
        check_secret_file(path, what)
    try:
        text = path.read_text("utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise ConfigError(f"cannot read {what} {path}: {reason}") from None
    if not text:
        raise ConfigError(f"{what} {path} is empty")
    return text
