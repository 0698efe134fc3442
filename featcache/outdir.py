"""Can the output be written? Checked before any model loads or any training starts, and the one translation
of an OSError met while writing into a paragraph naming the file (issue 19).

A folder on a read-only mount, or one the user may not write, used to surface as a raw `OSError: [Errno 30]`
traceback from deep inside h5py or filelock, after minutes of model loading. `check_writable` creates (and
removes) a probe file in the folder that will receive the output, which is the only test that tells the truth
for read-only mounts, ACLs and root alike (os.access does not). Only the errno values of a machine's fault
(full disk, read-only, permission, I/O error, quota) become a message: any other OSError stays a bug.

Every output that is not a cache (run directories, reports, predictions, JSON beside a cache) is written
through `atomic_file` / `atomic_dir`: into a hidden sibling (.NAME.tmp-HOST-PID, same folder, so same file
system) renamed into place when complete. A reader, a scanner or a kill -9 never meets half a file or half a
run directory; what a killed writer leaves is hidden (scanners skip dot names) and removed by the next write
of the same name on the same machine (`clean_stale`).
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
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
    # h5py raises these for HDF5's errors; safetensors' save_file its own SafetensorError (a plain Exception,
    # "... I/O error: No space left on device (os error 28)"), matched by name: featcache does not import it
    if not isinstance(exc, (OSError, ValueError, RuntimeError)) and type(exc).__name__ != "SafetensorError":
        return None
    text = str(exc)
    return next((code for code in WRITE_FAULTS if os.strerror(code) in text), None)


# ------------------------------------------------------------------------------------------ atomic writes
REWRITE = "the earlier file, if any, is unchanged; free some space (or fix the disk) and run the command again"
_HOST = socket.gethostname().replace("/", "_")


def temp_sibling(path: str, kind: str = "tmp") -> str:
    """.NAME.<kind>-<host>-<pid> beside `path`: hidden, on the same file system (the rename is atomic), owned by
    one process of one machine (writers on other hosts of a shared disk never touch each other's)."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.{kind}-{_HOST}-{os.getpid()}")


def clean_stale(path: str) -> None:
    """Remove the .tmp- / .old- siblings of `path` that a killed process of this machine left."""
    folder, name = os.path.split(os.path.abspath(path))
    prefix = f".{name}."
    with contextlib.suppress(OSError):
        for entry in os.listdir(folder):
            kind, _, owner = entry[len(prefix):].partition("-")
            host, _, pid = owner.rpartition("-")
            if entry.startswith(prefix) and kind in ("tmp", "old") and host == _HOST and pid.isdigit() \
                    and not _alive(int(pid)):
                _remove(os.path.join(folder, entry))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        pass
    return True


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        with contextlib.suppress(OSError):
            os.remove(path)


def commit(tmp: str, path: str) -> None:
    """Move the finished `tmp` to `path` in one rename. A directory cannot be renamed over a full one: the earlier
    `path` is renamed away first (put back if the second rename fails) and deleted after, so at every moment
    `path` is the old complete directory, the new complete one, or (between two renames) absent."""
    if not os.path.isdir(tmp) or not os.path.lexists(path):
        os.replace(tmp, path)
        return
    old = temp_sibling(path, "old")
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)
        raise
    _remove(old)


def _fault(exc: BaseException, path: str, advice: str | None) -> None:
    """Raise the paragraph for a disk's fault met writing `path` (advice None: the caller translates). A file
    of a directory being written already became WriteFailedError naming its hidden temporary path: the
    directory's message names `path` instead."""
    cause = exc.__cause__ if isinstance(exc, WriteFailedError) else exc
    err = write_failed(cause, path, advice) if advice is not None and isinstance(cause, Exception) else None
    if err is not None:
        raise err from cause


@contextlib.contextmanager
def _staged(target: str, shown: str, advice: str | None):
    """The hidden temporary path for `target`: committed over it when the block ends without an error, else
    removed (a disk's fault then named as `shown`, see _fault)."""
    tmp = temp_sibling(target)
    try:
        clean_stale(target)
        yield tmp
        commit(tmp, target)
    except BaseException as exc:
        _remove(tmp)
        _fault(exc, shown, advice)
        raise


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w", advice: str | None = REWRITE, **open_kw):
    """`open(path, mode)` whose content appears at `path` only when the block ends without an error (written to
    temp_sibling(path), then renamed over it). A disk's fault becomes WriteFailedError naming `path` with
    `advice` (None: the OSError as it is, for a caller with its own message)."""
    with _staged(path, path, advice) as tmp, open(tmp, mode, **open_kw) as f:  # closed before the commit
        yield f


@contextlib.contextmanager
def atomic_dir(path: str, advice: str):
    """A hidden empty sibling folder to fill; it becomes `path` (replacing an earlier directory there) only when
    the block ends without an error, else it is deleted. A symlinked `path` keeps its link: the target is
    replaced. A disk's fault becomes WriteFailedError naming `path` with `advice`."""
    real = os.path.realpath(path)
    with _staged(real, path, advice) as tmp:
        os.makedirs(os.path.dirname(real), exist_ok=True)
        os.mkdir(tmp)
        yield tmp
