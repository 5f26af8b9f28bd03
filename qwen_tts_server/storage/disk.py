"""Files written whole or not at all, and a full disk that says so.

A blob goes to a temporary name in its folder, is flushed to the disk, then renamed over its final name: a
crash leaves either the old state or the new one, never half a file (the temporary files a crash leaves
start with `TMP_PREFIX`; both stores sweep them, `stale_files`). A disk that is full (or
a quota that is used up) is the server's problem, not the client's request: it becomes `StorageFull`, a 507
that says so, instead of an internal error, and a warning in the log for the operator.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import StorageFull

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
# Temp files and row-less blobs younger than this may belong to a write in flight (possibly in another
# process sharing the folder), so sweeps leave them alone.
ORPHAN_GRACE_S = 15 * 60.0
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


@contextlib.contextmanager
def disk_full_as_storage_full() -> Iterator[None]:
    """Raise `StorageFull` for an OSError of a full disk or quota inside the block; other errors pass."""
    try:
        yield
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS:
            log.warning("the disk is full: %s (%s)", exc.strerror, exc.filename or "no file name")
            raise StorageFull() from exc
        raise


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` as `path`: to a temporary file in the same folder, flushed to the disk, renamed over
    `path`, then the rename flushed too. Nothing is left behind on any failure."""
    tmp = path.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}"
    try:
        with disk_full_as_storage_full():  # a rename can need space too (a folder that grows)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def stale_files(folder: Path, wanted: Callable[[str], bool]) -> Iterator[Path]:
    """The plain files of `folder` whose names `wanted` accepts, last written over ORPHAN_GRACE_S ago (file
    times are the wall clock's)."""
    cutoff = time.time() - ORPHAN_GRACE_S
    for entry in os.scandir(folder):
        if not wanted(entry.name) or not entry.is_file(follow_symlinks=False):
            continue
        try:
            if entry.stat(follow_symlinks=False).st_mtime <= cutoff:
                yield Path(entry.path)
        except FileNotFoundError:
            continue


def is_temp_file(name: str) -> bool:
    return name.startswith(TMP_PREFIX)


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (POSIX); a no-op where directories cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
