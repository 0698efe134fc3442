"""`featcache strip-text FILE`: the same cache without the posts' texts, to share features without the tweets.

Caches hold the texts (samples/raw_text, samples/text, and samples/target where the dataset has targets), so
sharing a cache shares the posts. Stripping copies everything else (features, ids, labels, splits, validity,
captions, metadata) into FILE.strip.partial beside it and renames that over FILE: the file at FILE is always a
whole cache, the old one or the stripped one, never half of either. The result is what `featcache extract
--no-text` writes: its preprocessing records no_text and its key is the key that run would have, so extracting
with --no-text reuses it. Commands that re-tokenize the texts (add-text-layers, stage 2 with unfrozen text
layers) refuse such a cache by name (featcache.text_tower.require_texts).
"""
from __future__ import annotations

import json
import os

import h5py
from filelock import FileLock, Timeout

from ..cache.store import LIBVER, CacheError, CacheReader
from .plan import key_of

TEXTS = ("samples/raw_text", "samples/text", "samples/target")


def stripped_meta(meta: dict) -> dict:
    """The metadata of the stripped cache: no_text recorded, and re-keyed as `extract --no-text` keys it."""
    meta = json.loads(json.dumps(meta))
    meta["preprocessing"] = {**meta.get("preprocessing", {}), "no_text": True}
    if isinstance(meta.get("extract_config"), dict):
        meta["extract_config"]["no_text"] = True
    backbone = meta.get("backbone") or {}
    meta["key"] = key_of(meta["dataset"]["fingerprint"], (backbone["text"], backbone["image"]),
                         meta.get("weights") or {}, meta["preprocessing"])
    return meta


def strip_text(path: str) -> dict:
    """Remove the texts from the cache at `path` in place (atomically); returns what was removed."""
    if path.endswith(".json"):
        raise CacheError(f"{path} is a shard manifest; merge it first (`featcache merge {path} --out FILE.h5`) "
                         "and strip the merged file")
    with CacheReader(path) as r:  # refuses incomplete or foreign files with its own messages
        meta, present = r.meta, [name for name in TEXTS if r.has(name)]
    if meta.get("shard"):
        raise CacheError(f"{path} is one shard of a sharded extraction; merge the shards (`featcache merge`) and "
                         "strip the merged file")
    if not present:
        return {"path": path, "removed": [], "key": meta.get("key")}
    lock = FileLock(path + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise CacheError(f"another featcache command is writing {path} ({path}.lock is held)") from None
    tmp = path + ".strip.partial"
    try:
        new = stripped_meta(meta)
        _copy_without(path, tmp, set(present), new)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
        lock.release()
        if os.path.exists(path + ".lock"):
            os.remove(path + ".lock")
    return {"path": path, "removed": present, "key": new["key"]}


def _copy_without(src_path: str, dst_path: str, skip: set[str], meta: dict) -> None:
    with h5py.File(src_path, "r") as src, h5py.File(dst_path, "w", libver=LIBVER) as dst:
        for k, v in src.attrs.items():
            dst.attrs[k] = v
        dst.attrs["complete"] = False  # until every array is copied (the rename happens after close)

        def copy(name, obj):
            if isinstance(obj, h5py.Dataset) and name not in skip:
                parent = os.path.dirname(name)
                group = dst.require_group(parent) if parent else dst
                src.copy(obj, group, name=os.path.basename(name))
        src.visititems(copy)
        dst.attrs["meta"] = json.dumps(meta)
        dst.attrs["complete"] = True
