"""Can the output be written? Checked before any model loads or any training starts, and the one translation
of an OSError met while writing into a paragraph naming the file (issue 19).

A folder on a read-only mount, or one the user may not write, used to surface as a raw `OSError: [Errno 30]`
traceback from deep inside h5py or filelock, after minutes of model loading. `check_writable` creates (and
removes) a probe file in the folder that will receive the output, which is the only test that tells the truth
for read-only mounts, ACLs and root alike (os.access does not). Only the errno values of a machine's fault
(full disk, read-only, permission, I/O error, quota) become a message: any other OSError stays a bug.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile

from .errors import UserError

# errno values that are a fault of the disk or of the folder, never of this code
WRITE_FAULTS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted", errno.EIO: "an I/O error of the disk"}


class NotWritableError(UserError):
    """The folder that would receive an output cannot be written."""


class WriteFailedError(UserError):
    """The disk failed while an output was being written (full, read-only, I/O error)."""


class DiskSpaceError(UserError):
    """The disk holding the output has less free space than the output needs."""


def check_room(path: str, nbytes: float, advice: str) -> None:
    """Raise DiskSpaceError naming the folder, the bytes needed and the bytes free when `path`'s disk has less
    than `nbytes` free."""
    folder = existing_folder(path)
    free = shutil.disk_usage(folder).free
    if free < nbytes:
        raise DiskSpaceError(f"{path} needs about {human_bytes(nbytes)} but {folder} has {human_bytes(free)} "
                             f"free; {advice}")


def human_bytes(nbytes: float) -> str:
    """1536 -> '1.5 KiB' (powers of 1024, so IEC units)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024:
            return f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"


def existing_folder(path: str) -> str:
    """The folder that must be writable for `path` (a file or a directory that may not exist yet): the nearest
    existing ancestor, since everything below it is created."""
    folder = os.path.abspath(path)
    while not os.path.isdir(folder):
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    return folder


def check_writable(path: str, what: str) -> None:
    """Raise NotWritableError naming the folder when nothing can be created where `path` goes; `what` says
    what was about to be written there (e.g. "the cache", "the run directory")."""
    folder = existing_folder(path)
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        code = fault_errno(exc)
        if code is None:
            raise
        raise NotWritableError(f"cannot write {what} {path}: the folder {folder} is not writable "
                               f"({WRITE_FAULTS[code]}); choose another output folder (--out) or make "
                               "this one writable") from exc


def write_failed(exc: OSError, path: str, advice: str) -> WriteFailedError | None:
    """The paragraph for an OSError met while writing `path` (None when its errno is not a disk's fault: then
    it is a bug and the caller re-raises it). `advice`: what to do, e.g. how to continue."""
    code = fault_errno(exc)
    if code is None:
        return None
    return WriteFailedError(f"writing {path} failed: {WRITE_FAULTS[code]} ({os.strerror(code)}); {advice}")


def fault_errno(exc: BaseException) -> int | None:
    """The WRITE_FAULTS errno behind `exc`, else None. h5py raises OSError, ValueError or RuntimeError without
    an errno and the C library's text inside its message ("Unable to synchronously create dataset (... No
    space left on device ...)"), so the message is searched for those texts too."""
    if isinstance(exc, OSError) and exc.errno in WRITE_FAULTS:
        return exc.errno
    if not isinstance(exc, (OSError, ValueError, RuntimeError)):  # what h5py raises for HDF5's errors
        return None
    text = str(exc)
    return next((code for code in WRITE_FAULTS if os.strerror(code) in text), None)
