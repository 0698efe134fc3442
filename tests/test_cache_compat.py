"""The cache's compatibility policy (featcache/cache/store.py docstring) and the small shared pieces of the
featcache layout: caches and manifests written by older versions load (with documented defaults for metadata
added since), newer ones are refused by name; the cache key ignores the schema version; dataset formats,
augmentations and devices fail listing what is valid."""
from __future__ import annotations

import json

import h5py
import pytest
import torch

import featcache.cache.store as store
from featcache.cache.manifest import _read_manifest
from featcache.cache.store import LEGACY_CLASSES, SCHEMA_VERSION, CacheError, CacheReader
from featcache.device import resolve_device
from featcache.extract.config import ExtractConfig
from featcache.extract.plan import cache_key
from featcache.sources.augment import AUGMENTATIONS, get_aug_spec
from featcache.sources.base import READERS, read_dataset


def _set_attrs(path: str, schema: int | None = None, **meta_changes) -> None:
    with h5py.File(path, "r+") as f:
        if schema is not None:
            f.attrs["schema_version"] = schema
        meta = json.loads(f.attrs["meta"])
        meta.update(meta_changes)
        f.attrs["meta"] = json.dumps(meta)


def test_older_schema_loads_newer_is_refused(make_synthetic_cache):
    path = make_synthetic_cache()
    _set_attrs(path, schema=SCHEMA_VERSION - 1)
    with CacheReader(path) as r:
        assert len(r) == 280
    _set_attrs(path, schema=SCHEMA_VERSION + 1)
    with pytest.raises(CacheError, match=r"schema 2 and was written by a newer featcache-heads; upgrade"):
        CacheReader(path)


def test_older_metadata_gets_the_documented_defaults(make_synthetic_cache):
    """A cache from before meta classes / text.start_layer: MVSA's tags; the old name of start_layer."""
    path = make_synthetic_cache()
    _set_attrs(path, text={"num_layers": 6, "hidden_start_layer": 5})
    with CacheReader(path) as r:
        assert r.classes == list(LEGACY_CLASSES) and r.meta["classes"] == list(LEGACY_CLASSES)
        assert r.start_layer == 5 and r.meta["text"] == {"num_layers": 6, "start_layer": 5}
    _set_attrs(path, classes=["a", "b"], text={"num_layers": 6, "start_layer": 4})
    with CacheReader(path) as r:
        assert r.classes == ["a", "b"] and r.start_layer == 4


def test_manifest_versions(tmp_path):
    older = tmp_path / "old.manifest.json"
    older.write_text(json.dumps({"format": "featcache-shards", "version": 0, "key": "k", "rows": 0, "shards": []}))
    assert _read_manifest(str(older))["version"] == 0
    newer = tmp_path / "new.manifest.json"
    newer.write_text(json.dumps({"format": "featcache-shards", "version": 2, "key": "k", "rows": 0, "shards": []}))
    with pytest.raises(CacheError, match="manifest version 2 and was written by a newer featcache-heads"):
        _read_manifest(str(newer))


def test_cache_key_ignores_the_schema_version(monkeypatch):
    """The key changes only when the features would: a schema bump alone must not orphan a cache."""
    weights = {"text": {"sha256": "a" * 64}, "image": {"sha256": "b" * 64}}
    key = cache_key("f" * 64, ("minilm-l6", "efficientnet-lite0"), weights, ExtractConfig(data="d"))
    monkeypatch.setattr(store, "SCHEMA_VERSION", SCHEMA_VERSION + 7)
    assert cache_key("f" * 64, ("minilm-l6", "efficientnet-lite0"), weights, ExtractConfig(data="d")) == key
    assert key == "610cdace4fa0f507"  # pinned: a change here re-keys (orphans) every cache users have


def test_readers_and_augmentations_are_registries(tmp_path):
    assert READERS.get("mvsa").classes == ("negative", "neutral", "positive")
    with pytest.raises(ValueError, match="unknown dataset format 'nope'; valid: mvsa"):
        read_dataset("nope", str(tmp_path))
    assert AUGMENTATIONS.names() == ["weak", "strong"] and get_aug_spec("strong").rand_augment
    with pytest.raises(ValueError, match="unknown image augmentation 'mild'; valid: weak, strong"):
        get_aug_spec("mild")


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("gpu", "cuda:x", "", "CPU", "mps"):
        with pytest.raises(ValueError, match="give auto, cpu, cuda or cuda:N"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        for name in ("cuda", "cuda:0"):
            with pytest.raises(ValueError, match="no CUDA device is available"):
                resolve_device(name)
