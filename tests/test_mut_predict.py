"""`heads predict` against the head in memory: every written tag is the argmax of the head's logits plus the
run's bias offsets, or the run's fallback for an invalid row (also in the middle of the split), in cache order;
the probabilities are the softmax of the unbiased logits; with a stage-2 run they come from its text layers on
the stored states (or the whole text tower) and its head, K fold models averaged; and the cache rows it reads,
written and read back by featcache.cache.store (round trip, resume, finish). Written for `make mutate`
(TESTING.md)."""
from __future__ import annotations

import csv
import json
import os
import shutil

import h5py
import numpy as np
import pytest

import word_tower as wt
from conftest import build_synthetic_cache
from featcache.cache.store import (LEGACY_CLASSES, CacheError, CacheReader, CacheWriter, partial_path,
                                   problems_path)
from featcache.sources.base import Sample
from heads.config import TrainConfig
import heads.predict
from heads.data.cache import FEATURES, load_cache
from heads.data.stream import StreamData
from heads.infer import infer, softmax
from heads.predict import fallback_tag, predict
from heads.train.crossfit import train_crossfit
from heads.train.stage1 import train

CLASSES = list(LEGACY_CLASSES)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A concat run on a noisy synthetic cache whose test split has invalid rows in the middle (5, 17) and at
    its end, with large hand-set bias offsets (so that the bias changes many tags)."""
    root = tmp_path_factory.mktemp("mutpredict")
    cache = build_synthetic_cache(str(root / "cache.h5"), n_train=90, n_test=30, noise=3.0)
    data = load_cache(cache)
    test_rows = data.rows("test")
    with h5py.File(cache, "r+") as f:
        for k in (5, 17):
            f["samples/valid"][test_rows[k]] = False
    out = str(root / "run")
    res = train(TrainConfig.from_flat(fusion="concat", epochs=2, patience=0, hidden=8, plots=False), cache, out)
    with open(os.path.join(out, "bias.json"), "w") as f:
        json.dump({"labels": CLASSES, "offsets": [0.0, 1.5, -1.0]}, f)
    return cache, out, res.model


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_tags_are_the_biased_argmax_and_invalid_rows_keep_their_place(run, tmp_path):
    cache, out, model = run
    data = load_cache(cache)
    rows = data.rows("test")
    ok = data.valid[rows]
    assert not ok[5] and not ok[17] and not ok[-1] and ok.sum() == rows.size - 3
    logits = infer(model, data, rows[ok])["logits"]
    biased = np.array(CLASSES)[(logits + np.array([0.0, 1.5, -1.0])).argmax(1)]
    plain = np.array(CLASSES)[logits.argmax(1)]
    assert (biased != plain).sum() >= 3  # the offsets matter on this data
    fallback = fallback_tag(out, CLASSES)
    want = np.full(rows.size, fallback, dtype=object)
    want[ok] = biased

    res = predict(out, cache, str(tmp_path / "p.csv"), proba=True)
    lines = read(tmp_path / "p.csv")
    assert [r["guid"] for r in lines] == [data.guids[i] for i in rows]
    assert [r["tag"] for r in lines] == list(want)
    assert res.invalid == [data.guids[rows[k]] for k in np.flatnonzero(~ok)]
    assert res.written == rows.size and res.fallback_tag == fallback and res.split == "test"
    assert res.out == str(tmp_path / "p.csv")
    assert res.tags == {t: int((want == t).sum()) for t in set(want)}
    proba = np.array([[float(r[f"p_{c}"]) if r[f"p_{c}"] else np.nan for c in CLASSES] for r in lines])
    assert np.isnan(proba[~ok]).all()
    np.testing.assert_allclose(proba[ok], softmax(logits), atol=2e-6)
    header = open(tmp_path / "p.csv").readline().strip()
    assert header == "guid,tag," + ",".join(f"p_{c}" for c in CLASSES)


def test_without_proba_only_guid_and_tag(run, tmp_path):
    cache, out, _ = run
    predict(out, cache, str(tmp_path / "p.csv"))
    text = open(tmp_path / "p.csv").read().splitlines()
    assert text[0] == "guid,tag" and all(line.count(",") == 1 for line in text)


def test_fallback_is_the_most_frequent_training_class_first_on_ties(tmp_path):
    def fallback(counts):
        (tmp_path / "split.json").write_text(json.dumps({"train_per_class": counts}))
        return fallback_tag(str(tmp_path), ["a", "b", "c"])
    assert fallback({"a": 3, "b": 9, "c": 4}) == "b"
    assert fallback({"a": 3, "b": 4, "c": 4}) == "b"
    assert fallback({"a": 5, "b": 4, "c": 5}) == "a"
    assert fallback({"c": 1}) == "c"


# The cache rows predict reads: featcache.cache.store's writer and reader, round trip and resume.

def _samples(n: int):
    return [Sample(guid=f"g{k}", split="test" if k % 3 == 0 else "train", label=-1 if k == 4 else k % 3,
                   raw_text=f"raw é {k}", text=f"text {k}", image_path="", target="t" if k == 2 else "")
            for k in range(n)]


def test_cache_writer_reader_round_trip_and_resume(tmp_path):
    path, n = str(tmp_path / "c.h5"), 7
    rng = np.random.default_rng(0)
    arrays = {"text/tokens": rng.normal(size=(n, 4, 3)).astype(np.float16), "text/mask": rng.random((n, 4)) > .5,
              "text/pooled": rng.normal(size=(n, 5)).astype(np.float32)}
    meta = {"key": "k1", "backbone": {"name": "x"}, "preprocessing": {}}
    w = CacheWriter(path, meta, _samples(n), {k: a.shape for k, a in arrays.items()})
    assert w.first_undone() == 0
    w.write(0, {k: a[:3] for k, a in arrays.items()}, captions=["c0", "c1", "c2"], invalid=[1], problems=["p"])
    assert w.first_undone() == 3 and os.path.exists(problems_path(path)) and w.problems() == ["p"]
    with pytest.raises(CacheError, match="not every row"):
        w.finish(meta)
    w.close()
    with pytest.raises(CacheError, match="different settings"):
        CacheWriter(path, {**meta, "key": "k2"}, _samples(n), {}, resume=True)
    w = CacheWriter(path, meta, _samples(n), {}, resume=True)  # a killed run, resumed
    assert w.first_undone() == 3 and w.problems() == ["p"]
    w.write(3, {k: a[3:] for k, a in arrays.items()}, invalid=[5])
    assert w.first_undone() == n  # nothing left: a resume of a complete file extracts no row again
    assert w.finish({**meta, "classes": ["a", "b", "c"]}) == path
    assert not os.path.exists(partial_path(path)) and not os.path.exists(problems_path(path))
    w.close()  # as extraction does after an error: harmless once finished
    with CacheReader(path) as r:
        assert len(r) == n and r.classes == ["a", "b", "c"] and r.meta["key"] == "k1"
        for k, a in arrays.items():
            got = r.array(k)
            assert got.dtype == a.dtype and np.array_equal(got, a), k
        assert r.strings("samples/guid") == [f"g{k}" for k in range(n)]
        assert r.strings("samples/raw_text")[3] == "raw é 3" and r.strings("samples/text")[6] == "text 6"
        assert r.strings("samples/split")[:3] == ["test", "train", "train"]
        assert r.strings("samples/caption") == ["c0", "c1", "c2"] + [""] * 4
        assert r.strings("samples/target")[2] == "t" and r.has("samples/target") and not r.has("nope")
        assert r.array("samples/valid").tolist() == [k not in (1, 5) for k in range(n)]
        assert r.array("samples/label").tolist() == [0, 1, 2, 0, -1, 2, 0]
        assert r.array("samples/done").all()
        assert r.datasets()["text/tokens"] == ((n, 4, 3), "float16")


def test_cache_without_texts_and_an_unfinished_file(tmp_path):
    path = str(tmp_path / "c.h5")
    w = CacheWriter(path, {"key": "k"}, _samples(2), {"image/pooled": (2, 3)}, texts=False)
    w.write(0, {"image/pooled": np.ones((2, 3), np.float32)})
    assert w.finish({"key": "k"}) == path
    with CacheReader(path) as r:
        assert not r.has("samples/raw_text") and not r.has("samples/text") and not r.has("samples/target")
        assert r.array("image/pooled").dtype == np.float32 and r.classes == list(CLASSES)
    w = CacheWriter(str(tmp_path / "d.h5"), {"key": "k"}, _samples(2), {"image/pooled": (2, 3)})
    w.close()
    with pytest.raises(CacheError, match="unfinished"):
        CacheReader(partial_path(str(tmp_path / "d.h5")))
    with pytest.raises(CacheError, match="interrupted"):
        CacheReader(str(tmp_path / "d.h5"))


def test_two_fold_heads_vote_together(run, tmp_path):
    """K = 2: both fold heads' probabilities are averaged (not the first head's alone)."""
    cache = run[0]
    res = train_crossfit(TrainConfig.from_flat(fusion="concat", folds=2, epochs=2, patience=0, hidden=8,
                                               plots=False), cache, str(tmp_path / "cv"))
    predict(str(tmp_path / "cv"), cache, str(tmp_path / "p.csv"), proba=True)
    data = load_cache(cache)
    ok = data.rows("test")[data.valid[data.rows("test")]]
    want = np.mean([softmax(infer(fold.model, data, ok)["logits"]) for fold in res.folds], axis=0)
    got = np.array([[float(r[f"p_{c}"]) for c in CLASSES] for r in read(tmp_path / "p.csv") if r["p_negative"]])
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_a_short_fallback_does_not_cut_longer_tags(run, tmp_path):
    """The fallback ("neutral", 7 letters) sets no width for the other tags ("negative", "positive")."""
    cache, out, model = run
    short = str(tmp_path / "run")
    shutil.copytree(out, short)
    os.remove(os.path.join(short, "bias.json"))  # its +1.5 on neutral would make every tag neutral
    split = json.load(open(os.path.join(short, "split.json")))
    split["train_per_class"] = {"negative": 1, "neutral": 50, "positive": 1}
    json.dump(split, open(os.path.join(short, "split.json"), "w"))
    res = predict(short, cache, str(tmp_path / "p.csv"))
    assert res.fallback_tag == "neutral"
    assert {r["tag"] for r in read(tmp_path / "p.csv")} <= set(CLASSES)
    assert set(res.tags) <= set(CLASSES) and len(res.tags) >= 2


@pytest.mark.parametrize("budget", ["0", "1GB"])
def test_the_memory_budget_decides_whether_predict_streams_the_heads_arrays(run, tmp_path, monkeypatch, budget):
    """--memory-budget 0 streams exactly the arrays the head reads (not every array of the cache); a budget they
    fit loads them; the tags are the same either way."""
    cache, out, model = run
    loaded = []

    def spy(*args, **kwargs):
        loaded.append(real(*args, **kwargs))
        return loaded[-1]
    real = heads.predict.load_data
    monkeypatch.setattr(heads.predict, "load_data", spy)
    predict(out, cache, str(tmp_path / "p.csv"), memory_budget=budget)
    monkeypatch.undo()
    predict(out, cache, str(tmp_path / "memory.csv"))
    assert open(tmp_path / "p.csv").read() == open(tmp_path / "memory.csv").read()
    assert len(loaded) == 1 and isinstance(loaded[0], StreamData) == (budget == "0")
    if budget == "0":
        with h5py.File(cache, "r") as f:
            own = sum(f[FEATURES[k]].nbytes for k in model.inputs)
            every = sum(f[name].nbytes for name in FEATURES.values() if name in f)
        assert loaded[0].need == own < every


def test_refusals_name_the_cache_and_the_splits_it_has(run, tmp_path):
    cache, out, _ = run
    with pytest.raises(ValueError, match=r"has no samples in split 'dev' \(splits present: test, train\)"):
        predict(out, cache, str(tmp_path / "p.csv"), split="dev")
    other = build_synthetic_cache(str(tmp_path / "other.h5"), n_train=30, n_test=6,
                                  preprocessing={"clean_text": True})
    with pytest.raises(CacheError, match=f"differs from {other}"):
        predict(out, other, str(tmp_path / "p.csv"))


# Stage-2 runs (fine-tuned top text layers) on a cache made with tests/word_tower.py's pure-torch text backbone:
# the stage-2 tests of test_finetune.py / test_predict_data.py extract features with a model, too slow per mutant.

@pytest.fixture(scope="module")
def stage2(tmp_path_factory):
    with wt.registered():
        yield wt.stage2_runs(tmp_path_factory.mktemp("mutstage2"))


def check_stage2(runs, kind: str, mode: str, tmp_path):
    """predict's probabilities are the in-memory models' with `mode`'s text forward, its tags their argmax, the
    invalid rows (wt.INVALID, also mid-split) the fallback in place."""
    run_dir, models = runs[kind]
    rows, want = wt.in_memory(runs, models, mode)
    other = wt.in_memory(runs, models, "full" if mode == "cached" else "cached")[1]
    alone = wt.in_memory(runs, models, mode, layers=False)[1]
    # what a wrong branch would compute (the other text forward, the heads without the fine-tuned layers)
    # differs beyond the written precision, so the equality below tells them apart
    assert np.abs(other - want).max() > 10 * wt.ATOL and np.abs(alone - want).max() > 0.05
    res = predict(run_dir, runs["cache"], str(tmp_path / "p.csv"), proba=True)
    lines, data = read(tmp_path / "p.csv"), load_cache(runs["cache"], keys=())
    test = data.rows("test")
    ok = data.valid[test]
    assert np.flatnonzero(~ok).tolist() == list(wt.INVALID) and rows.tolist() == test[ok].tolist()
    assert [r["guid"] for r in lines] == [data.guids[i] for i in test]
    proba = np.array([[float(r[f"p_{c}"]) if r[f"p_{c}"] else np.nan for c in CLASSES] for r in lines])
    assert np.isnan(proba[~ok]).all()
    np.testing.assert_allclose(proba[ok], want, atol=wt.ATOL, rtol=0)
    tags = np.full(test.size, fallback_tag(run_dir, CLASSES), dtype=object)
    tags[ok] = np.array(CLASSES)[want.argmax(1)]
    assert [r["tag"] for r in lines] == tags.tolist() and len(set(tags[ok])) >= 2
    assert res.invalid == [data.guids[test[k]] for k in wt.INVALID] and res.written == test.size
    assert res.tags == {t: int((tags == t).sum()) for t in set(tags)}


def test_stage2_cached_run_predicts_with_its_text_layers_on_the_stored_states(stage2, tmp_path):
    check_stage2(stage2, "cached", "cached", tmp_path)


def test_stage2_full_run_predicts_with_the_whole_text_tower(stage2, tmp_path):
    check_stage2(stage2, "full", "full", tmp_path)


def test_stage2_crossfit_run_averages_its_fold_models(stage2, tmp_path):
    """K = 2: each fold head with its own text layers, probabilities averaged (not fold 0's alone)."""
    check_stage2(stage2, "crossfit", "cached", tmp_path)
    models = stage2["crossfit"][1]
    first = wt.in_memory(stage2, models[:1], "cached")[1]
    assert np.abs(first - wt.in_memory(stage2, models, "cached")[1]).max() > 10 * wt.ATOL
