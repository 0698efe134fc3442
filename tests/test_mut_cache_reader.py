"""What the cache reader refuses, and what it serves when it does not: `open_cache` on a cache file
(CacheReader) and on a shard manifest (ShardedReader). Every refusal is a CacheError naming the file and what to
do; a refused file is not left open. Caches and shards are written directly with the cache writer (no model,
no extraction). Written for `make mutate` (TESTING.md)."""
from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest
from filelock import FileLock

from featcache.cache.manifest import ShardedReader, open_cache, write_manifest
from featcache.cache.store import SCHEMA_VERSION, CacheError, CacheReader, CacheWriter, partial_path
from featcache.sources.base import Sample

N = 10


def samples(lo: int, hi: int):
    return [Sample(guid=f"g{k}", split="train" if k % 4 else "test", label=k % 3 if k % 4 else -1,
                   raw_text=f"post {k}", text=f"post {k}", image_path="", valid=k != 7) for k in range(lo, hi)]


def arrays(lo: int, hi: int, width: int = 3) -> dict:
    k = np.arange(lo, hi, dtype=np.float32)[:, None]
    return {"text/pooled": k + np.arange(width, dtype=np.float32), "image/pooled": -k + np.zeros(2, np.float32)}


def meta(key: str = "run-key", **extra) -> dict:
    return {"key": key, "backbone": {"name": "x"}, "preprocessing": {}, "classes": ["a", "b", "c"],
            "dataset": {"samples": 0, "train": 0, "test": 0, "invalid": 0, "empty_texts": 0}, "problems": [],
            "extract_config": {"shard": None}, **extra}


def write(path: str, lo: int = 0, hi: int = N, finish: bool = True, m: dict | None = None, width: int = 3) -> str:
    a = arrays(lo, hi, width)
    w = CacheWriter(path, m or meta(), samples(lo, hi), {k: v.shape for k, v in a.items()})
    w.write(0, a, invalid=[k - lo for k in range(lo, hi) if k == 7])
    if not finish:
        w.close()
        return path
    return w.finish(m or meta())


def assert_closed(path: str) -> None:
    """The reader let go of the file: it can be opened for writing (h5py refuses while it is open read-only)."""
    with h5py.File(path, "r+"):
        pass


# ------------------------------------------------------------------------------------------ a cache file

def test_a_complete_cache_reads_back(tmp_path):
    path = write(str(tmp_path / "c.h5"))
    with open_cache(path) as r:
        assert isinstance(r, CacheReader) and len(r) == N and r.path == path
        assert r.meta["key"] == "run-key" and r.classes == ["a", "b", "c"]
        assert np.array_equal(r.array("text/pooled"), arrays(0, N)["text/pooled"])
        assert r.strings("samples/guid") == [f"g{k}" for k in range(N)]
    assert_closed(path)


def test_an_unfinished_cache_is_refused_naming_the_file_and_resume(tmp_path):
    path = write(str(tmp_path / "c.h5"), finish=False)
    part = partial_path(path)
    with pytest.raises(CacheError) as exc:
        open_cache(path)
    assert str(exc.value) == (f"cache file {path} does not exist (its extraction was interrupted and left {part}: "
                              "finish it with --resume)")
    with pytest.raises(CacheError) as exc:
        open_cache(part)
    assert str(exc.value) == (f"{part} is the unfinished file of an extraction that was interrupted; read {path} "
                              "once it is complete (an interrupted one: run the extract again with --resume)")
    with FileLock(path + ".lock").acquire(timeout=0):  # a live `featcache extract` holds the output's lock
        with pytest.raises(CacheError, match=r"c\.h5 does not exist yet: it is still being written by a running"):
            open_cache(path)
        with pytest.raises(CacheError, match=r"c\.h5\.partial is the unfinished file of an extraction that is still "
                                             r"being written; read "):
            open_cache(part)
    with pytest.raises(CacheError) as exc:
        open_cache(str(tmp_path / "none.h5"))
    assert str(exc.value) == f"cache file {tmp_path / 'none.h5'} does not exist"


def test_an_incomplete_file_at_the_final_path_is_refused_and_closed(tmp_path):
    """A finished cache whose complete flag is false (e.g. copied from a partial by hand)."""
    path = write(str(tmp_path / "c.h5"))
    with h5py.File(path, "r+") as f:
        f.attrs["complete"] = False
    with pytest.raises(CacheError, match=r"c\.h5 is incomplete \(its extraction did not finish\); run extract with "
                                         "--resume"):
        open_cache(path)
    assert_closed(path)


@pytest.mark.parametrize("drop", ["schema_version", "meta", "both"])
def test_an_hdf5_file_that_is_not_a_cache_is_refused_and_closed(tmp_path, drop):
    path = write(str(tmp_path / "c.h5"))
    with h5py.File(path, "r+") as f:
        for name in ("schema_version", "meta"):
            if drop in (name, "both"):
                del f.attrs[name]
    with pytest.raises(CacheError, match=r"c\.h5 is an HDF5 file but not a feature cache"):
        open_cache(path)
    assert_closed(path)


def test_a_newer_schema_is_refused_and_closed_the_same_and_older_load(tmp_path):
    path = write(str(tmp_path / "c.h5"))
    for schema in (SCHEMA_VERSION - 1, SCHEMA_VERSION):
        with h5py.File(path, "r+") as f:
            f.attrs["schema_version"] = schema
        with open_cache(path) as r:
            assert len(r) == N
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = np.int64(SCHEMA_VERSION + 1)
    with pytest.raises(CacheError, match=rf"c\.h5 has cache schema {SCHEMA_VERSION + 1} and was written by a newer"):
        open_cache(path)
    assert_closed(path)


def test_damaged_or_foreign_files_are_refused(tmp_path):
    path = write(str(tmp_path / "c.h5"))
    raw = open(path, "rb").read()
    cut = tmp_path / "cut.h5"
    cut.write_bytes(raw[:len(raw) // 3])  # a copy that stopped a third of the way
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5 at all\n")
    for bad in (cut, text):
        with pytest.raises(CacheError, match=rf"{bad.name} is not a readable HDF5 file \(.*\); it may be truncated"):
            open_cache(str(bad))


# ------------------------------------------------------------------------------------------ a shard manifest

def shard_meta(index: int, count: int, lo: int, hi: int, key: str = "run-key") -> dict:
    m = meta(key)
    m["shard"] = {"index": index, "count": count, "start": lo, "stop": hi, "total": N, "key": key}
    m["dataset"] = {"samples": hi - lo, "train": hi - lo, "test": 0, "invalid": int(lo <= 7 < hi),
                    "empty_texts": 0}
    return m


def shards(folder, bounds=((0, 4), (4, N)), key: str = "run-key", widths=(3, 3)) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    paths = []
    for j, ((lo, hi), width) in enumerate(zip(bounds, widths)):
        p = str(folder / f"out.shard-{j}-of-{len(bounds)}.h5")
        paths.append(write(p, lo, hi, m=shard_meta(j, len(bounds), lo, hi, key), width=width))
    return paths


def test_a_manifest_serves_the_rows_of_its_shards_in_order(tmp_path):
    paths = shards(tmp_path)
    man = write_manifest(str(tmp_path / "out.manifest.json"), paths)
    with open_cache(man) as r:
        assert isinstance(r, ShardedReader) and len(r) == N and r.key == "run-key"
        assert np.array_equal(r.array("text/pooled"), arrays(0, N)["text/pooled"])
        assert r.strings("samples/guid") == [f"g{k}" for k in range(N)]
        assert r.array("samples/valid").tolist() == [k != 7 for k in range(N)]
        assert r.meta["key"] == "run-key" and r.meta["dataset"]["samples"] == N
    for p in paths:
        assert_closed(p)


def test_a_missing_or_changed_shard_is_refused_naming_it(tmp_path):
    paths = shards(tmp_path)
    man = write_manifest(str(tmp_path / "out.manifest.json"), paths)
    os.rename(paths[1], paths[1] + ".away")
    with pytest.raises(CacheError, match=r"out\.manifest\.json: shard out\.shard-1-of-2\.h5 \(rows 4\.\.10\) is "
                                         r"missing; re-run `featcache extract --shard 1/2 --force`"):
        open_cache(man)
    assert_closed(paths[0])  # the shards opened before the refusal are closed again
    os.rename(paths[1] + ".away", paths[1])
    with h5py.File(paths[1], "r+") as f:
        f["text/pooled"][0, 0] = 99.0
    with pytest.raises(CacheError, match=r"shard out\.shard-1-of-2\.h5 has changed since the manifest was written"):
        open_cache(man)
    assert_closed(paths[0])
    with pytest.raises(CacheError, match=r"shard out\.shard-1-of-2\.h5 has changed"):
        ShardedReader(man)  # verifying is the default of the reader too, not only of open_cache


def test_verify_false_trusts_the_manifest_and_hashes_nothing(tmp_path, monkeypatch):
    # Streaming workers reopen a manifest the parent has verified: they must not re-hash every shard.
    paths = shards(tmp_path)
    man = write_manifest(str(tmp_path / "out.manifest.json"), paths)
    with h5py.File(paths[1], "r+") as f:
        f["text/pooled"][0, 0] = 99.0

    def no_hashing(path):
        raise AssertionError(f"hashed {path}")
    monkeypatch.setattr("featcache.cache.manifest.file_sha256", no_hashing)
    with open_cache(man, verify=False) as r:
        assert r.array("text/pooled")[4, 0] == 99.0  # the changed shard is read as it is


def edit(man: str, change) -> None:
    doc = json.load(open(man))
    change(doc)
    json.dump(doc, open(man, "w"))


def test_a_shard_of_another_run_or_other_rows_is_refused(tmp_path):
    from featcache.digest import file_sha256
    paths = shards(tmp_path / "run")
    man = write_manifest(str(tmp_path / "run" / "out.manifest.json"), paths)
    os.replace(shards(tmp_path / "other", key="other-key")[1], paths[1])  # the same rows of another run
    edit(man, lambda doc: doc["shards"][1].update(sha256=file_sha256(paths[1])))  # checksum brought up to date
    with pytest.raises(CacheError, match=r"shard out\.shard-1-of-2\.h5 holds rows 4\.\.10 of key other-key, the "
                                         r"manifest says rows 4\.\.10 of key run-key"):
        open_cache(man)
    for p in paths:
        assert_closed(p)
    # the right run, other rows: the manifest tiles 0..3, 3..10 but the first file holds rows 0..4
    edit(man, lambda doc: (doc["shards"][0].update(stop=3, rows=3), doc["shards"][1].update(start=3, rows=7)))
    with pytest.raises(CacheError, match=r"shard out\.shard-0-of-2\.h5 holds rows 0\.\.4 of key run-key, the "
                                         r"manifest says rows 0\.\.3 of key run-key"):
        open_cache(man)
    # a shard file that says rows 4..9 but holds 6 rows
    paths = shards(tmp_path / "long")
    write(paths[1], 4, N, m=shard_meta(1, 2, 4, 9))
    man = str(tmp_path / "long" / "out.manifest.json")
    json.dump({"format": "featcache-shards", "version": 1, "key": "run-key", "rows": 9, "shards": [
        {"path": os.path.basename(p), "index": j, "start": lo, "stop": hi, "rows": hi - lo, "sha256": file_sha256(p)}
        for j, (p, (lo, hi)) in enumerate(zip(paths, ((0, 4), (4, 9))))]}, open(man, "w"))
    with pytest.raises(CacheError, match=r"shard out\.shard-1-of-2\.h5 holds rows 4\.\.9 of key run-key"):
        open_cache(man)


def test_shards_holding_other_arrays_are_refused(tmp_path):
    paths = shards(tmp_path, widths=(3, 4))
    man = write_manifest(str(tmp_path / "out.manifest.json"), paths)
    with pytest.raises(CacheError, match=r"out\.shard-1-of-2\.h5 holds other arrays than out\.shard-0-of-2\.h5"):
        open_cache(man)
    for p in paths:
        assert_closed(p)


def test_manifests_that_cannot_be_read_are_refused(tmp_path):
    paths = shards(tmp_path)
    man = str(tmp_path / "out.manifest.json")
    with pytest.raises(CacheError, match=r"manifest .*out\.manifest\.json does not exist: it is written when every "
                                         r"shard .* has finished; shard files present: out\.shard-0-of-2\.h5, "
                                         r"out\.shard-1-of-2\.h5$"):
        open_cache(man)
    with pytest.raises(CacheError, match=r"manifest .*x\.json does not exist: .* has finished$"):
        open_cache(str(tmp_path / "x.json"))
    write_manifest(man, paths)
    good = json.load(open(man))
    for bad in ("{not json", json.dumps({**good, "format": "something"}), json.dumps({**good, "shards": {}}),
                json.dumps({**good, "version": "1"}), json.dumps([1, 2])):
        open(man, "w").write(bad)
        with pytest.raises(CacheError, match=r"out\.manifest\.json is not a featcache shard manifest"):
            open_cache(man)
    for change, words in ((lambda d: d.update(version=2), "manifest version 2 and was written by a newer"),
                          (lambda d: d.update(rows=11), r"out\.manifest\.json: the shards hold 10 rows, the "
                                                        r"dataset has 11"),
                          (lambda d: d["shards"][1].update(start=5), r"json: shard out\.shard-1-of-2\.h5 holds "
                                                                     r"rows 5\.\.10 \(6 rows\) but the next "
                                                                     r"rows are 4\.\.: the shards do not tile"),
                          (lambda d: d["shards"][0].update(rows=3), r"holds rows 0\.\.4 \(3 rows\)")):
        json.dump(good, open(man, "w"))
        edit(man, change)
        with pytest.raises(CacheError, match=words):
            open_cache(man)
    json.dump({**good, "version": 0}, open(man, "w"))  # an older manifest loads
    with open_cache(man) as r:
        assert len(r) == N
