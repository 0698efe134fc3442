"""`heads train --folds K`: K fold heads in one run directory, out-of-fold metrics, averaged predictions."""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from heads.config import TrainConfig
from heads.data.cache import load_cache
from heads.data.splits import split_labelled
from heads.infer import load_head, load_heads, softmax
from heads.predict import predict
from heads.train.crossfit import fold_configs, train_crossfit
from heads.train.metrics import compute_metrics
from heads.train.stage1 import train

FAST = dict(epochs=3, patience=0, hidden=32, plots=False)


def cfg(**flat) -> TrainConfig:
    return TrainConfig.from_flat(**{**FAST, **flat})


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def cache(make_synthetic_cache):
    return make_synthetic_cache(noise=3.0)


def test_folds_cover_every_labelled_row_once_and_match_fold_configs(cache, tmp_path):
    res = train_crossfit(cfg(fusion="concat", folds=3, seed=1), cache, str(tmp_path / "cv"))
    data = load_cache(cache)
    usable = np.flatnonzero((data.labels >= 0) & data.valid)
    assert res.oof_rows.tolist() == usable.tolist()
    for k, fold in enumerate(res.folds):  # fold k is split_labelled's fold k (fold_configs)
        same = split_labelled(data, fold_configs(cfg(folds=3), 3)[k].split, 1)
        assert fold.split.val.tolist() == same.val.tolist() and fold.split.train.tolist() == same.train.tolist()
        assert not set(fold.split.val) & set(fold.split.train)
    y = data.labels[res.oof_rows]
    m = json.load(open(tmp_path / "cv" / "metrics.json"))
    assert m["macro_f1"] == pytest.approx(compute_metrics(y, res.oof_logits.argmax(1), data.classes)["macro_f1"])
    per_fold = [f.metrics["macro_f1"] for f in res.folds]
    assert m["folds"]["macro_f1"]["per_fold"] == per_fold
    assert m["folds"]["macro_f1"]["mean"] == pytest.approx(np.mean(per_fold))
    assert m["counts"]["val"] == len(usable) and m["crossfit"] == 3


def test_one_run_directory_with_k_heads_and_averaged_predict(cache, tmp_path):
    run = str(tmp_path / "cv")
    res = train_crossfit(cfg(fusion="film", folds=3, tune_bias=True), cache, run)
    files = sorted(os.listdir(run))
    assert [f for f in files if f.endswith(".safetensors")] == [f"head.fold{k}.safetensors" for k in range(3)]
    assert json.load(open(os.path.join(run, "config.json")))["train"]["folds"] == 3
    assert os.path.exists(os.path.join(run, "bias.json"))
    m = json.load(open(os.path.join(run, "metrics.json")))
    assert "untuned" in m and m["macro_f1"] >= m["untuned"]["macro_f1"]  # tuned on these OOF logits
    models, _ = load_heads(run)
    assert len(models) == 3
    out = str(tmp_path / "pred.csv")
    r = predict(run, cache, out, split="test", device="cpu", proba=True)
    rows = read_csv(out)
    data = load_cache(cache)
    assert len(rows) == r.written and list(rows[0]) == ["guid", "tag", *[f"p_{c}" for c in data.classes]]
    test = data.rows("test")
    ok = test[data.valid[test]]
    want = np.mean([softmax(fold.model.eval()(data.batch(ok, "cpu", fold.model.inputs))["logits"].detach().numpy())
                    for fold in res.folds], axis=0)
    got = np.array([[float(row[f"p_{c}"]) for c in data.classes] for row in rows if row["p_positive"]])
    np.testing.assert_allclose(got, want, atol=2e-5)
    bias = json.load(open(os.path.join(run, "bias.json")))["offsets"]
    tags = [row["tag"] for row in rows if row["p_positive"]]
    assert tags == [data.classes[k] for k in (np.log(want) + bias).argmax(1)]
    with pytest.raises(Exception, match="cross-fit run with 3 fold heads"):
        load_head(run)


def test_reproducible_and_single_head_unchanged(cache, tmp_path):
    a = train_crossfit(cfg(fusion="concat", folds=2, seed=4), cache)
    b = train_crossfit(cfg(fusion="concat", folds=2, seed=4), cache)
    np.testing.assert_array_equal(a.oof_logits, b.oof_logits)
    single = train(cfg(fusion="concat", seed=4), cache, str(tmp_path / "one"))
    out = str(tmp_path / "p.csv")
    predict(single.run_dir, cache, out, split="test", device="cpu")
    assert list(read_csv(out)[0]) == ["guid", "tag"]  # without --proba the label-file format, unchanged


def test_fold_workers_train_every_fold_at_once_on_a_multicore_cpu(monkeypatch):
    from heads.train.crossfit import fold_workers
    for cores, threads, want in ((1, 0, 1), (2, 0, 5), (8, 0, 5), (2, 1, 1), (8, 2, 1)):
        monkeypatch.setattr("heads.parallel.cpu_threads", lambda: cores)
        assert fold_workers(cfg(folds=5, threads=threads)) == want, (cores, threads)
    assert fold_workers(cfg(folds=5, device="cuda")) == 1  # on a GPU the folds go one after another
    monkeypatch.setattr("heads.parallel.cpu_threads", lambda: 2)
    assert fold_workers(cfg(folds=5), streamed=True) == 2  # a streamed cache: one worker (block buffers) per core


def test_a_streamed_crossfit_trains_one_fold_per_core_with_the_in_memory_numbers(cache, tmp_path, monkeypatch):
    monkeypatch.setattr("heads.parallel.cpu_threads", lambda: 2)
    streamed = train_crossfit(cfg(fusion="film", folds=3, memory_budget="0"), cache, str(tmp_path / "s"))
    memory = train_crossfit(cfg(fusion="film", folds=3), cache, str(tmp_path / "m"))
    assert streamed.folds[0].metrics["data"]["streamed"] and not memory.folds[0].metrics["data"]["streamed"]
    assert streamed.metrics["timing"]["workers"] == 2 and memory.metrics["timing"]["workers"] == 3
    np.testing.assert_array_equal(streamed.oof_logits, memory.oof_logits)


@pytest.mark.parametrize("fusion", ["film", "cross-attn"])
def test_folds_side_by_side_give_the_numbers_of_threads_1(cache, tmp_path, monkeypatch, fusion):
    """threads=0 (the default) on the CPU trains the folds in forked workers, one thread each: the same heads,
    out-of-fold logits and held-out scores as the folds one after another with --threads 1."""
    monkeypatch.setattr("heads.parallel.cpu_threads", lambda: 2)  # two cores, also on a one-core machine
    side = train_crossfit(cfg(fusion=fusion, folds=3, test_ratio=0.1), cache, str(tmp_path / "side"))
    one = train_crossfit(cfg(fusion=fusion, folds=3, test_ratio=0.1, threads=1), cache, str(tmp_path / "one"))
    assert side.metrics["timing"]["workers"] == 3 and one.metrics["timing"]["workers"] == 1  # every fold at once
    assert side.metrics["timing"]["threads"] == 1
    from heads.report.console import _counts_line  # what `heads train` and `heads show` print of it
    assert "(folds, cache load, scoring) on cpu (3 folds at a time, 1 thread each)" in _counts_line(side.metrics)
    assert "on cpu (1 threads)" in _counts_line(one.metrics)
    np.testing.assert_array_equal(side.oof_logits, one.oof_logits)
    assert side.metrics["test"] == one.metrics["test"] and side.metrics["folds"] == one.metrics["folds"]
    for a, b in zip(side.folds, one.folds):
        assert [{**h, "seconds": 0} for h in a.history] == [{**h, "seconds": 0} for h in b.history]
        for k, v in a.model.state_dict().items():
            assert torch.equal(v, b.model.state_dict()[k]), k


def test_cli_train_folds_show_predict_and_finetune(cache, tmp_path):
    from cli import heads_app
    runner = CliRunner()
    run = str(tmp_path / "cv")
    r = runner.invoke(heads_app, ["train", "--cache", cache, "--fusion", "concat", "--epochs", "2", "--hidden", "16",
                                  "--folds", "2", "--no-plots", "--out", run])
    assert r.exit_code == 0, r.output
    assert "out-of-fold" in r.output and "per fold macro_f1" in r.output
    r = runner.invoke(heads_app, ["show", run])
    assert r.exit_code == 0 and "2-fold cross-fit" in r.output and "out-of-fold" in r.output
    preds = str(tmp_path / "p.csv")
    r = runner.invoke(heads_app, ["predict", "--run", run, "--cache", cache, "--out", preds, "--proba"])
    assert r.exit_code == 0, r.output
    assert open(preds).readline().strip() == "guid,tag,p_negative,p_neutral,p_positive"
    ft = str(tmp_path / "ft")  # stage 2 fold by fold (text layers: tests/test_finetune.py)
    r = runner.invoke(heads_app, ["finetune", "--cache", cache, "--unfreeze-text", "0", "--init", run, "--epochs", "1",
                                  "--no-plots", "--out", ft])
    assert r.exit_code == 0, r.output
    assert "2-fold cross-fit" in r.output and json.load(open(os.path.join(ft, "config.json")))["stage"] == "finetune"
    assert sorted(f for f in os.listdir(ft) if f.startswith("head.")) == ["head.fold0.safetensors",
                                                                          "head.fold1.safetensors"]
    r = runner.invoke(heads_app, ["show", ft])
    assert r.exit_code == 0 and "2-fold cross-fit" in r.output and "out-of-fold" in r.output
    r = runner.invoke(heads_app, ["predict", "--run", ft, "--cache", cache, "--out", preds])
    assert r.exit_code == 0, r.output
    r = runner.invoke(heads_app, ["train", "--cache", cache, "--folds", "1", "--out", run])
    assert r.exit_code == 2 and "--folds must be 0" in r.output


def test_ensemble_of_crossfit_runs_validates_and_predicts_the_weighted_average(cache, tmp_path):
    from heads.ensemble import build_ensemble
    a = train_crossfit(cfg(fusion="concat", folds=2, seed=2), cache, str(tmp_path / "a"))
    b = train_crossfit(cfg(fusion="film", folds=2, seed=2), cache, str(tmp_path / "b"))
    ens = str(tmp_path / "ens")
    m = build_ensemble([a.run_dir, b.run_dir], ens, weighting="val")
    w = np.array([a.metrics["macro_f1"], b.metrics["macro_f1"]])
    w = w / w.sum()
    assert m["validated"] and [x["weight"] for x in m["members"]] == pytest.approx(w.tolist())
    data = load_cache(cache)
    oof = w[0] * softmax(a.oof_logits) + w[1] * softmax(b.oof_logits)  # same seed and K: the same rows
    y = data.labels[a.oof_rows]
    assert m["macro_f1"] == pytest.approx(compute_metrics(y, oof.argmax(1), data.classes)["macro_f1"], abs=1e-6)
    out = str(tmp_path / "p.csv")
    predict(ens, cache, out, split="test", device="cpu", proba=True)
    rows = [r for r in read_csv(out) if r["p_positive"]]
    test = data.rows("test")
    ok = test[data.valid[test]]

    def member(res):
        return np.mean([softmax(f.model.eval()(data.batch(ok, "cpu", f.model.inputs))["logits"].detach().numpy())
                        for f in res.folds], axis=0)
    want = w[0] * member(a) + w[1] * member(b)
    np.testing.assert_allclose([[float(r[f"p_{c}"]) for c in data.classes] for r in rows], want, atol=2e-5)
    assert [r["tag"] for r in rows] == [data.classes[k] for k in want.argmax(1)]


def test_ensemble_cli_refuses_other_classes_and_says_when_unvalidated(cache, make_synthetic_cache, tmp_path):
    from cli import heads_app
    runner = CliRunner()
    s0 = train(cfg(fusion="concat", seed=0), cache, str(tmp_path / "s0")).run_dir
    s1 = train(cfg(fusion="concat", seed=1), cache, str(tmp_path / "s1")).run_dir
    r = runner.invoke(heads_app, ["ensemble", s0, s1, "--out", str(tmp_path / "e")])
    assert r.exit_code == 0, r.output
    assert "no validation score" in r.output  # seeds 0 and 1 validated on different rows
    r = runner.invoke(heads_app, ["show", str(tmp_path / "e")])
    out = " ".join(r.output.split())
    assert r.exit_code == 0 and "weight 0.500" in out and "2 members" in out and "no metrics of its own" in out
    assert "None" not in out and "accuracy" not in out, out  # no table and no training line of its own
    r = runner.invoke(heads_app, ["predict", "--run", str(tmp_path / "e"), "--cache", cache, "--out",
                                  str(tmp_path / "p.csv")])
    assert r.exit_code == 0, r.output
    other = make_synthetic_cache("cls.h5", classes=["a", "b", "c"])  # other class names
    o = train(cfg(fusion="concat", seed=0), other, str(tmp_path / "o")).run_dir
    r = runner.invoke(heads_app, ["ensemble", s0, o, "--out", str(tmp_path / "e2")])
    assert r.exit_code == 2 and "an ensemble combines runs of one set of classes" in r.output
    r = runner.invoke(heads_app, ["ensemble", s0, "--out", str(tmp_path / "e3")])
    assert r.exit_code == 2 and "at least two runs" in r.output


def test_ensemble_of_two_backbones_predicts_with_one_cache_per_backbone(cache, make_synthetic_cache, tmp_path):
    """Runs of caches of other features (another text backbone) on the same rows: validated out of fold on the
    shared rows, predicted with one cache per member group, matched by signature whatever the order."""
    from cli import heads_app
    from heads.ensemble import build_ensemble, member_groups
    runner = CliRunner()
    other = make_synthetic_cache("other.h5", preprocessing={"clean_text": True}, Dt=24, Dtp=24, noise=3.0)
    a = train_crossfit(cfg(fusion="concat", folds=2, seed=2), cache, str(tmp_path / "a"))
    b = train_crossfit(cfg(fusion="film", folds=2, seed=2), other, str(tmp_path / "b"))
    m = build_ensemble([a.run_dir, b.run_dir], str(tmp_path / "ab"))
    oof = (softmax(a.oof_logits) + softmax(b.oof_logits)) / 2  # same seed, K and labels: the same fold rows
    y = load_cache(cache).labels[a.oof_rows]
    assert m["validated"] and m["out_of_fold"] and np.array_equal(a.oof_rows, b.oof_rows)
    r = runner.invoke(heads_app, ["show", str(tmp_path / "ab")])
    assert r.exit_code == 0 and "out-of-fold metrics of the averaged probabilities" in " ".join(r.output.split())
    assert "out of fold" in r.output and f"{m['accuracy']:.4f}" in r.output
    assert m["macro_f1"] == pytest.approx(compute_metrics(y, oof.argmax(1), ["negative", "neutral", "positive"])
                                          ["macro_f1"], abs=1e-6)

    c = train(cfg(fusion="gmu", seed=2), cache, str(tmp_path / "c")).run_dir  # a second member of the first cache
    ens = str(tmp_path / "abc")
    build_ensemble([a.run_dir, b.run_dir, c], ens)
    assert [members for _, members in member_groups(ens)] == [[0, 2], [1]]
    alone = [predict(r, x, str(tmp_path / f"{k}.csv"), proba=True, device="cpu").out
             for k, (r, x) in enumerate([(a.run_dir, cache), (b.run_dir, other), (c, cache)])]
    r = runner.invoke(heads_app, ["predict", "--run", ens, "--cache", f"{other},{cache}", "--out",
                                  str(tmp_path / "p.csv"), "--proba"])
    assert r.exit_code == 0, r.output
    got = read_csv(str(tmp_path / "p.csv"))
    parts = [read_csv(p) for p in alone]
    assert [g["guid"] for g in got] == [g["guid"] for g in parts[0]]
    ok = [k for k, g in enumerate(got) if g["p_positive"]]
    bad = sorted(set(range(len(got))) - set(ok))
    assert len(bad) == 1  # the synthetic test split's one invalid row: written with the fallback tag
    assert [got[k]["tag"] for k in bad] == [parts[0][k]["tag"] for k in bad]
    cols = ["p_negative", "p_neutral", "p_positive"]
    want = np.mean([[[float(p[k][col]) for col in cols] for k in ok] for p in parts], axis=0)
    np.testing.assert_allclose([[float(got[k][col]) for col in cols] for k in ok], want, atol=2e-6)

    def refused(caches: str) -> str:
        r = runner.invoke(heads_app, ["predict", "--run", ens, "--cache", caches, "--out", str(tmp_path / "x.csv")])
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
        return " ".join(r.output.split())

    out = refused(cache)  # one backbone's cache only: which one is missing, and how to give both
    assert "none of the caches given has the features of the members trained on" in out and "--cache a.h5,b.h5" in out
    third = make_synthetic_cache("third.h5", preprocessing={"lowercase": True})
    assert "has the features of none of the members" in refused(f"{cache},{other},{third}")
    fewer = make_synthetic_cache("fewer.h5", preprocessing={"clean_text": True}, Dt=24, Dtp=24, noise=3.0, n_test=39)
    assert "hold other rows in split 'test'" in refused(f"{cache},{fewer}")
    assert not os.path.exists(tmp_path / "x.csv")


def test_an_ensemble_and_its_members_move_together(cache, tmp_path):
    """Members are stored relative to the ensemble's parent directory: runs/ moves or is copied whole; an ensemble
    written with absolute member paths (older versions) still loads."""
    import shutil
    from heads.ensemble import build_ensemble, members
    runs = tmp_path / "here" / "runs"
    a = train(cfg(fusion="concat", seed=0), cache, str(runs / "parts" / "a")).run_dir
    b = train(cfg(fusion="gmu", seed=0), cache, str(runs / "parts" / "b")).run_dir
    build_ensemble([a, b], str(runs / "ens"))
    spec = json.load(open(runs / "ens" / "config.json"))["ensemble"]
    assert spec["members"] == [os.path.join("parts", "a"), os.path.join("parts", "b")]
    before = predict(str(runs / "ens"), cache, str(tmp_path / "before.csv"), device="cpu", proba=True).out
    moved = tmp_path / "elsewhere" / "runs"
    shutil.move(str(runs), str(moved))
    assert members(str(moved / "ens")) == [str(moved / "parts" / "a"), str(moved / "parts" / "b")]
    after = predict(str(moved / "ens"), cache, str(tmp_path / "after.csv"), device="cpu", proba=True).out
    assert read_csv(before) == read_csv(after)
    spec["members"] = [str(moved / "parts" / "a"), str(moved / "parts" / "b")]  # as older versions wrote them
    cfg_path = moved / "ens" / "config.json"
    cfg_path.write_text(json.dumps({**json.load(open(cfg_path)), "ensemble": spec}))
    assert read_csv(predict(str(moved / "ens"), cache, str(tmp_path / "abs.csv"), device="cpu").out) == \
        [{"guid": r["guid"], "tag": r["tag"]} for r in read_csv(before)]
