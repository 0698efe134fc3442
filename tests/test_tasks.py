"""Datasets other than MVSA on the heads side (issue 14): splits the data ships (validate on dev, score the other
labelled splits once), published split files, two-class tasks with ROC-AUC (and `--metric auroc`), and any number
of classes through train, predict, ablate and report. MVSA-style caches (labels in `train` only) split as before."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import build_synthetic_cache
from heads.data.cache import DataError, load_cache
from heads.data.split_file import SplitFileError
from heads.data.splits import SplitConfig, split_labelled, stratified_holdout
from heads.train.metrics import compute_metrics, roc_auc

BINARY = ["not-hateful", "hateful"]
# Hateful-Memes-like: labelled train/dev/test, plus an unlabelled test split (predict only)
LAYOUT = [("train", 160, True), ("dev", 40, True), ("test", 40, True), ("test_unseen", 20, False)]
FAST = ["--epochs", "3", "--hidden", "16", "--patience", "0", "--no-plots"]


def invoke(*args):
    from cli import heads_app
    return CliRunner().invoke(heads_app, [str(a) for a in args])


def load(path) -> dict:
    with open(path) as f:
        return json.load(f)


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def binary(tmp_path_factory):
    return build_synthetic_cache(str(tmp_path_factory.mktemp("bin") / "hm.h5"), noise=3.0, classes=BINARY,
                                 splits=LAYOUT, n_invalid=4)


def rows_of(data, split: str) -> np.ndarray:
    return np.flatnonzero((data.splits == split) & data.valid & (data.labels >= 0))


# ------------------------------------------------------------------------------------------ ROC-AUC
def test_roc_auc_equals_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(2, 60))
        y = rng.integers(0, 2, n)
        if y.min() == y.max():
            y[0] = 1 - y[0]
        score = np.round(rng.normal(size=n), int(rng.integers(0, 3)))  # few decimals: many ties
        assert roc_auc(y, score) == pytest.approx(roc_auc_score(y, score), abs=1e-12), trial
    assert roc_auc([1, 1, 1], [0.1, 0.2, 0.3]) is None  # one class: undefined (sklearn raises)
    assert roc_auc([0, 1], [0.5, 0.5]) == 0.5 and roc_auc([0, 1], [0.1, 0.9]) == 1.0
    logits = rng.normal(size=(50, 2))
    y = rng.integers(0, 2, 50)
    m = compute_metrics(y, logits.argmax(1), BINARY, logits)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, probs[:, 1]), abs=1e-12)
    assert "roc_auc" not in compute_metrics(y, logits.argmax(1), ["a", "b", "c"], np.c_[logits, logits[:, :1]])


# ------------------------------------------------------------------------------------------ splits
def test_validates_on_the_shipped_dev_split_and_holds_out_the_rest(binary):
    data = load_cache(binary)
    s = split_labelled(data, SplitConfig(), seed=0)
    assert np.array_equal(s.train, rows_of(data, "train")) and np.array_equal(s.val, rows_of(data, "dev"))
    assert list(s.heldout) == ["test"] and np.array_equal(s.heldout["test"], rows_of(data, "test"))
    assert s.counts["val_split"] == "dev" and s.counts["heldout"] == {"test": 40}
    assert s.record(data)["validation"] == "dev"
    # the same rows for any seed: the data's own split is used as published
    assert np.array_equal(split_labelled(data, SplitConfig(), seed=5).val, s.val)
    # none: today's stratified carve, from the train rows only; test stays held out
    carved = split_labelled(data, SplitConfig(val_split="none"), seed=0)
    assert set(carved.train) | set(carved.val) == set(rows_of(data, "train"))
    assert np.array_equal(carved.heldout["test"], s.heldout["test"]) and carved.record(data)["validation"] == "carved"
    # a named split; folds with a named split and unknown names are errors naming the splits there are
    assert np.array_equal(split_labelled(data, SplitConfig(val_split="test"), seed=0).heldout["dev"], s.val)
    with pytest.raises(DataError, match=r"splits with labels: dev \(40\), test \(40\), train \(156\)"):
        split_labelled(data, SplitConfig(val_split="validation"), seed=0)
    with pytest.raises(DataError, match="cannot be combined"):
        SplitConfig(val_split="dev", folds=3).validate()


def test_mvsa_style_caches_split_exactly_as_before(make_synthetic_cache):
    """Labels only in `train` (MVSA): auto is today's stratified split (sklearn's draws), nothing held out."""
    data = load_cache(make_synthetic_cache())
    for seed in (0, 3):
        s = split_labelled(data, SplitConfig(), seed)
        usable = np.flatnonzero((data.labels >= 0) & data.valid)
        rest, held = stratified_holdout(usable, data.labels[usable], int(round(0.2 * usable.size)), seed)
        assert np.array_equal(s.train, np.sort(rest)) and np.array_equal(s.val, np.sort(held))
        assert not s.heldout and "val_split" not in s.counts and "heldout" not in s.counts
        assert np.array_equal(split_labelled(data, SplitConfig(val_split="none"), seed).val, s.val)
    # labelled train + labelled test, no dev: the carve uses the train rows and test is held out
    other = load_cache(make_synthetic_cache("tt.h5", splits=[("train", 120, True), ("test", 30, True)]))
    s = split_labelled(other, SplitConfig(), 0)
    assert set(s.train) | set(s.val) == set(rows_of(other, "train")) and s.counts["heldout"] == {"test": 30}


# ------------------------------------------------------------------------------------------ binary end to end
def test_binary_task_end_to_end(binary, tmp_path):
    run = tmp_path / "run"
    r = invoke("train", "--cache", binary, "--fusion", "concat", "--metric", "auroc", "--out", run, *FAST)
    assert r.exit_code == 0, r.output
    assert "roc_auc" in r.output and "test (held out)" in r.output and "val 40 (split dev)" in r.output
    m = load(run / "metrics.json")
    data = load_cache(binary)
    assert m["classes"] == BINARY and m["metric"] == "auroc" and 0.5 < m["roc_auc"] <= 1.0
    assert m["counts"]["val"] == 40 and m["counts"]["val_split"] == "dev" and m["counts"]["heldout"] == {"test": 40}
    assert list(m["heldout"]) == ["test"] and m["heldout"]["test"]["per_class"]["hateful"]["support"] == \
        int((data.labels[rows_of(data, "test")] == 1).sum())
    assert "roc_auc" in m["heldout"]["test"] and "test" not in m  # no --test-ratio: no internal test
    history = load(run / "history.json")  # selection on auroc: the best epoch has the best validation auroc
    assert m["best_epoch"] == 1 + int(np.argmax([h["auroc"] for h in history]))
    # roc_auc is the ROC of the recorded validation probabilities of class 1
    from sklearn.metrics import roc_auc_score
    preds = read_csv(run / "val_predictions.csv")
    y = [BINARY.index(p["label"]) for p in preds]
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, [float(p["p_hateful"]) for p in preds]), abs=1e-5)
    split = load(run / "split.json")
    assert split["validation"] == "dev" and split["heldout"]["test"] == [data.guids[i] for i in rows_of(data, "test")]
    out = tmp_path / "preds.csv"
    r = invoke("predict", "--run", run, "--cache", binary, "--split", "test_unseen", "--out", out)
    assert r.exit_code == 0, r.output
    lines = open(out).read().splitlines()
    assert lines[0] == "guid,tag" and len(lines) == 21 and {ln.split(",")[1] for ln in lines[1:]} <= set(BINARY)
    # stage 2 from this run (head only) reuses its split, held-out rows included
    ft = tmp_path / "ft"
    r = invoke("finetune", "--cache", binary, "--unfreeze-text", "0", "--init", run, "--epochs", "1",
               "--metric", "auroc", "--no-plots", "--out", ft)
    assert r.exit_code == 0, r.output
    assert load(ft / "split.json")["heldout"] == split["heldout"] and "test" in load(ft / "metrics.json")["heldout"]
    r = invoke("finetune", "--cache", binary, "--unfreeze-text", "0", "--init", run, "--split-file", out,
               "--out", tmp_path / "ft2")
    assert r.exit_code == 2 and "brings its own split" in r.output


def test_auroc_needs_two_classes(make_synthetic_cache, tmp_path):
    r = invoke("train", "--cache", make_synthetic_cache(), "--metric", "auroc", "--out", tmp_path / "r", *FAST)
    assert r.exit_code == 2 and "needs a two-class task" in r.output and "3 classes" in r.output


def test_binary_train_imports_no_sklearn(binary, tmp_path):
    code = ("import sys; from cli import heads_app\n"
            "try:\n    heads_app(['train', '--cache', sys.argv[1], '--out', sys.argv[2], '--epochs', '2', "
            "'--metric', 'auroc'])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print(sorted(m for m in ('sklearn', 'scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, binary, str(tmp_path / "run")], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "roc_auc" in load(tmp_path / "run" / "metrics.json") and (tmp_path / "run" / "curves.png").exists()
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


# ------------------------------------------------------------------------------------------ split files
def test_split_file_lines_and_folder(binary, tmp_path):
    data = load_cache(binary)
    g = data.guids
    lines = tmp_path / "split.csv"  # train: rows 0-119, dev: 120-159 (of the cache's train), test: cache dev;
    # plus two ids the cache does not have; the rest of the labelled rows is in no list
    body = [f"{g[i]},train" for i in range(120)] + [f"{g[i]},dev" for i in range(120, 160)] + \
        [f"{g[i]},test" for i in range(160, 200)] + ["nope-1,test", "nope-2,train"]
    lines.write_text("id,split\n" + "\n".join(body) + "\n")
    run = tmp_path / "run"
    r = invoke("train", "--cache", binary, "--split-file", lines, "--out", run, *FAST)
    assert r.exit_code == 0, r.output
    assert "2 (e.g. nope-1, nope-2) of its ids are not in the cache" in r.output.replace("\n", " ")
    assert "40 (e.g. 1200, 1201" in r.output  # the cache's test rows: labelled, listed nowhere
    split = load(run / "split.json")
    record = split["split_file"]
    import hashlib
    assert record["sha256"] == hashlib.sha256(lines.read_bytes()).hexdigest() and record["name"] == "split.csv"
    assert record["not_in_cache"] == 2 and record["labelled_not_listed"] == 40
    valid = set(np.flatnonzero(data.valid).tolist())
    assert split["val"] == [g[i] for i in range(120, 160) if i in valid]
    assert split["heldout"]["test"] == [g[i] for i in range(160, 200) if i in valid]
    assert split["train"] == [g[i] for i in range(120) if i in valid]

    folder = tmp_path / "lists"  # the same split as id lists (val.txt: another name for the validation list)
    folder.mkdir()
    (folder / "train.txt").write_text("\n".join(g[i] for i in range(120)) + "\n")
    (folder / "val.txt").write_text("\n".join(g[i] for i in range(120, 160)) + "\n")
    (folder / "test.txt").write_text("\n".join(g[i] for i in range(160, 200)) + "\n")
    s = split_labelled(data, SplitConfig(split_file=str(folder)), seed=0)
    assert [g[i] for i in s.val] == split["val"] and [g[i] for i in s.heldout["test"]] == split["heldout"]["test"]
    assert s.record(data)["validation"] == "val" and len(s.source["split_file"]["sha256"]) == 64

    (tmp_path / "other.csv").write_text("a,train\nb,test\n")
    r = invoke("train", "--cache", binary, "--split-file", tmp_path / "other.csv", "--out", tmp_path / "x", *FAST)
    assert r.exit_code == 2 and "none of its 2 ids is a sample" in r.output
    (tmp_path / "twice.csv").write_text(f"{g[0]},train\n{g[0]},test\n")
    with pytest.raises(SplitFileError, match="line 2: id 1000 is in split 'train' and in 'test'"):
        split_labelled(data, SplitConfig(split_file=str(tmp_path / "twice.csv")), seed=0)
    (tmp_path / "bad.csv").write_text(f"{g[0]},train,extra\n")
    with pytest.raises(SplitFileError, match="line 1: expected `id,split`"):
        split_labelled(data, SplitConfig(split_file=str(tmp_path / "bad.csv")), seed=0)


# ------------------------------------------------------------------------------------------ reports
def test_binary_ablation_and_report_with_auroc(binary, tmp_path):
    out = tmp_path / "abl"
    r = invoke("ablate", "--cache", binary, "--out", out, "--fusion", "concat,gmu", "--modality", "both",
               "--seeds", "0,1", "--metric", "auroc", "--probe", "--no-progress", "--set", "epochs=2",
               "--set", "hidden=16")
    assert r.exit_code == 0, r.output
    rows = read_csv(out / "summary.csv")
    assert "neutral_f1_mean" not in rows[0] and all(row["roc_auc_mean"] for row in rows)
    assert all(row["heldout_test_macro_f1_mean"] for row in rows) and len(rows) == 3  # concat, gmu, probe
    runs = [load(out / "runs" / d / "metrics.json") for d in sorted(os.listdir(out / "runs"))]
    concat = [m for m in runs if m["fusion"] == "concat"]
    row = next(row for row in rows if row["config"] == "fusion=concat")
    assert float(row["roc_auc_mean"]) == pytest.approx(np.mean([m["roc_auc"] for m in concat]), abs=1e-12)
    assert float(row["heldout_test_roc_auc_mean"]) == pytest.approx(
        np.mean([m["heldout"]["test"]["roc_auc"] for m in concat]), abs=1e-12)
    assert "test split macro-F1" in open(out / "summary.md").read()
    page = open(out / "summary.html", encoding="utf-8").read()  # ranked by what the runs selected on
    assert "Mean ROC-AUC per configuration" in page and "Validation auroc per epoch" in page
    r = invoke("report", out, "--metric", "auroc", "--top", "3", "--out", tmp_path / "rep")
    assert r.exit_code == 0, r.output
    assert "ROC-AUC" in open(tmp_path / "rep" / "top3.md").read()
    r = invoke("report", out, "--metric", "neutral_f1", "--out", tmp_path / "rep2")
    assert r.exit_code == 2 and "neutral_f1 a class named neutral" in r.output


def test_five_classes_train_and_report(tmp_path):
    classes = ["anger", "joy", "fear", "sadness", "surprise"]
    cache = build_synthetic_cache(str(tmp_path / "five.h5"), n_train=300, noise=2.0, classes=classes)
    for fusion in ("concat", "gmu"):  # gmu: the gate plot with five classes
        r = invoke("train", "--cache", cache, "--fusion", fusion, "--epochs", "2", "--hidden", "16",
                   "--test-ratio", "0.2", "--out", tmp_path / "runs" / fusion)
        assert r.exit_code == 0, r.output
        assert "F1 surprise" in r.output and "roc_auc" not in r.output
    assert (tmp_path / "runs" / "gmu" / "gate.png").exists()
    m = load(tmp_path / "runs" / "gmu" / "metrics.json")
    assert list(m["per_class"]) == classes and np.array(m["confusion_matrix"]).shape == (5, 5)
    # a run without --test-ratio reported together with runs with it (used to fail: test_accuracy_mean)
    r = invoke("train", "--cache", cache, "--fusion", "film", "--epochs", "2", "--hidden", "16", "--no-plots",
               "--out", tmp_path / "runs" / "film")
    assert r.exit_code == 0, r.output
    r = invoke("report", tmp_path / "runs", "--out", tmp_path / "rep")
    assert r.exit_code == 0, r.output
    rows = {row["config"]: row for row in read_csv(tmp_path / "rep" / "summary.csv")}
    assert "neutral_f1_mean" not in next(iter(rows.values()))
    film = next(row for c, row in rows.items() if "film" in c)
    gmu = next(row for c, row in rows.items() if "gmu" in c)
    assert film["test_macro_f1_mean"] == "" and float(gmu["test_macro_f1_mean"]) == m["test"]["macro_f1"]
    html = open(tmp_path / "rep" / "summary.html", encoding="utf-8").read()
    assert all(f"<th>F1 {c}</th>" in html for c in classes)
    assert "| - |" in open(tmp_path / "rep" / "summary.md").read()  # film's missing test cells


def test_split_file_in_ablate_and_finetune(binary, tmp_path):
    g = load_cache(binary).guids
    lines = tmp_path / "split.txt"  # tab-separated, no header; the cache's test rows are listed nowhere
    lines.write_text("".join(f"{g[i]}\t{'train' if i < 120 else 'dev'}\n" for i in range(160)) + "zzz\ttest\n")
    out = tmp_path / "abl"
    r = invoke("ablate", "--cache", binary, "--out", out, "--fusion", "concat", "--seeds", "0", "--split-file",
               lines, "--no-progress", "--set", "epochs=2", "--set", "hidden=16")
    assert r.exit_code == 0, r.output
    assert "1 (e.g. zzz) of its ids are not in the cache" in r.output
    (run,) = os.listdir(out / "runs")
    split = load(out / "runs" / run / "split.json")
    assert split["validation"] == "dev" and split["split_file"]["labelled_not_listed"] == 80
    assert "heldout" not in split and split["val"] == [g[i] for i in range(120, 156)]  # 156-159: invalid
    ft = tmp_path / "ft"
    r = invoke("finetune", "--cache", binary, "--unfreeze-text", "0", "--fusion", "concat", "--epochs", "1",
               "--split-file", lines, "--val-split", "none", "--no-plots", "--out", ft)
    assert r.exit_code == 0, r.output
    split = load(ft / "split.json")
    assert split["validation"] == "carved" and split["heldout"]["dev"] == [g[i] for i in range(120, 156)]
    assert sorted(split["train"] + split["val"]) == sorted(g[:120])


def test_ablation_of_an_older_version_resumes(make_synthetic_cache, tmp_path):
    """Runs written before --val-split/--split-file existed lack those fields: with their defaults they are the
    same runs (skipped on resume), with another value they are not."""
    cache, out = make_synthetic_cache(n_train=120), tmp_path / "abl"
    args = ["ablate", "--cache", cache, "--out", out, "--fusion", "concat", "--modality", "both", "--seeds", "0",
            "--probe", "--no-progress", "--set", "epochs=1", "--set", "hidden=8"]
    assert invoke(*args).exit_code == 0
    for name in os.listdir(out / "runs"):
        path = out / "runs" / name / "config.json"
        config = load(path)
        section = config["train"] if "train" in config else config["probe"]
        for key in ("val_split", "split_file"):
            del section[key]
        path.write_text(json.dumps(config))
    r = invoke(*args)
    assert r.exit_code == 0 and "0 run(s) trained, 2 already finished" in r.output, r.output
    r = invoke(*args[:-4], "--val-split", "none", *args[-4:])
    assert r.exit_code == 0 and "2 run(s) trained, 0 already finished" in r.output, r.output
