"""Shard manifests: one JSON file that ties N shard caches into one dataset, a reader that checks it, a merge.

    OUT.manifest.json   {"format": "featcache-shards", "version": 1, "key": <the cache key of the whole run>,
                         "rows": N, "shards": [{"path": "OUT.shard-0-of-2.h5" (relative to the manifest),
                         "index": 0, "start": 0, "stop": 2048, "rows": 2048, "sha256": ..., "key": ...}, ...]}

Each shard is an ordinary complete cache for rows [start, stop) of the dataset (featcache/extract/launch.py writes
them). `ShardedReader` serves the concatenated rows through CacheReader's interface (meta, len, has, strings,
array, datasets), so `heads` and `featcache info` take a manifest wherever they take a cache (`open_cache`).
It refuses, naming the file, a missing shard, a shard whose sha256 or row count differs from the manifest, and
shards of another run (cache key), and a manifest version newer than this code reads (older ones load).
No HDF5 virtual datasets: those read a missing source as zeros.
Checking every sha256 reads each shard once more on open; `heads` reads them whole anyway.
"""
from __future__ import annotations

import copy
import glob
import json
import os

import numpy as np

from ..digest import file_sha256
from ..errors import ConfigError
from ..outdir import atomic_file, check_writable, write_failed
from ..sources.base import Sample
from .store import NEWER, CacheError, CacheReader, CacheWriter, MetaView, partial_path

FORMAT, VERSION = "featcache-shards", 1


def is_manifest(path: str) -> bool:
    return str(path).endswith(".json")


def open_cache(path: str, verify: bool = True):
    """A CacheReader for a cache file, a ShardedReader for a manifest (*.json). verify=False skips the shards'
    sha256 (a whole read of every shard): for a process re-opening a manifest that was verified when loaded."""
    return ShardedReader(str(path), verify) if is_manifest(path) else CacheReader(str(path))


def _shard_info(path: str, reader: CacheReader) -> dict:
    info = reader.meta.get("shard")
    if not info:
        raise CacheError(f"{path} is a whole cache, not a shard written by `featcache extract --shard I/N` "
                         "or torchrun")
    return info


def write_manifest(path: str, shard_paths: list[str]) -> str:
    """Check that `shard_paths` (in order) are the complete shards of one run and write the manifest."""
    entries, key, total = [], None, None
    for j, p in enumerate(shard_paths):
        with CacheReader(p) as r:
            info, rows = _shard_info(p, r), len(r)
        key, total = key or info["key"], total if total is not None else info["total"]
        if info["key"] != key or info["count"] != len(shard_paths) or info["index"] != j:
            raise CacheError(f"{p} is shard {info['index']}/{info['count']} of a run with key {info['key']}, not "
                             f"shard {j}/{len(shard_paths)} of key {key}: it is left from other settings; re-run "
                             f"`featcache extract --shard {j}/{len(shard_paths)} --force` with this run's options")
        entries.append({"path": os.path.relpath(p, os.path.dirname(os.path.abspath(path))), "index": j,
                        "start": info["start"], "stop": info["stop"], "rows": rows, "sha256": file_sha256(p)})
    doc = {"format": FORMAT, "version": VERSION, "key": key, "rows": total, "shards": entries}
    _check_coverage(path, doc)
    # concurrent writers (the last SLURM tasks) write the same content atomically, each from its own temp file
    with atomic_file(path, advice=None) as f:
        json.dump(doc, f, indent=1)
    return path


def _check_coverage(path: str, doc: dict) -> None:
    at = 0
    for s in doc["shards"]:
        if s["start"] != at or s["stop"] - s["start"] != s["rows"]:
            raise CacheError(f"{path}: shard {s['path']} holds rows {s['start']}..{s['stop']} ({s['rows']} rows) "
                             f"but the next rows are {at}..: the shards do not tile the dataset")
        at = s["stop"]
    if at != doc["rows"]:
        raise CacheError(f"{path}: the shards hold {at} rows, the dataset has {doc['rows']}")


def _read_manifest(path: str) -> dict:
    if not os.path.exists(path):
        stem = path[: -len(".manifest.json")] if path.endswith(".manifest.json") else None
        found = sorted(glob.glob(glob.escape(stem) + ".shard-*-of-*.h5")) if stem else []
        hint = (f"; shard files present: {', '.join(os.path.basename(p) for p in found)}" if found else "")
        raise CacheError(f"manifest {path} does not exist: it is written when every shard of `featcache extract "
                         f"--shard I/N` (or every torchrun rank) has finished{hint}")
    try:
        with open(path) as f:
            doc = json.load(f)
        if doc.get("format") != FORMAT or not isinstance(doc.get("shards"), list) or \
                not isinstance(doc.get("version"), int):
            raise ConfigError("not a shard manifest")
    except (ValueError, AttributeError, UnicodeDecodeError) as exc:
        raise CacheError(f"{path} is not a featcache shard manifest ({exc}); give a cache .h5 or the "
                         "OUT.manifest.json written by a sharded extraction") from None
    if doc["version"] > VERSION:
        raise CacheError(f"{path} has manifest version {doc.get('version')} and {NEWER} (this version reads "
                         f"manifests up to {VERSION})")
    _check_coverage(path, doc)
    return doc


class ShardedReader(MetaView):
    """CacheReader's interface over the shards of a manifest, after checking every one of them."""

    def __init__(self, path: str, verify: bool = True):
        self.path, self.readers, self.verify = path, [], verify
        doc = _read_manifest(path)
        self.key, self.shards = doc["key"], doc["shards"]
        where = os.path.dirname(os.path.abspath(path))
        try:
            for s in self.shards:
                self.readers.append(self._open(os.path.join(where, s["path"]), s))
            names = [r.datasets() for r in self.readers]
            for s, d in zip(self.shards[1:], names[1:]):
                if {k: (v[0][1:], v[1]) for k, v in d.items()} != \
                        {k: (v[0][1:], v[1]) for k, v in names[0].items()}:
                    raise CacheError(f"{s['path']} holds other arrays than {self.shards[0]['path']} "
                                     f"({sorted(d)} vs {sorted(names[0])}); re-extract it")
        except BaseException:
            self.close()
            raise
        self.meta = merged_meta([r.meta for r in self.readers])

    def _open(self, file: str, s: dict) -> CacheReader:
        rerun = f"re-run `featcache extract --shard {s['index']}/{len(self.shards)} --force` with the run's options"
        if not os.path.exists(file):
            raise CacheError(f"{self.path}: shard {s['path']} (rows {s['start']}..{s['stop']}) is missing; "
                             f"{rerun} or restore the file")
        digest = file_sha256(file) if self.verify else s["sha256"]
        if digest != s["sha256"]:
            raise CacheError(f"{self.path}: shard {s['path']} has changed since the manifest was written "
                             f"(sha256 {digest[:16]}, manifest {s['sha256'][:16]}); {rerun}")
        r = CacheReader(file)
        info = r.meta.get("shard") or {}
        if info.get("key") != self.key or (info.get("start"), info.get("stop")) != (s["start"], s["stop"]) \
                or len(r) != s["rows"]:
            r.close()
            raise CacheError(f"{self.path}: shard {s['path']} holds rows {info.get('start')}..{info.get('stop')} "
                             f"of key {info.get('key')}, the manifest says rows {s['start']}..{s['stop']} of key "
                             f"{self.key}; {rerun}")
        return r

    def __len__(self) -> int:
        return sum(len(r) for r in self.readers)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        for r in self.readers:
            r.close()

    def has(self, name: str) -> bool:
        return all(r.has(name) for r in self.readers)

    def strings(self, name: str) -> list[str]:
        return [s for r in self.readers for s in r.strings(name)]

    def array(self, name: str) -> np.ndarray:
        """The whole array, each shard read straight into its rows (no per-shard copies to concatenate: a
        load's peak memory stays the array's size)."""
        first = self.readers[0].f[name]
        if first.dtype.kind == "O":  # strings: small
            return np.concatenate([r.array(name) for r in self.readers])
        out, start = np.empty((len(self),) + first.shape[1:], dtype=first.dtype), 0
        for r in self.readers:
            n = len(r)
            if n:
                r.f[name].read_direct(out, dest_sel=np.s_[start:start + n])
            start += n
        return out

    def datasets(self) -> dict[str, tuple[tuple[int, ...], str]]:
        out = self.readers[0].datasets()
        return {k: ((len(self),) + shape[1:], dtype) for k, (shape, dtype) in out.items()}

    def nbytes(self) -> int:
        return sum(os.path.getsize(r.path) for r in self.readers)


def merged_meta(metas: list[dict]) -> dict:
    """The metadata of the whole run: the shards' with the run's key, dataset counts and problems summed."""
    m = copy.deepcopy(metas[0])
    info = m.pop("shard")
    m["key"] = info["key"]
    m.pop("timings", None)  # per-shard wall times do not add up to anything meaningful
    m["extract_config"]["shard"] = None
    d = m["dataset"]
    for other in metas[1:]:
        od = other["dataset"]
        for k in ("samples", "train", "test", "invalid", "empty_texts"):
            d[k] += od[k]
        for k in ("labels", "text_encodings", "problems", "splits"):  # splits: absent from older shards
            if k in d or k in od:
                a, b = d.get(k, {}), od.get(k, {})
                d[k] = {c: a.get(c, 0) + b.get(c, 0) for c in {**a, **b}}
        m["problems"] += other["problems"]
    m["sharded"] = {"shards": len(metas), "rows": [[x["shard"]["start"], x["shard"]["stop"]] for x in metas]}
    return m


def merge(manifest: str, out: str, force: bool = False) -> str:
    """Write the shards of `manifest` as one ordinary cache file (the arrays a single-process run writes)."""
    if os.path.exists(out) and not force:
        raise CacheError(f"{out} exists; choose another --out or pass --force")
    check_writable(out, "the merged cache")
    with ShardedReader(manifest) as r:
        texts = r.has("samples/text")  # shards of a --no-text run have none
        cols = {k: r.strings(f"samples/{k}") if r.has(f"samples/{k}") else [""] * len(r)
                for k in ("guid", "split", "raw_text", "text", "target")}
        labels, valid = r.array("samples/label"), r.array("samples/valid")
        samples = [Sample(cols["guid"][i], cols["split"][i], int(labels[i]), cols["raw_text"][i], cols["text"][i],
                          image_path="", valid=bool(valid[i]), target=cols["target"][i]) for i in range(len(r))]
        copied = [k for k in r.datasets() if not k.startswith("samples/")] + ["samples/caption", "samples/done"]
        shapes = {k: shape for k, (shape, _) in r.datasets().items() if not k.startswith("samples/")}
        writer = CacheWriter(out, r.meta, samples, shapes, texts=texts, again="run `featcache merge` again")
        try:
            at = 0
            for shard in r.readers:  # one shard's array in memory at a time
                for name in copied:  # raw bytes: captions cut mid-character stay exactly as stored
                    writer.f[name][at:at + len(shard)] = shard.array(name)
                at += len(shard)
            writer.f.flush()
            return writer.finish(r.meta)
        except BaseException as exc:
            writer.close()
            if os.path.exists(partial_path(out)):  # a merge does not resume: a full-size partial only takes space
                os.remove(partial_path(out))
            err = write_failed(exc, partial_path(out), "the shards are unchanged; free some space (or fix the "
                               "disk) and run `featcache merge` again")
            if err is None:  # not a disk's fault (or Ctrl-C): as it is
                raise
            raise err from exc
