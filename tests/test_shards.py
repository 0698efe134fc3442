"""Sharded extraction on a real slice of ../shared/mvsa (limit 8: 16 rows, batches of 3, so shard and
split boundaries fall mid-dataset and the last batch is short): `torchrun --nproc-per-node 2` (gloo, CPU) and
`--shard I/N` each give shards whose manifest reads, and whose merge is, exactly the single-process cache;
`heads train` and `featcache info` take the manifest; the reader refuses missing, changed or foreign shards.

Every extraction here runs with one intra-op thread: torchrun gives each worker OMP_NUM_THREADS=1, and the
image backbone's conv kernels split their sums by thread count (measured: 2 threads vs 1 changes fp16 image
tokens by up to 0.0078), so bit-equality holds between runs with the same number of threads per process.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

import featcache.extract.launch as launch
import featcache.extract.shards as sh
from featcache.cache.manifest import ShardedReader, write_manifest
from featcache.cache.store import CacheError
from featcache.digest import file_sha256
from featcache.extract.config import ExtractConfig
from featcache.extract.engine import extract
from heads.data.cache import load_cache
from heads.data.stream import load_data
from mvsa_fixtures import require_mvsa

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
OPTS = ["--limit", "8", "--batch-size", "3", "--workers", "0", "--no-progress"]


def _cli(app, *args):
    import cli
    return CliRunner().invoke(getattr(cli, app), [str(a) for a in args])


def _flat(text: str) -> str:
    return " ".join(text.split())


def _arrays(path):
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda k, v: out.__setitem__(k, v[:]) if isinstance(v, h5py.Dataset) else None)
    return out


def _meta(path):
    with h5py.File(path, "r") as f:
        return json.loads(f.attrs["meta"])


@contextmanager
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _assert_same_cache(got: str, want: str):
    a, b = _arrays(got), _arrays(want)
    assert sorted(a) == sorted(b)
    for name in b:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name
    ma, mb = _meta(got), _meta(want)
    for k in ("key", "dataset", "preprocessing", "backbone", "weights", "text", "image"):
        assert ma[k] == mb[k], k
    assert sorted(ma["problems"]) == sorted(mb["problems"])


@pytest.fixture(scope="module")
def mvsa():
    return require_mvsa()


@pytest.fixture(scope="module")
def reference(mvsa, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref.h5"
    with _one_thread():
        return extract(ExtractConfig(data=str(mvsa), limit=8, batch_size=3, workers=0, out=str(out)),
                       progress=False, console=Console(file=io.StringIO()))


@pytest.fixture(scope="module")
def slurm_shards(mvsa, tmp_path_factory):
    """`featcache extract --shard 0/2` and `--shard 1/2` (as two SLURM array tasks would run them)."""
    out = tmp_path_factory.mktemp("slurm") / "m.h5"
    logs = []
    with _one_thread():
        for i in (1, 0):
            res = _cli("featcache_app", "extract", "--data", mvsa, "--out", out, "--shard", f"{i}/2", *OPTS)
            assert res.exit_code == 0, res.output
            logs.append(_flat(res.output))
    return out.parent, logs


def test_shard_rows_tile_the_dataset_in_whole_batches():
    for total in range(1, 30):
        for bs in range(1, 7):
            batches = -(-total // bs)
            for count in range(1, batches + 1):
                rows = [sh.shard_rows(total, bs, i, count) for i in range(count)]
                assert rows[0][0] == 0 and rows[-1][1] == total
                assert all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
                assert all(start % bs == 0 and stop > start for start, stop in rows)
                sizes = [-(-(stop - start) // bs) for start, stop in rows]  # batches per shard
                assert max(sizes) - min(sizes) <= 1
            with pytest.raises(ValueError, match=f"at most {batches} shards"):
                sh.shard_rows(total, bs, 0, batches + 1)
    for bad in ("2/2", "-1/3", "1", "a/b", "1/0"):
        with pytest.raises(ValueError, match="I/N"):
            sh.parse_shard(bad)
    assert sh.parse_shard(" 3/4 ") == (3, 4)
    assert sh.shard_path("c/x.h5", 3, 12) == "c/x.shard-03-of-12.h5"
    assert sh.manifest_path("c/x.h5") == "c/x.manifest.json"


def test_torchrun_two_cpu_ranks_equal_single_process(mvsa, reference, tmp_path):
    out = tmp_path / "m.h5"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "cli", "featcache", "extract", "--data", str(mvsa), "--out", str(out), *OPTS]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.manifest.json", "m.shard-0-of-2.h5",
                                                          "m.shard-1-of-2.h5"]
    doc = json.loads((tmp_path / "m.manifest.json").read_text())
    assert [(s["start"], s["stop"], s["rows"]) for s in doc["shards"]] == [(0, 9, 9), (9, 16, 7)]
    assert doc["key"] == _meta(reference)["key"] and doc["rows"] == 16
    shard1 = _meta(tmp_path / "m.shard-1-of-2.h5")
    assert shard1["shard"]["index"] == 1 and shard1["extract_config"]["shard"] == "1/2"
    assert shard1["dataset"]["samples"] == 7 and shard1["key"] != doc["key"]

    # the manifest read directly, as `heads` does, holds the single-process features
    got, want = load_cache(str(tmp_path / "m.manifest.json")), load_cache(reference)
    assert got.guids == want.guids and np.array_equal(got.labels, want.labels)
    for k in want.features:
        assert torch.equal(got.features[k], want.features[k]), k

    merged = tmp_path / "merged.h5"
    res = _cli("featcache_app", "merge", tmp_path / "m.manifest.json", "--out", merged)
    assert res.exit_code == 0, res.output
    _assert_same_cache(str(merged), reference)
    res = _cli("featcache_app", "merge", tmp_path / "m.manifest.json", "--out", merged)
    assert res.exit_code == 2 and "exists" in res.output
    merged.write_bytes(b"an older file")
    res = _cli("featcache_app", "merge", tmp_path / "m.manifest.json", "--out", merged, "--force")
    assert res.exit_code == 0 and f"wrote{merged}" in "".join(res.output.split()), res.output  # rich wraps long paths
    _assert_same_cache(str(merged), reference)  # --force: replaced by the merge


def test_slurm_shards_manifest_merge_info_train(slurm_shards, reference, tmp_path):
    folder, logs = slurm_shards
    assert "1 of 2 shards complete (missing: 0)" in logs[0]  # task 1 finished first: no manifest yet
    assert "wrote" in logs[1] and "m.manifest.json: 2 shards" in logs[1]
    manifest = folder / "m.manifest.json"
    res = _cli("featcache_app", "merge", manifest, "--out", tmp_path / "merged.h5")
    assert res.exit_code == 0, res.output
    _assert_same_cache(str(tmp_path / "merged.h5"), reference)

    res = _cli("featcache_app", "info", manifest)
    assert res.exit_code == 0, res.output
    for s in ("16 samples", "8 train / 8 test", "2 shards", "0..9, 9..16", "(16, 49, 320)", _meta(reference)["key"]):
        assert s in _flat(res.output), s
    res = _cli("heads_app", "train", "--cache", manifest, "--epochs", "1", "--val-ratio", "0.4", "--no-plots",
               "--fusion", "concat", "--out", tmp_path / "run")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "run" / "metrics.json").exists()
    # a manifest streams too (--memory-budget 0: blocks read across the two shards), with the in-memory numbers
    preds = []
    for budget in ("auto", "0"):
        res = _cli("heads_app", "predict", "--run", tmp_path / "run", "--cache", manifest, "--proba",
                   "--memory-budget", budget, "--out", tmp_path / f"p{budget}.csv")
        assert res.exit_code == 0, res.output
        preds.append((tmp_path / f"p{budget}.csv").read_text())
    assert preds[0] == preds[1] and len(preds[0].splitlines()) == 9
    st = load_data(str(manifest), budget="0", block_rows=4)
    assert st.batch(np.arange(16), keys=("image_tokens",))["image_tokens"].equal(
        load_cache(reference).batch(np.arange(16), keys=("image_tokens",))["image_tokens"])


def test_reader_refuses_missing_changed_and_foreign_shards(slurm_shards, tmp_path):
    src, _ = slurm_shards

    def fresh(name):
        d = tmp_path / name
        shutil.copytree(src, d)
        return d, d / "m.manifest.json"

    def refused(manifest, *words):
        with pytest.raises(CacheError) as err:
            ShardedReader(str(manifest))
        for w in words:
            assert w in str(err.value), (w, str(err.value))
        res = _cli("featcache_app", "info", manifest)  # the CLI: one message, no traceback
        assert res.exit_code == 2 and "Traceback" not in res.output and isinstance(res.exception, SystemExit)
        return str(err.value)

    d, manifest = fresh("missing")
    (d / "m.shard-1-of-2.h5").unlink()
    refused(manifest, "m.shard-1-of-2.h5", "rows 9..16", "is missing", "--shard 1/2")

    d, manifest = fresh("tampered")
    with h5py.File(d / "m.shard-0-of-2.h5", "r+") as f:
        f["image/pooled"][3, 7] += 1.0
    refused(manifest, "m.shard-0-of-2.h5", "has changed since the manifest was written")

    d, manifest = fresh("foreign")  # a shard of another run, with a manifest that lists its real sha256
    with h5py.File(d / "m.shard-1-of-2.h5", "r+") as f:
        meta = json.loads(f.attrs["meta"])
        meta["shard"]["key"] = "0123456789abcdef"
        f.attrs["meta"] = json.dumps(meta)
    with pytest.raises(CacheError, match="left from other settings"):
        write_manifest(str(manifest), [str(d / "m.shard-0-of-2.h5"), str(d / "m.shard-1-of-2.h5")])
    doc = json.loads(manifest.read_text())
    doc["shards"][1]["sha256"] = file_sha256(str(d / "m.shard-1-of-2.h5"))
    manifest.write_text(json.dumps(doc))
    refused(manifest, "m.shard-1-of-2.h5", "of key 0123456789abcdef")

    d, manifest = fresh("rows")
    doc = json.loads(manifest.read_text())
    doc["shards"][0]["stop"] = doc["shards"][0]["rows"] = 8
    manifest.write_text(json.dumps(doc))
    refused(manifest, "do not tile")

    d, manifest = fresh("absent")
    manifest.unlink()
    refused(manifest, "does not exist", "m.shard-0-of-2.h5, m.shard-1-of-2.h5")
    manifest.write_text("[1, 2]")
    refused(manifest, "not a featcache shard manifest")


def test_whole_cache_is_not_a_shard(reference, tmp_path):
    with pytest.raises(CacheError, match="is a whole cache"):
        write_manifest(str(tmp_path / "x.manifest.json"), [reference])


def test_rank_failures_reach_rank_0(monkeypatch, tmp_path):
    """No models: extract() and the collective are stubbed; rank 0 writes no manifest when a rank failed."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    cfg = ExtractConfig(data="unused", out=str(tmp_path / "m.h5"), device="cpu")
    with pytest.raises(ValueError, match="--shard and torchrun"):
        launch.run_extract(ExtractConfig(data="unused", shard="0/2"))
    seen = {}
    monkeypatch.setattr("featcache.extract.launch.extract", lambda c, **k: seen.setdefault("cfg", c) and "x.h5")
    monkeypatch.setattr(launch, "_all_gather", lambda status: [status, "rank 1: out of memory"])
    with pytest.raises(CacheError, match=r"1 of 2 ranks failed \(rank 1: out of memory\)"):
        launch.run_extract(cfg, console=Console(file=io.StringIO()))
    assert seen["cfg"].shard == "0/2" and not (tmp_path / "m.manifest.json").exists()


@pytest.mark.parametrize("device,local,count,want", [
    ("cuda:0", 3, 2, "cuda:1"),  # --device cuda:0 must not put every rank on GPU 0
    ("cuda", 1, 1, "cuda:0"),  # one GPU visible per task (CUDA_VISIBLE_DEVICES per rank): never cuda:LOCAL_RANK
    ("auto", 5, 4, "cuda:1"), ("cpu", 1, 4, "cpu"), ("auto", 1, 0, "auto"), ("cuda:1", 1, 0, "cuda:1")])
def test_rank_device_maps_local_rank_onto_visible_gpus(monkeypatch, device, local, count, want):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    assert launch.rank_device(device, local) == want


def test_set_device_failure_is_reported_through_the_exchange(monkeypatch, tmp_path):
    """A rank whose GPU cannot be selected still takes part in the exchange (else the others wait forever)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)

    def bad_ordinal(device):
        raise RuntimeError("CUDA error: invalid device ordinal")
    monkeypatch.setattr(torch.cuda, "set_device", bad_ordinal)
    monkeypatch.setattr("featcache.extract.launch.extract", lambda c, **k: pytest.fail("extracted anyway"))
    sent = []
    monkeypatch.setattr(launch, "_all_gather", lambda status: sent.append(status) or [status, None])
    said = io.StringIO()
    with pytest.raises(RuntimeError, match="invalid device ordinal"):
        launch.run_extract(ExtractConfig(data="unused", out=str(tmp_path / "m.h5"), device="cuda:0"),
                           console=Console(file=said))
    assert sent == ["rank 0: CUDA error: invalid device ordinal"]
    assert "1 of 2 ranks failed (rank 0: CUDA error: invalid device ordinal)" in _flat(said.getvalue())


@pytest.mark.parametrize("failing", ["1", "0,1"])
def test_gloo_status_exchange_reports_every_failed_rank(tmp_path, failing):
    """Real torchrun, real gloo collective, extract() stubbed (tests/rank_child.py): seconds, no models."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "tests" / "rank_child.py"), str(tmp_path / "m.h5"), failing]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    out = _flat(res.stdout)
    assert "rank 0 device cpu shard 0/2" in out and "rank 1 device cpu shard 1/2" in out, res.stdout + res.stderr
    assert "rank 1 raised RuntimeError: out of memory on rank 1" in out
    if failing == "1":
        assert "rank 0 raised CacheError: no manifest: 1 of 2 ranks failed (rank 1: out of memory on rank 1)" in out
    else:  # rank 0 failed too: it names both ranks' errors, then raises its own
        assert ("rank 0 said no manifest: 2 of 2 ranks failed (rank 0: out of memory on rank 0; rank 1: out of "
                "memory on rank 1)") in out
        assert "rank 0 raised RuntimeError: out of memory on rank 0" in out
    assert not (tmp_path / "m.manifest.json").exists()


def test_interrupted_shard_resumes_to_the_same_file(mvsa, slurm_shards, tmp_path, monkeypatch):
    import featcache.cache.store as fs
    src, _ = slurm_shards
    cfg = ExtractConfig(data=str(mvsa), limit=8, batch_size=3, workers=0, out=str(tmp_path / "m.h5"), shard="1/2")
    real_write, calls, stop_at = fs.CacheWriter.write, [], [3]

    def write(self, start, *a, **k):
        calls.append(start)
        if start in stop_at:
            stop_at.clear()
            raise KeyboardInterrupt
        return real_write(self, start, *a, **k)
    monkeypatch.setattr(fs.CacheWriter, "write", write)
    quiet = Console(file=io.StringIO())
    with _one_thread():
        with pytest.raises(KeyboardInterrupt):
            extract(cfg, progress=False, console=quiet)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m.shard-1-of-2.h5.partial"]
        with pytest.raises(CacheError, match="--resume"):
            extract(cfg, progress=False, console=quiet)
        calls.clear()
        path = launch.run_extract(cfg, resume=True, progress=False, console=quiet)
    assert calls == [3, 6]  # shard-local starts of global rows 12..14 and 15: only the missing batches ran
    assert path == str(tmp_path / "m.shard-1-of-2.h5")  # shard 0 is not here: no manifest
    got, want = _arrays(path), _arrays(src / "m.shard-1-of-2.h5")
    assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)
    assert _meta(path)["key"] == _meta(src / "m.shard-1-of-2.h5")["key"]
