"""`heads` options end to end through typer's CliRunner, each checked in what the command wrote or printed (not
only its exit code): training options recorded in config.json and acting on the run (validation rows, epochs),
the metrics printed equal to metrics.json's, ensemble weighting, ablation axes and baselines, and the user
mistakes of each command (exit 2, one paragraph naming what to do, no traceback). Issue 20; the guard that
every option is used somewhere is tests/test_cli_coverage.py."""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import build_synthetic_cache
from heads.data.cache import load_cache

LAYOUT = [("train", 150, True), ("dev", 40, True), ("test", 20, False)]
QUICK = ["--epochs", "2", "--hidden", "16", "--no-plots"]


def heads(*args):
    from cli import heads_app
    return CliRunner().invoke(heads_app, [str(a) for a in args])


def load(path) -> dict:
    with open(path) as f:
        return json.load(f)


def flat(output: str) -> str:
    return " ".join(output.split())


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Labelled train and dev splits (dev: what --val-split auto / dev picks), an unlabelled test split."""
    return build_synthetic_cache(str(tmp_path_factory.mktemp("cli") / "c.h5"), splits=LAYOUT, n_invalid=4,
                                 noise=3.0)


@pytest.fixture(scope="module")
def runs(cache, tmp_path_factory):
    """Two single runs trained through the CLI with every training option set away from its default."""
    root = tmp_path_factory.mktemp("runs")
    a, b = str(root / "a"), str(root / "b")
    ra = heads("train", "--cache", cache, "--modality", "text", "--loss", "weighted_ce", "--label-smoothing", "0.1",
               "--batch-size", "32", "--lr", "3e-3", "--patience", "1", "--val-split", "none", "--val-ratio", "0.3",
               "--precision", "fp32", "--seed", "2", "--out", a, "--epochs", "6", "--hidden", "16", "--no-plots")
    rb = heads("train", "--cache", cache, "--rdrop", "0.5", "--modality-dropout", "0.3", "--loss", "focal",
               "--val-split", "dev", "--no-image-aug-views", "--fusion", "concat", "--out", b, *QUICK)
    return {"a": (a, ra), "b": (b, rb)}


def test_train_options_are_recorded_and_act(runs, cache):
    (a, ra), (b, rb) = runs["a"], runs["b"]
    assert ra.exit_code == 0 and rb.exit_code == 0, ra.output + rb.output
    ca, cb = load(os.path.join(a, "config.json"))["train"], load(os.path.join(b, "config.json"))["train"]
    assert {k: ca[k] for k in ("modality", "loss", "label_smoothing", "batch_size", "lr", "patience", "val_split",
                               "val_ratio", "precision", "seed", "epochs", "hidden")} == \
        {"modality": "text", "loss": "weighted_ce", "label_smoothing": 0.1, "batch_size": 32, "lr": 3e-3,
         "patience": 1, "val_split": "none", "val_ratio": 0.3, "precision": "fp32", "seed": 2, "epochs": 6,
         "hidden": 16}
    assert {k: cb[k] for k in ("rdrop", "modality_dropout", "loss", "val_split", "image_aug_views", "fusion")} == \
        {"rdrop": 0.5, "modality_dropout": 0.3, "loss": "focal", "val_split": "dev", "image_aug_views": False,
         "fusion": "concat"}
    data = load_cache(cache)
    train = [data.guids[r] for r in data.rows("train") if data.valid[r]]
    dev = [data.guids[r] for r in data.rows("dev")]
    sa, sb = load(os.path.join(a, "split.json")), load(os.path.join(b, "split.json"))
    assert sorted(sb["val"]) == sorted(dev)  # --val-split dev: the data's own dev rows validate
    assert len(sa["val"]) == round(0.3 * len(train)) and set(sa["val"]) <= set(train)  # none: a 30% carve of train
    ma = load(os.path.join(a, "metrics.json"))
    assert "dev" in ma["heldout"]  # ... and dev is scored once at the end
    assert ma["epochs_run"] <= ma["best_epoch"] + 1 + 1  # --patience 1: one epoch without improvement at most
    for key in ("accuracy", "macro_f1", "weighted_f1"):  # the table printed is metrics.json's
        line = next(ln for ln in ra.output.splitlines() if f" {key} " in ln)
        assert f"{ma[key]:.4f}" in line, line
    assert "text · best epoch" in ra.output


def test_ensemble_weighting_val_weights_members_by_their_macro_f1(runs, cache, tmp_path):
    (a, _), (b, _) = runs["a"], runs["b"]
    out = tmp_path / "ens"
    r = heads("ensemble", a, b, "--weighting", "val", "--out", out)
    assert r.exit_code == 0, r.output
    m = load(out / "metrics.json")
    f1 = [load(os.path.join(d, "metrics.json"))["macro_f1"] for d in (a, b)]
    assert [w["weight"] for w in m["members"]] == pytest.approx([f / sum(f1) for f in f1])
    assert "the runs validated on different rows" in flat(r.output) and f"ensemble run directory: {out}" in flat(r.output)
    r = heads("show", out)
    assert r.exit_code == 0 and f"weight {m['members'][0]['weight']:.3f}" in r.output


def test_ablate_grid_file_folds_baseline_and_val_split(cache, tmp_path):
    out = tmp_path / "abl"
    grid = tmp_path / "grid.toml"
    grid.write_text('fusion = ["concat"]\nloss = ["ce", "focal"]\nepochs = [2]\nhidden = [16]\n')
    r = heads("ablate", "--cache", cache, "--out", out, "--grid", grid, "--seeds", "0", "--folds", "2",
              "--val-split", "none", "--baseline", "loss=ce", "--no-progress")
    assert r.exit_code == 0, r.output
    runs = sorted(os.listdir(out / "runs"))
    assert len(runs) == 2 and all("loss=" in n for n in runs)
    for name in runs:
        cfg = load(out / "runs" / name / "config.json")["train"]
        assert cfg["folds"] == 2 and cfg["val_split"] == "none" and f"loss={cfg['loss']}" in name
        assert load(out / "runs" / name / "metrics.json")["crossfit"] == 2
    with open(out / "paired.csv", newline="") as f:
        paired = list(csv.DictReader(f))
    assert [(p["config"], p["baseline"]) for p in paired] == [("loss=focal", "loss=ce")]  # one-value axes stay out of the label
    assert "2 run(s) trained, 0 already finished" in flat(r.output)


def test_ablate_loss_axis_option(cache, tmp_path):
    out = tmp_path / "abl"
    r = heads("ablate", "--cache", cache, "--out", out, "--fusion", "concat", "--loss", "ce,weighted_ce",
              "--seeds", "1", "--set", "epochs=1", "--set", "hidden=16", "--no-progress")
    assert r.exit_code == 0, r.output
    losses = sorted(load(out / "runs" / n / "config.json")["train"]["loss"] for n in os.listdir(out / "runs"))
    assert losses == ["ce", "weighted_ce"]
    rows = {row["config"]: row for row in csv.DictReader(open(out / "summary.csv", newline=""))}
    assert set(rows) == {"loss=ce", "loss=weighted_ce"}


# --------------------------------------------------------------------------------------------- user mistakes
MISTAKES = [  # (args, words of the message); "{cache}" / "{run}" / "{tmp}" are filled in
    (["predict", "--run", "{run}", "--out", "{tmp}/p.csv"], "give exactly one of --cache"),
    (["predict", "--run", "{run}", "--cache", "{cache}", "--data", "{tmp}", "--out", "{tmp}/p.csv"],
     "give exactly one of --cache"),
    (["predict", "--run", "{run}", "--cache", "{cache}", "--split", "nope", "--out", "{tmp}/p.csv"],
     "has no samples in split 'nope' (splits present: dev, test, train)"),
    (["predict", "--run", "{tmp}", "--cache", "{cache}", "--out", "{tmp}/p.csv"], "not a heads run directory"),
    (["train", "--cache", "{cache}", "--folds", "1"], "--folds must be 0 (one head) or at least 2"),
    (["train", "--cache", "{tmp}/missing.h5", "--out", "{tmp}/r"], "missing.h5"),
    (["train", "--cache", "{cache}", "--loss", "mse", "--out", "{tmp}/r"], "valid: ce, weighted_ce, focal"),
    (["train", "--cache", "{cache}", "--precision", "fp8", "--out", "{tmp}/r"], "unknown precision 'fp8'"),
    (["train", "--cache", "{cache}", "--val-split", "test", "--out", "{tmp}/r"], "--val-split test"),
    (["finetune", "--cache", "{cache}", "--unfreeze-text", "0", "--text-forward", "sideways", "--out", "{tmp}/f"],
     "sideways"),
    (["ensemble", "{run}", "{tmp}", "--out", "{tmp}/e"], "not a heads run directory"),
    (["ensemble", "{run}", "{run}", "--weighting", "best", "--out", "{tmp}/e"], "best"),
    (["ablate", "--cache", "{cache}", "--out", "{tmp}/a", "--grid", "{tmp}/missing.toml"], "missing.toml"),
    (["ablate", "--cache", "{cache}", "--out", "{tmp}/a", "--set", "nonsense=1"], "nonsense"),
    (["report", "{runs}", "--out", "{tmp}", "--export", "docx"], "docx"),
    (["show", "{tmp}/nowhere"], "has no metrics.json"),
]


@pytest.mark.parametrize("args,words", MISTAKES, ids=[" ".join(a[:1] + [w[:20]]) for a, w in MISTAKES])
def test_user_mistakes_are_one_paragraph_exit_2(args, words, runs, cache, tmp_path):
    fill = {"{cache}": cache, "{run}": runs["b"][0], "{runs}": os.path.dirname(runs["b"][0]), "{tmp}": str(tmp_path)}
    for k, v in fill.items():
        args = [a.replace(k, v) for a in args]
    r = heads(*args)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and "error:" in r.output
    assert words in flat(r.output), r.output
