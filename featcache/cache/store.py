"""The HDF5 feature cache: schema, a resumable writer, and a reader that refuses what it cannot trust.

Schema (version 1), N samples in dataset order:

    /  attrs: schema_version, complete (bool), meta (JSON: backbone, weights, preprocessing, dataset, counts)
    /samples/guid, split, raw_text, text   (N,) UTF-8 strings, written before any backbone runs (raw_text and
                    text are absent from a cache without texts: `extract --no-text`, `featcache strip-text`)
    /samples/target (N,) UTF-8 strings: optional, only when the dataset has targets (Twitter; the text
                    backbone's second segment, featcache.text_tower.text_inputs); absent without texts
    /samples/label  (N,) int8, -1 when unlabelled       /samples/valid (N,) bool, False = heads skip it
    /samples/caption (N,) fixed-size UTF-8 bytes ("" without --captions)
    /samples/done   (N,) bool: row written (what --resume continues from)
    /text/tokens  (N, L, Dt) fp16   last-layer token states      /text/mask (N, L) bool
    /text/pooled  (N, Dtp) fp32     the backbone's sentence embedding
    /image/tokens (N, P, Di) fp16   patch tokens (CLIP: pre-projection; CNNs: the final map as P = h*w)
    /image/pooled (N, Dip) fp32     the backbone's image embedding
    /text_hidden/states (N, L, Dt) fp16, attrs start_layer: optional, the hidden states entering layer
                    start_layer (= meta text.start_layer), the input of the top text layers in stage 2
    /image_views/tokens (N, K, P, Di) fp16, /image_views/pooled (N, K, Dip) fp32: optional, K augmented views

Feature arrays are chunked by rows (a few MiB per chunk) so whole-array reads are sequential, and stored
uncompressed: fp16 activations barely compress and decompression would dominate load time.

The writer works on `FILE.partial` and renames it into place only when every row is done, so a file at the
final path is always complete. Kill safety (SIGKILL, OOM killer) rests on three rules:
  * the whole HDF5 structure is laid down when the file is created: strings, attributes, and every feature
    array allocated at full size (ALLOC_TIME_EARLY). Afterwards the loop only overwrites bytes inside
    allocated chunks, never HDF5 metadata, so a kill at any point leaves a structurally sound file;
  * a batch's rows are flushed before its `done` flags are set and flushed, so `done` never claims a row
    whose bytes might not have reached the file;
  * superblock v2 (libver v108), not the newest: v3 sets a "file is open for writing" flag that a killed
    writer never clears, and h5py could not reopen the file to resume it.
Image problems found while writing go to a side file (`FILE.partial.problems.json`, replaced atomically)
rather than into an HDF5 attribute, for the same reason. Only `finish` changes metadata, then renames.

Compatibility: a reader opens every cache with schema_version <= SCHEMA_VERSION (a newer one is refused: it
was written by a newer featcache-heads); the cache key does not contain the schema version, so a schema change
alone never makes a cache "other settings". Metadata added over time, and what an older cache means without it
(`upgrade_meta` fills it in when a cache is opened, so `reader.meta` always has today's form):
    classes           label names in label order (older caches: MVSA's three tags, LEGACY_CLASSES)
    text.start_layer  the layer text_hidden/states enter (older caches: text.hidden_start_layer)
    env               what produced the cache (featcache.env.environment; older caches: absent, unknown)
    preprocessing.precision   the compute precision of the backbones: "fp16" (autocast, CUDA extraction);
                      absent = "fp32" (CPU extraction, every older cache), so CPU cache keys never changed.
                      In the key (a resume or a shard set cannot mix the two), not in feature_signature (a head
                      trained on one applies to the other: the same features to fp16 rounding).
"""
from __future__ import annotations

import json
import os

import h5py
import numpy as np

from ..errors import UserError
from ..outdir import atomic_file, check_room, fault_errno, write_failed

SCHEMA_VERSION = 1
_HEADROOM = 1.05  # strings, HDF5 metadata and chunk padding on top of the arrays (as featcache.extract.size)
# Caches written before class names were recorded (meta["classes"]) hold MVSA's three tags in this order.
LEGACY_CLASSES = ("negative", "neutral", "positive")
NEWER = "was written by a newer featcache-heads; upgrade (pip install -U featcache-heads) to read it"
CAPTION_BYTES = 512
_STR = h5py.string_dtype("utf-8")


class CacheError(UserError):
    """A cache file that cannot be used, with a message meant for the user."""


def partial_path(path: str) -> str:
    return path + ".partial"


def problems_path(path: str) -> str:
    """Image problems found so far by an unfinished extraction of `path` (see the module docstring)."""
    return partial_path(path) + ".problems.json"


LIBVER = ("v108", "v108")  # superblock v2: no consistency flag left set by a killed writer


def _early_alloc():
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    return dcpl


def row_chunk(shape: tuple[int, ...], itemsize: int, target_bytes: int = 4 << 20) -> tuple[int, ...]:
    row = int(np.prod(shape[1:], dtype=np.int64)) * itemsize or 1
    rows = max(1, min(shape[0], target_bytes // row))
    return (rows,) + tuple(shape[1:])


EXTRAS = ("limit", "text_layers", "image_views", "image_aug", "aug_seed", "no_text")  # add rows/arrays, same meaning
DEFAULT_PRECISION = "fp32"  # what a cache without preprocessing.precision was computed in


def cache_precision(meta: dict) -> str:
    """The precision the cache's backbones computed in: fp16 (CUDA autocast) or fp32 (the default)."""
    return (meta.get("preprocessing") or {}).get("precision") or DEFAULT_PRECISION


def upgrade_meta(meta: dict) -> dict:
    """An older cache's metadata in today's form (in place): the documented defaults of the module docstring."""
    meta.setdefault("classes", list(LEGACY_CLASSES))
    text = meta.get("text")
    if isinstance(text, dict) and "start_layer" not in text:
        text["start_layer"] = text.pop("hidden_start_layer", None)
    return meta


def feature_signature(meta: dict) -> dict:
    """What the features of a cache *mean*: backbones, their weights, and preprocessing.

    Two caches with equal signatures hold interchangeable features even if their datasets differ, so a head
    trained on one applies to the other. `limit` only selects rows, `text_layers` only adds stored hidden
    states (text_hidden/states, also added later by `featcache add-text-layers`) and the image_views keys only
    add augmented views next to unchanged clean features, and no_text only leaves the texts out: all are
    left out.
    """
    prep = {k: v for k, v in (meta.get("preprocessing") or {}).items() if k not in EXTRAS + ("precision",)}
    backbone = meta.get("backbone") or {}
    weights = {role: w.get("sha256") for role, w in (meta.get("weights") or {}).items()}
    return {"backbone": backbone, "weights": weights, "preprocessing": prep}


class CacheWriter:
    """Create (or reopen, for resume) FILE.partial and fill it batch by batch."""

    def __init__(self, path: str, meta: dict, samples, shapes: dict[str, tuple[int, ...]], resume: bool = False,
                 texts: bool = True, targets: bool | None = None, again: str = "run the same command with --resume"):
        self.path, self.tmp, self.meta, self.again, self.f = path, partial_path(path), meta, again, None
        n = len(samples)
        if resume and os.path.exists(self.tmp):
            try:
                self.f = h5py.File(self.tmp, "r+")
                old = json.loads(self.f.attrs["meta"])
                done = self.f["samples/done"].shape[0]
            except (OSError, KeyError, ValueError) as exc:
                raise CacheError(f"{self.tmp} cannot be resumed: it is damaged ({exc}). Delete it and run "
                                 "the extraction again without --resume") from None
            if cache_precision(old) != cache_precision(meta):
                self.f.close()
                raise CacheError(f"{self.tmp} was started in {cache_precision(old)} and this run computes in "
                                 f"{cache_precision(meta)} (fp16: CUDA autocast, fp32: CPU): one cache cannot "
                                 "mix them. Resume it on the device that started it (--device), or delete it "
                                 "and run without --resume")
            if old.get("key") != meta.get("key") or done != n:
                self.f.close()
                raise CacheError(f"{self.tmp} was started with different settings (key {old.get('key')} vs "
                                 f"{meta.get('key')}); delete it or run without --resume")
            return  # no metadata write here: `finish` records the final meta
        for stale in (self.tmp, problems_path(path)):
            if os.path.exists(stale):
                os.remove(stale)
        check_room(self.tmp, _HEADROOM * sum(np.prod(s, dtype=np.int64) * (4 if k.endswith("pooled") else 2)
                                             for k, s in shapes.items()),
                   "free some space or choose another --out (the file is laid down at full size at once)")
        try:
            self._create(meta, samples, shapes, texts, targets)
        except (OSError, ValueError, RuntimeError) as exc:  # h5py's classes for a full or failing disk
            self._drop()
            if os.path.exists(self.tmp):
                os.remove(self.tmp)  # half a structure: --resume could not use it
            raise self._failed(exc, "nothing was written; free some space (or fix the disk) or choose another "
                               "--out, then run the command again")

    def _create(self, meta: dict, samples, shapes: dict, texts: bool, targets: bool | None) -> None:
        n = len(samples)
        self.f = f = h5py.File(self.tmp, "w", libver=LIBVER)
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["complete"] = False
        f.attrs["meta"] = json.dumps(meta)
        g = f.create_group("samples")
        g.create_dataset("guid", data=[s.guid for s in samples], dtype=_STR)
        g.create_dataset("split", data=[s.split for s in samples], dtype=_STR)
        if texts:  # the posts (and their targets): left out of a cache to share (--no-text)
            g.create_dataset("raw_text", data=[s.raw_text for s in samples], dtype=_STR)
            g.create_dataset("text", data=[s.text for s in samples], dtype=_STR)
            # targets None: when a sample has one. Only then: other caches keep the arrays they always had.
            if targets or (targets is None and any(s.target for s in samples)):
                g.create_dataset("target", data=[s.target for s in samples], dtype=_STR)
        g.create_dataset("label", data=np.array([s.label for s in samples], dtype=np.int8))
        g.create_dataset("valid", data=np.array([s.valid for s in samples], dtype=bool))
        g.create_dataset("caption", shape=(n,), dtype=f"S{CAPTION_BYTES}", dcpl=_early_alloc())
        g.create_dataset("done", shape=(n,), dtype=bool, dcpl=_early_alloc())
        for name, shape in shapes.items():  # e.g. "text/tokens": (N, L, D)
            dtype = np.float32 if name.endswith("pooled") else (bool if name.endswith("mask") else np.float16)
            f.create_dataset(name, shape=shape, dtype=dtype, chunks=row_chunk(shape, np.dtype(dtype).itemsize),
                             dcpl=_early_alloc())
        f.flush()

    def first_undone(self) -> int:
        done = self.f["samples/done"][:]
        return int(np.argmin(done)) if not done.all() else len(done)

    def write(self, start: int, arrays: dict[str, np.ndarray], captions=None, invalid=(), problems=None) -> None:
        """Write rows [start, start+B). `invalid` are absolute row indices found bad while decoding;
        `problems`, when given, is the whole image-problem log so far (saved beside the file first)."""
        stop = start + next(iter(arrays.values())).shape[0]
        try:
            if problems is not None:
                save_json_atomic(problems_path(self.path), problems)
            for name, value in arrays.items():
                self.f[name][start:stop] = value
            if captions is not None:
                self.f["samples/caption"][start:stop] = [c.encode("utf-8")[:CAPTION_BYTES] for c in captions]
            for i in invalid:
                self.f["samples/valid"][i] = False
            self.f.flush()  # the rows reach the file before the flags that claim them
            self.f["samples/done"][start:stop] = True
            self.f.flush()
        except (OSError, ValueError, RuntimeError) as exc:  # the rows before `start` are flagged done: kept
            self._drop()
            raise self._failed(exc, f"the rows before {start} are kept in {self.tmp}; free some space (or fix "
                               f"the disk), then {self.again}")

    def problems(self) -> list:
        """The image-problem log saved by earlier `write` calls (for a resumed run)."""
        p = problems_path(self.path)
        if not os.path.exists(p):
            return []
        with open(p) as fh:
            return json.load(fh)

    def finish(self, meta: dict) -> str:
        """Record final metadata, close, and atomically move the finished file into place."""
        if not self.f["samples/done"][:].all():
            raise CacheError(f"{self.tmp}: not every row was written; run again with --resume")
        try:
            self.f.attrs["meta"] = json.dumps(meta)
            self.f.attrs["complete"] = True
            self.f.close()
            self.f = None
            os.replace(self.tmp, self.path)
        except (OSError, ValueError, RuntimeError) as exc:  # every row is done: only metadata and rename left
            self._drop()
            raise self._failed(exc, f"every row is kept in {self.tmp}; free some space (or fix the disk), then "
                               f"{self.again}")
        if os.path.exists(problems_path(self.path)):  # now recorded in meta; a kill before this is harmless
            os.remove(problems_path(self.path))
        return self.path

    def close(self) -> None:
        """Close the file (after an error too: what was flushed stays for --resume)."""
        self._drop()

    def _drop(self) -> None:
        """Close the file, also after the disk failed. h5py objects left to the garbage collector after a failed
        write printed screens of deallocation errors and could segfault; closing the file closes every object
        in it, in order. Its own flush may fail the same way: the bytes already flushed are what counts."""
        f, self.f = self.f, None
        if f is not None:
            try:
                f.close()
            except (OSError, ValueError, RuntimeError) as exc:  # the same disk fault again: nothing to save
                if fault_errno(exc) is None:
                    raise

    def _failed(self, exc: Exception, advice: str) -> Exception:
        """The one paragraph for a disk fault (featcache.outdir), raised inside the `except` so --debug shows
        the OSError behind it; any other OSError is returned as is: it stays the bug it is."""
        return write_failed(exc, self.tmp, advice) or exc


def writer_running(path: str) -> bool:
    """Whether a live `featcache extract` holds the lock of output `path` (a killed one holds nothing)."""
    if not os.path.exists(path + ".lock"):
        return False
    from filelock import FileLock, Timeout  # only writers lock; readers stay import-light
    lock = FileLock(path + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    lock.release()
    return False


def save_json_atomic(path: str, obj) -> None:
    with atomic_file(path, advice=None) as fh:  # advice None: CacheWriter.write says what is kept and --resume
        json.dump(obj, fh)


class MetaView:
    """What a reader's (upgraded) `meta` says, shared by CacheReader and the sharded reader."""

    meta: dict

    @property
    def classes(self) -> list[str]:
        """Class names in label order (label k is classes[k]); older caches: LEGACY_CLASSES."""
        return list(self.meta["classes"])

    @property
    def start_layer(self) -> int | None:
        """The text layer text_hidden/states enter (None: the cache has no stored states)."""
        return (self.meta.get("text") or {}).get("start_layer")


class CacheReader(MetaView):
    """Read-only view of a complete cache. Raises CacheError (a message, not a traceback) otherwise."""

    def __init__(self, path: str):
        self.path = path
        if path.endswith(".partial"):
            final = path[:-len(".partial")]
            state = "is still being written" if writer_running(final) else "was interrupted"
            raise CacheError(f"{path} is the unfinished file of an extraction that {state}; read {final} "
                             "once it is complete (an interrupted one: run the extract again with --resume)")
        if not os.path.exists(path):
            hint = ""
            if os.path.exists(partial_path(path)):
                hint = (" yet: it is still being written by a running `featcache extract` (wait for it)"
                        if writer_running(path) else
                        f" (its extraction was interrupted and left {partial_path(path)}: finish it with "
                        "--resume)")
            raise CacheError(f"cache file {path} does not exist{hint}")
        try:
            self.f = h5py.File(path, "r")
        except OSError as exc:
            raise CacheError(f"{path} is not a readable HDF5 file ({exc}); it may be truncated or not a "
                             "feature cache: re-create it with `featcache extract`") from None
        attrs = self.f.attrs
        if "schema_version" not in attrs or "meta" not in attrs:
            self.f.close()
            raise CacheError(f"{path} is an HDF5 file but not a feature cache (no schema_version/meta)")
        schema = int(attrs["schema_version"])
        if schema > SCHEMA_VERSION:
            self.f.close()
            raise CacheError(f"{path} has cache schema {schema} and {NEWER} (this version reads schemas up to "
                             f"{SCHEMA_VERSION})")
        if not bool(attrs["complete"]):
            self.f.close()
            raise CacheError(f"{path} is incomplete (its extraction did not finish); run extract with --resume")
        self.meta = upgrade_meta(json.loads(attrs["meta"]))

    def __len__(self) -> int:
        return self.f["samples/guid"].shape[0]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.f.close()

    def has(self, name: str) -> bool:
        return name in self.f

    def strings(self, name: str) -> list[str]:
        if name == "samples/caption":
            return [b.decode("utf-8", "replace") for b in self.f[name][:]]
        return [s.decode("utf-8") if isinstance(s, bytes) else s for s in self.f[name].asstr()[:]]

    def array(self, name: str) -> np.ndarray:
        """The whole array in memory, in its stored dtype (fp16 stays fp16)."""
        return self.f[name][:]

    def datasets(self) -> dict[str, tuple[tuple[int, ...], str]]:
        out = {}
        self.f.visititems(lambda k, v: out.__setitem__(k, (v.shape, str(v.dtype)))
                          if isinstance(v, h5py.Dataset) else None)
        return out
