"""End-to-end extraction with the default offline backbones (minilm-l6 + efficientnet-lite0) on slices of
the real ../shared/mvsa: array shapes and dtypes, row order, labels, GBK texts, metadata; the CLI
(extract / info), cache reuse, refusal of other settings, resume after an interruption (bit-identical),
unusable cache files, and the per-output lock."""
from __future__ import annotations

import io
import json
import os
import shutil

import h5py
import numpy as np
import pytest
from filelock import FileLock
from rich.console import Console
from typer.testing import CliRunner

import featcache.cache.store as fs
import featcache.extract.engine as fx
from featcache.backbones import DEFAULT_BACKBONE, parse_backbone
from featcache.cache.store import CacheError, CacheReader, partial_path
from featcache.extract.config import ExtractConfig
from featcache.extract.engine import extract
from featcache.extract.plan import make_plan
from featcache.sources.mvsa import MVSA
from featcache.sources.text import decode_bytes
from mvsa_fixtures import require_mvsa

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.slow

SMALL = ["--limit", "8", "--batch-size", "4", "--workers", "0", "--no-progress"]


def _quiet():
    return Console(file=io.StringIO(), width=1000)


def _cli(*args):
    from cli import featcache_app
    return CliRunner().invoke(featcache_app, [str(a) for a in args])


def _flat(output: str) -> str:
    """CLI output with rich's line wrapping undone."""
    return " ".join(output.split())


def _label_rows(root, fname, limit):
    lines = [ln.strip() for ln in (root / fname).read_text().splitlines() if ln.strip()]
    assert lines[0] == "guid,tag"
    return [tuple(ln.split(",")) for ln in lines[1:limit + 1]]


def _no_models(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a backbone was loaded")
    monkeypatch.setattr(fx, "create_text", boom)
    monkeypatch.setattr(fx, "create_image", boom)


def _all_arrays(path):
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda k, v: out.__setitem__(k, v[:]) if isinstance(v, h5py.Dataset) else None)
    return out


@pytest.fixture(scope="module")
def mvsa():
    return require_mvsa()


@pytest.fixture(scope="module")
def cache24(mvsa, tmp_path_factory):
    """limit=24: the first 24 rows of train.txt and of test_without_label.txt (48 rows)."""
    out = tmp_path_factory.mktemp("x24") / "m24.h5"
    console = _quiet()
    path = extract(ExtractConfig(data=str(mvsa), limit=24, out=str(out), batch_size=16, workers=1),
                   progress=False, console=console)
    return path, console.file.getvalue()


@pytest.fixture(scope="module")
def cli8(mvsa, tmp_path_factory):
    """`featcache extract --limit 8 --batch-size 4` through the CLI (16 rows); also the uninterrupted
    reference for the resume test."""
    out = tmp_path_factory.mktemp("cli") / "c8.h5"
    res = _cli("extract", "--data", mvsa, "--out", out, *SMALL)
    assert res.exit_code == 0, res.output
    return out, res.output


# ------------------------------------------------------------------------------------------- contents
def test_extract_shapes_dtypes_rows(mvsa, cache24):
    path, log = cache24
    with CacheReader(path) as r:
        arrays = r.datasets()
        guids, splits = r.strings("samples/guid"), r.strings("samples/split")
        labels, valid, done = r.array("samples/label"), r.array("samples/valid"), r.array("samples/done")
        raw, text = r.strings("samples/raw_text"), r.strings("samples/text")
        tt, tm, tp = r.array("text/tokens"), r.array("text/mask"), r.array("text/pooled")
        it, ip = r.array("image/tokens"), r.array("image/pooled")
        meta = r.meta
        assert len(r) == 48
    assert arrays["text/tokens"] == ((48, 64, 384), "float16")
    assert arrays["text/mask"] == ((48, 64), "bool")
    assert arrays["text/pooled"] == ((48, 384), "float32")
    assert arrays["image/tokens"] == ((48, 49, 320), "float16")
    assert arrays["image/pooled"] == ((48, 1280), "float32")
    assert arrays["samples/label"] == ((48,), "int8")
    assert "text_hidden/states" not in arrays

    train, test = _label_rows(mvsa, "train.txt", 24), _label_rows(mvsa, "test_without_label.txt", 24)
    assert guids == [g for g, _ in train] + [g for g, _ in test]
    assert splits == ["train"] * 24 + ["test"] * 24
    assert labels.tolist() == [MVSA.classes.index(t) for _, t in train] + [-1] * 24
    assert valid.all() and done.all()

    # texts: decoded like the files say (GBK ones included), whitespace-collapsed copy for the backbone
    encodings = {}
    for g, r_text, t in zip(guids, raw, text):
        expect, enc = decode_bytes((mvsa / "data" / f"{g}.txt").read_bytes())
        encodings[enc] = encodings.get(enc, 0) + 1
        assert r_text == expect and t == " ".join(expect.split())
    assert encodings.get("gb18030", 0) > 0, "the slice should contain GBK texts"
    assert not any("\ufffd" in s or "\r" in s for s in raw)

    # features: finite, per-sample, pooled text = masked mean of the tokens
    for a in (tt, tp, it, ip):
        assert np.isfinite(a.astype(np.float32)).all()
    assert tm[:, 0].all() and (tm.sum(1) < 64).any()
    mean = (tt.astype(np.float32) * tm[..., None]).sum(1) / tm.sum(1, keepdims=True)
    np.testing.assert_allclose(mean, tp, atol=2e-2)
    assert np.linalg.matrix_rank(ip.astype(np.float64)) > 40  # every image gives its own features
    assert np.abs(ip).sum(1).min() > 0

    d = meta["dataset"]
    assert (d["samples"], d["train"], d["test"], d["invalid"]) == (48, 24, 24, 0)
    assert d["labels"] == {n: sum(t == n for _, t in train) for n in MVSA.classes}
    assert d["text_encodings"] == encodings and d["empty_texts"] == 0 and meta["problems"] == []
    assert d["root"] == str(mvsa.resolve()) or os.path.samefile(d["root"], mvsa)
    assert meta["preprocessing"]["limit"] == 24 and meta["preprocessing"]["max_text_len"] == 64
    assert (meta["backbone"]["text"], meta["backbone"]["image"]) == parse_backbone(DEFAULT_BACKBONE)
    assert meta["text"] == {"max_len": 64, "token_dim": 384, "pooled_dim": 384, "num_layers": 6,
                            "start_layer": None}
    assert meta["image"]["num_patches"] == 49 and meta["image"]["pooled_dim"] == 1280
    assert all(len(w["sha256"]) == 64 for w in meta["weights"].values())
    assert meta["timings"]["samples"] == 48
    assert meta["classes"] == list(MVSA.classes)  # the reader's class names, label k = classes[k]
    env = meta["env"]  # what produced the cache (featcache.env)
    assert env["device"] == "cpu" and env["threads"] >= 1 and env["packages"]["torch"] and env["python"]
    assert meta["tool_version"] == env["project"]
    assert "wrote" in log and "48 samples" in log


# ------------------------------------------------------------------------------------------- CLI
def test_cli_extract_then_info(cli8):
    out, log = cli8
    assert out.exists() and not os.path.exists(partial_path(str(out))) and not os.path.exists(f"{out}.lock")
    assert "16 samples (8 train, 8 test)" in _flat(log)
    res = _cli("info", out)
    assert res.exit_code == 0, res.output
    for s in ("text/tokens", "(16, 64, 384)", "text/mask", "text/pooled", "(16, 384)", "image/tokens",
              "(16, 49, 320)", "image/pooled", "(16, 1280)", "float16", "minilm-l6", "efficientnet-lite0",
              "16 samples", "8 train / 8 test"):
        assert s in _flat(res.output), s


def test_cli_same_settings_reuse_the_cache(mvsa, cli8, monkeypatch):
    out, _ = cli8
    before = os.stat(out).st_mtime_ns, out.read_bytes()
    _no_models(monkeypatch)
    res = _cli("extract", "--data", mvsa, "--out", out, *SMALL[:2], "--no-progress", "--batch-size", "8")
    assert res.exit_code == 0, res.output
    assert "reusing" in res.output and "already holds these features" in _flat(res.output)
    assert (os.stat(out).st_mtime_ns, out.read_bytes()) == before


def test_cache_keyed_by_an_older_version_is_reused(mvsa, cli8, tmp_path, monkeypatch):
    """Before the schema version left the cache key, the same features had another key: such a cache is still
    these features, so extract reuses it (`make run` on an old cache must not fail or recompute)."""
    old = tmp_path / "old.h5"
    shutil.copyfile(cli8[0], old)
    cfg = ExtractConfig(data=str(mvsa), limit=8, batch_size=4, workers=0, out=str(old))
    earlier = make_plan(cfg).earlier_keys
    with h5py.File(old, "r+") as f:  # what 0.1.0 wrote: the key with the schema version in it
        meta = json.loads(f.attrs["meta"])
        f.attrs["meta"] = json.dumps({**meta, "key": earlier[0]})
    before = old.read_bytes()
    _no_models(monkeypatch)
    res = _cli("extract", "--data", mvsa, "--out", old, *SMALL)
    assert res.exit_code == 0 and f"key {earlier[0]}); reusing it" in _flat(res.output), res.output
    assert old.read_bytes() == before


def test_cli_other_settings_same_out_refused(mvsa, cli8, monkeypatch):
    out, _ = cli8
    before = os.stat(out).st_mtime_ns
    _no_models(monkeypatch)
    res = _cli("extract", "--data", mvsa, "--out", out, *SMALL, "--clean-text")
    assert res.exit_code == 2, res.output
    assert "other settings" in res.output and str(out) in _flat(res.output)
    assert "--force" in res.output and "Traceback" not in res.output
    assert os.stat(out).st_mtime_ns == before


# ------------------------------------------------------------------------------------------- resume
def test_interrupt_then_resume_is_bit_identical(mvsa, cli8, tmp_path, monkeypatch):
    reference, _ = cli8
    out = tmp_path / "r.h5"
    cfg = ExtractConfig(data=str(mvsa), limit=8, out=str(out), batch_size=4, workers=0)
    real_write, calls = fs.CacheWriter.write, []

    def interrupting_write(self, start, *a, **k):
        calls.append(start)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_write(self, start, *a, **k)
    monkeypatch.setattr(fs.CacheWriter, "write", interrupting_write)
    with pytest.raises(KeyboardInterrupt):
        extract(cfg, progress=False, console=_quiet())
    assert calls == [0, 4, 8]
    assert not out.exists() and os.path.exists(partial_path(str(out)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.h5.partial"]  # lock released and removed
    with h5py.File(partial_path(str(out)), "r") as f:
        assert f["samples/done"][:].tolist() == [True] * 8 + [False] * 8
        assert not f.attrs["complete"]
    with pytest.raises(CacheError, match="--resume"):
        CacheReader(str(out))

    # without --resume: refused before any model loads, the partial file is kept
    monkeypatch.undo()
    with monkeypatch.context() as m:
        _no_models(m)
        res = _cli("extract", "--data", mvsa, "--out", out, *SMALL)
        assert res.exit_code == 2, res.output
        assert "--resume" in res.output and "interrupted" in res.output and "Traceback" not in res.output
        with pytest.raises(CacheError, match="--resume"):
            extract(cfg, progress=False, console=_quiet())
    assert os.path.exists(partial_path(str(out))) and not out.exists()

    # --resume: only the missing batches run, and the result is the uninterrupted file, bit for bit
    calls.clear()

    def counting_write(self, start, *a, **k):
        calls.append(start)
        return real_write(self, start, *a, **k)
    monkeypatch.setattr(fs.CacheWriter, "write", counting_write)
    console = _quiet()
    assert extract(cfg, resume=True, progress=False, console=console) == str(out)
    assert calls == [8, 12]
    assert "resuming" in console.file.getvalue()
    assert out.exists() and not os.path.exists(partial_path(str(out)))
    got, want = _all_arrays(out), _all_arrays(reference)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert np.array_equal(got[name], want[name]), name
    with CacheReader(str(out)) as a, CacheReader(str(reference)) as b:
        assert a.meta["key"] == b.meta["key"] and a.meta["dataset"] == b.meta["dataset"]


# ------------------------------------------------------------------------------------------- bad files
def test_info_refuses_unusable_files(cli8, tmp_path):
    good, _ = cli8
    truncated = tmp_path / "truncated.h5"
    data = good.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("x", data=np.arange(3))
    text = tmp_path / "notes.h5"
    text.write_text("just some text\n")
    partial = tmp_path / "half-done.h5"
    shutil.copy(good, partial_path(str(partial)))
    with h5py.File(partial_path(str(partial)), "r+") as f:
        f.attrs["complete"] = False
    shutil.copy(partial_path(str(partial)), tmp_path / "incomplete.h5")
    cases = {truncated: "may be truncated", other: "not a feature cache", text: "not a readable HDF5 file",
             tmp_path / "missing.h5": "does not exist", partial: "--resume",
             tmp_path / "incomplete.h5": "is incomplete"}
    for path, words in cases.items():
        res = _cli("info", path)
        assert res.exit_code == 2, (path, res.output)
        flat = _flat(res.output)
        assert flat.startswith("error:") and words in flat and path.name in flat, res.output
        assert "Traceback" not in res.output and isinstance(res.exception, SystemExit)


def test_second_extract_refused_while_lock_is_held(mvsa, tmp_path, monkeypatch):
    _no_models(monkeypatch)
    out = tmp_path / "locked.h5"
    lock = FileLock(f"{out}.lock")
    with lock.acquire(timeout=0):
        res = _cli("extract", "--data", mvsa, "--out", out, *SMALL)
    assert res.exit_code == 2, res.output
    flat = _flat(res.output)
    assert "lock" in flat and f"{out}.lock" in flat and "another `featcache extract`" in flat
    assert not out.exists() and not os.path.exists(partial_path(str(out)))


def test_overlap_auto_keeps_the_lane_only_for_towers_of_comparable_size(monkeypatch):
    """The lane halves each tower's threads: worth it when the towers are of comparable size (MiniLM beside
    EfficientNet-Lite0, 4.9x), not when one dwarfs the other (mpnet-base, 24x). on/off are obeyed as given."""
    import torch
    from featcache.extract.forward import LANE_MAX_RATIO, use_lane
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    cpu, small = torch.device("cpu"), torch.nn.Linear(10, 10)  # 110 parameters
    near, far = torch.nn.Linear(10, LANE_MAX_RATIO * 10), torch.nn.Linear(10, LANE_MAX_RATIO * 12)
    assert use_lane("auto", cpu, None, 0, near, small) and use_lane("auto", cpu, None, 0, small, near)
    assert not use_lane("auto", cpu, None, 0, far, small) and not use_lane("auto", cpu, None, 0, small, far)
    assert use_lane("on", cpu, None, 0, far, small) and not use_lane("off", cpu, None, 0, near, small)
    assert not use_lane("auto", cpu, None, 2, near, small)  # DataLoader workers decode instead
    assert not use_lane("auto", torch.device("meta"), None, 0, near, small)  # not a CPU run


def test_image_lane_matches_the_serial_path(mvsa, cli8, tmp_path):
    """--overlap on (image tower + decoding in a second thread, half the threads each) writes the arrays of
    the serial path to fp16 rounding: both towers then run on fewer threads, and their matmuls and convolutions
    sum in another order (on some CPUs the text tokens differ by one fp16 ulp in ~0.2% of values). Masks,
    labels and validity are exact. cli8 is the default (auto) run."""
    ser = tmp_path / "serial.h5"
    res = _cli("extract", "--data", mvsa, "--out", ser, "--overlap", "off", *SMALL)
    assert res.exit_code == 0, res.output
    lane = tmp_path / "lane.h5"
    res = _cli("extract", "--data", mvsa, "--out", lane, "--overlap", "on", "--image-views", "1", *SMALL)
    assert res.exit_code == 0, res.output
    a, b = _all_arrays(ser), _all_arrays(lane)
    for name in ("text/mask", "samples/valid", "samples/label"):
        assert np.array_equal(a[name], b[name]), name
    for name in ("text/tokens", "text/pooled"):
        assert np.allclose(a[name].astype(np.float32), b[name].astype(np.float32), atol=4e-3, rtol=4e-3), name
    for name in ("image/tokens", "image/pooled"):
        assert np.allclose(a[name].astype(np.float32), b[name].astype(np.float32), atol=0.02, rtol=0.01), name
        assert np.abs(a[name].astype(np.float32)).mean() > 0.01
    assert b["image_views/tokens"].shape[1] == 1 and np.abs(b["image_views/pooled"]).mean() > 0.01
    assert _cli("extract", "--data", mvsa, "--out", tmp_path / "x.h5", "--overlap", "maybe",
                *SMALL).exit_code == 2
