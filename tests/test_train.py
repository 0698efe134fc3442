"""Training end to end on a small synthetic cache: reproducibility, the run directory, predict, the CLI."""
from __future__ import annotations

import csv
import inspect
import json
import os

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from featcache.cache.store import LEGACY_CLASSES, CacheError
from heads.config import TrainConfig
from heads.data.cache import DataError, load_cache
from heads.data.splits import SplitConfig, split_labelled
from heads.predict import predict
from heads.train.metrics import compute_metrics
from heads.train.stage1 import train

LABELS = list(LEGACY_CLASSES)  # the synthetic caches record no class names: older caches' default
FAST = dict(epochs=4, patience=0, hidden=32, plots=False)


def cfg(**flat) -> TrainConfig:
    return TrainConfig.from_flat(**{**FAST, **flat})
RUN_FILES = ("config.json", "metrics.json", "history.json", "head.safetensors", "val_predictions.csv",
             "cache.json", "split.json")


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def strip_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "timing"}


@pytest.fixture
def cache(make_synthetic_cache):
    return make_synthetic_cache(noise=3.0)  # noisy enough that validation is not trivially perfect


def test_data_split_counts_and_invalid(cache):
    data = load_cache(cache)
    split = split_labelled(data, SplitConfig(val_ratio=0.2), seed=0)
    c = split.counts
    assert c["invalid_excluded"] == 6 and c["unlabelled"] == 40 and c["invalid"] == 7
    assert c["train"] + c["val"] == 240 - 6
    assert set(split.train).isdisjoint(split.val)
    assert data.valid[split.train].all() and data.valid[split.val].all()
    assert data.features["text_tokens"].dtype.is_floating_point and data.features["text_tokens"].element_size() == 2
    # stratified: class proportions of val follow train
    val_frac = np.bincount(data.labels[split.val], minlength=3) / split.val.size
    train_frac = np.bincount(data.labels[split.train], minlength=3) / split.train.size
    assert np.abs(val_frac - train_frac).max() < 0.05


def test_refuses_cache_without_labels(make_synthetic_cache):
    path = make_synthetic_cache("unlabelled.h5", n_train=0, n_invalid=0)
    with pytest.raises(DataError, match="no labelled valid samples"):
        train(cfg(), path)


def test_unknown_names_are_user_errors(cache):
    with pytest.raises(ValueError, match="valid: concat"):
        train(cfg(fusion="nope"), cache)
    with pytest.raises(ValueError, match="valid: macro_f1"):
        train(cfg(metric="auc"), cache)


def test_reproducible_with_same_seed(cache, tmp_path):
    data = load_cache(cache)  # loaded once, trained twice: the ablation's use
    a = train(cfg(fusion="cross-attn", modality_dropout=0.2, rdrop=0.5), data, str(tmp_path / "a"))
    b = train(cfg(fusion="cross-attn", modality_dropout=0.2, rdrop=0.5), data, str(tmp_path / "b"))
    assert strip_timing(a.metrics) == strip_timing(b.metrics)
    assert [{**h, "seconds": 0} for h in a.history] == [{**h, "seconds": 0} for h in b.history]
    assert open(tmp_path / "a" / "head.safetensors", "rb").read() == open(tmp_path / "b" / "head.safetensors", "rb").read()
    c = train(cfg(fusion="cross-attn", seed=1), data)
    assert not np.array_equal(c.split.val, a.split.val)


@pytest.mark.parametrize("fusion", ["gmu", "film"])
def test_run_dir_and_metrics_match_predictions(cache, tmp_path, fusion):
    out = str(tmp_path / "run")
    res = train(cfg(fusion=fusion, loss="weighted_ce", label_smoothing=0.1, tune_bias=True, plots=True), cache, out)
    for name in RUN_FILES + ("bias.json", "curves.png", "confusion.png"):
        assert os.path.exists(os.path.join(out, name)), name
    assert os.path.exists(os.path.join(out, "gate.png")) == (fusion == "gmu")

    metrics = json.load(open(os.path.join(out, "metrics.json")))
    rows = read_csv(os.path.join(out, "val_predictions.csv"))
    y = [LABELS.index(r["label"]) for r in rows]
    for key, column in (("tuned", "pred"), ("untuned", "pred_untuned")):
        ref = metrics if key == "tuned" else metrics["untuned"]
        again = compute_metrics(y, [LABELS.index(r[column]) for r in rows], LABELS)
        for k in ("accuracy", "macro_f1", "weighted_f1", "per_class", "confusion_matrix"):
            assert again[k] == ref[k], (key, k)
    probs = np.array([[float(r[f"p_{c}"]) for c in LABELS] for r in rows])
    assert np.allclose(probs.sum(1), 1, atol=1e-4)
    assert [LABELS.index(r["pred_untuned"]) for r in rows] == list(probs.argmax(1))
    assert metrics["counts"]["invalid_excluded"] == 6
    assert set(metrics["bias"]) == set(LABELS)

    split = json.load(open(os.path.join(out, "split.json")))
    assert [r["guid"] for r in rows] == split["val"]
    assert len(split["train"]) + len(split["val"]) == 234 and not set(split["train"]) & set(split["val"])
    saved = json.load(open(os.path.join(out, "config.json")))
    rebuilt = TrainConfig.from_flat(saved["train"])
    expected = cfg(fusion=fusion, loss="weighted_ce", label_smoothing=0.1, tune_bias=True, plots=True)
    assert rebuilt == expected and rebuilt.head.fusion == fusion and rebuilt.loss.name == "weighted_ce"
    assert saved["stage"] == "train" and saved["dims"]["text_dim"] == res.model.dims.text_dim
    assert saved["classes"] == metrics["classes"] == LABELS and saved["env"]["threads"] >= 1
    assert json.load(open(os.path.join(out, "cache.json")))["key"] == "synthetic-key-1"
    assert len(json.load(open(os.path.join(out, "history.json")))) == 4


def test_predict_every_test_guid_and_refuses_other_caches(cache, make_synthetic_cache, tmp_path):
    out = str(tmp_path / "run")
    res = train(cfg(fusion="concat"), cache, out)
    preds = str(tmp_path / "preds.txt")
    r = predict(out, cache, preds)
    lines = open(preds).read().splitlines()
    assert lines[0] == "guid,tag"
    data = load_cache(cache)
    test_guids = [g for g, s in zip(data.guids, data.splits) if s == "test"]
    assert [ln.split(",")[0] for ln in lines[1:]] == test_guids
    assert all(ln.split(",")[1] in LABELS for ln in lines[1:])
    assert r.invalid == [test_guids[-1]] and r.written == 40  # the invalid one is listed, not dropped
    assert lines[-1] == f"{test_guids[-1]},{r.fallback_tag}"

    # Valid test predictions equal the head applied in memory (the run dir round-trips exactly).
    from heads.infer import infer
    rows = data.rows("test")[:-1]
    expect = np.array(LABELS)[infer(res.model, data, rows)["logits"].argmax(1)]
    assert [ln.split(",")[1] for ln in lines[1:-1]] == list(expect)

    # Another dataset with the same backbones and preprocessing (another key): that is what predict is for.
    other_data = make_synthetic_cache("other.h5", key="another-key", seed=5)
    assert predict(out, other_data, preds).written == 40
    other_prep = make_synthetic_cache("prep.h5", preprocessing={"clean_text": True})
    with pytest.raises(CacheError, match="preprocessing.*clean_text"):
        predict(out, other_prep, preds)
    other_backbone = make_synthetic_cache("clip.h5", backbone={"name": "clip-vit-b32"})
    with pytest.raises(CacheError, match="clip-vit-b32"):
        predict(out, other_backbone, preds)
    with pytest.raises(ValueError, match="no samples in split 'dev'"):
        predict(out, cache, preds, split="dev")


def test_cli_defaults_follow_train_config():
    from cli import heads_train_cmd
    defaults = TrainConfig().flat()
    for name, param in inspect.signature(heads_train_cmd).parameters.items():
        if name in defaults and name != "fusion":
            assert param.default.default == defaults[name], name


def test_cli_train_then_predict(cache, tmp_path):
    from cli import heads_app
    runner = CliRunner()
    run = str(tmp_path / "cli-run")
    r = runner.invoke(heads_app, ["train", "--cache", cache, "--fusion", "co-attn", "--epochs", "2", "--hidden",
                                  "32", "--tune-bias", "--seed", "3", "--out", run])
    assert r.exit_code == 0, r.output
    assert "macro_f1" in r.output and os.path.exists(os.path.join(run, "head.safetensors"))
    preds = str(tmp_path / "preds.txt")
    r = runner.invoke(heads_app, ["predict", "--run", run, "--cache", cache, "--out", preds])
    assert r.exit_code == 0, r.output
    assert len(open(preds).read().splitlines()) == 41
    r = runner.invoke(heads_app, ["fusions"])
    assert r.exit_code == 0 and "cross-attn" in r.output
    r = runner.invoke(heads_app, ["train", "--cache", cache, "--fusion", "nope", "--out", run])
    assert r.exit_code == 2 and "valid: concat" in r.output and "Traceback" not in r.output
    r = runner.invoke(heads_app, ["predict", "--run", str(tmp_path), "--cache", cache, "--out", preds])
    assert r.exit_code == 2 and "not a heads run directory" in r.output


def test_trainer_eval_at_start_keeps_a_better_start():
    # Stage 2 starts from an already-selected head: epochs that only make it worse must not replace it.
    from heads.train.loop import OptimConfig, Trainer
    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
    model = torch.nn.Linear(4, 2)
    start = {k: v.clone() for k, v in model.state_dict().items()}

    def loss_fn(m, idx):  # rewards the wrong answer: every step makes validation worse
        return -torch.nn.functional.cross_entropy(m(x[idx]), y[idx])

    def evaluate(m):
        with torch.no_grad():
            return {"score": float(-torch.nn.functional.cross_entropy(m(x), y))}

    opt = OptimConfig(epochs=3, batch_size=16, lr=0.5, patience=0, metric="score")
    t = Trainer(model, opt, 0, 64, loss_fn, evaluate, eval_at_start=True)
    t.run()
    assert t.best_epoch == 0 and t.start_scores["score"] == t.best_score
    assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())
    t = Trainer(torch.nn.Linear(4, 2), opt, 0, 64, loss_fn, evaluate)  # without it: an epoch is kept
    t.run()
    assert t.best_epoch >= 1


def test_heads_commands_refuse_unusable_caches_by_name(cache, tmp_path):
    """A truncated, foreign, non-HDF5 or unfinished .h5 given to any heads command: one message naming the
    file, exit code 2, no traceback (issue 6)."""
    import h5py
    from cli import heads_app
    from featcache.cache.store import partial_path
    data = open(cache, "rb").read()
    bad = {"truncated.h5": "may be truncated", "foreign.h5": "not a feature cache",
           "text.h5": "not a readable HDF5 file", "unfinished.h5": "interrupted"}
    (tmp_path / "truncated.h5").write_bytes(data[: len(data) // 2])
    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f.create_dataset("x", data=np.arange(3))
    (tmp_path / "text.h5").write_text("not hdf5\n")
    open(partial_path(str(tmp_path / "unfinished.h5")), "wb").write(data)
    runner = CliRunner()
    run = str(tmp_path / "ok-run")
    assert runner.invoke(heads_app, ["train", "--cache", cache, "--out", run, "--epochs", "1",
                                     "--no-plots"]).exit_code == 0
    for name, words in bad.items():
        path = str(tmp_path / name)
        for args in (["train", "--cache", path, "--out", str(tmp_path / "r")],
                     ["predict", "--run", run, "--cache", path, "--out", str(tmp_path / "p.txt")],
                     ["ablate", "--cache", path, "--fusion", "concat", "--seeds", "0", "--out", str(tmp_path / "a")],
                     ["finetune", "--cache", path, "--unfreeze-text", "1", "--out", str(tmp_path / "f")]):
            r = runner.invoke(heads_app, args)
            flat = " ".join(r.output.split())
            assert r.exit_code == 2 and "Traceback" not in r.output, (args, r.output)
            assert words in flat and name in flat, (args, r.output)


@pytest.mark.parametrize("fused", [True, False])
def test_adamw_equals_torch_optim(fused, monkeypatch):
    """heads.train.optim.AdamW (the fused kernel called directly, or torch.optim's class where that kernel is
    missing) makes exactly torch.optim.AdamW's updates, per param group lr / weight decay and schedule."""
    from heads.train.optim import AdamW
    if not fused:
        monkeypatch.delattr(torch, "_fused_adamw_")
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 4)), torch.nn.Parameter(torch.randn(4))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    ours = AdamW([{"params": a[:1], "lr": 1e-2, "weight_decay": 0.1}, {"params": a[1:], "weight_decay": 0.0}],
                 lr=3e-3)
    assert ours.fused is fused
    ref = torch.optim.AdamW([{"params": b[:1], "lr": 1e-2, "weight_decay": 0.1},
                             {"params": b[1:], "weight_decay": 0.0}], lr=3e-3, fused=True if fused else None)
    for step, mult in enumerate([0.1, 0.5, 1.0, 0.7, 0.2]):
        ours.set_lr(mult)
        for g, base in zip(ref.param_groups, (1e-2, 3e-3)):
            g["lr"] = base * mult
        grads = [torch.randn_like(p) for p in a]
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = g.clone(), g.clone()
        if step == 3:  # a parameter without a gradient this step is left alone, as torch.optim does
            a[1].grad = b[1].grad = None
        ours.step()
        ref.step()
        ours.zero_grad()
        ref.zero_grad()
        for p, q in zip(a, b):
            assert torch.equal(p, q), step


def test_heads_train_process_never_imports_dynamo_or_sklearn(make_synthetic_cache, tmp_path):
    """Why heads.train.optim, heads.data.splits' stratified split and numpy metrics exist: a `heads train`
    process pays neither
    torch._dynamo's import nor sklearn's (with scipy, about 1.4 s)."""
    import subprocess
    import sys
    cache = make_synthetic_cache()
    code = ("import sys; from cli import heads_app\n"
            "try:\n    heads_app(['train', '--cache', sys.argv[1], '--out', sys.argv[2], '--epochs', '2', "
            "'--tune-bias', '--test-ratio', '0.2'])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print(sorted(m for m in ('torch._dynamo', 'sklearn', 'scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, cache, str(tmp_path / "run")], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "run" / "confusion.png").exists()  # plots on: matplotlib must not bring scipy either
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_load_cache_of_a_heads_inputs_only(make_synthetic_cache):
    """`heads train` reads only its head's inputs; dims and batches are those of the full load."""
    path = make_synthetic_cache()
    full, sub = load_cache(path), load_cache(path, keys=("image_tokens", "text_pooled"))
    assert set(sub.features) == {"image_tokens", "text_pooled"} and sub.dims() == full.dims()
    keys = ("text_pooled", "image_tokens")
    a, b = full.batch([3, 1, 4], keys=keys), sub.batch([3, 1, 4], keys=keys)
    assert all(torch.equal(a[k], b[k]) for k in a)


# A run directory as the code before the config tree wrote it (format 1): flat TrainConfig / FinetuneConfig
# sections, the head's sizes with its hyperparameters, no class names. Literal keys, as that code wrote them.
OLD_TRAIN = {"fusion": "gmu", "modality": "both", "loss": "ce", "label_smoothing": 0.0, "focal_gamma": 2.0,
             "rdrop": 0.0, "modality_dropout": 0.0, "hidden": 32, "dropout": 0.1, "attn_heads": 4, "epochs": 4,
             "batch_size": 128, "lr": 0.001, "weight_decay": 0.01, "warmup_frac": 0.1, "patience": 0,
             "grad_clip": 1.0, "metric": "macro_f1", "val_ratio": 0.2, "test_ratio": 0.0, "seed": 0, "folds": 0,
             "fold": 0, "val_split": "auto", "split_file": "",
             "tune_bias": False, "image_aug_views": True, "device": "auto", "precision": "auto",
             "threads": 0, "eval_batch_size": 1024, "plots": False, "memory_budget": "auto"}
OLD_HEAD = {"text_dim": 16, "text_pooled_dim": 16, "image_dim": 12, "image_pooled_dim": 20, "num_classes": 3,
            "hidden": 32, "dropout": 0.1, "attn_heads": 4, "modality": "both", "modality_dropout": 0.0}
OLD_FINETUNE = {"cache": "cache.h5", "unfreeze_text": 0, "init": None, "fusion": "gmu", "modality": "both",
                "hidden": 32, "dropout": 0.1, "attn_heads": 4, "loss": "ce", "label_smoothing": 0.0,
                "lr_head": 0.0002, "lr_text": 5e-05, "epochs": 5, "batch_size": 32, "grad_accum": 1,
                "grad_clip": 1.0, "warmup_frac": 0.1, "weight_decay": 0.01, "patience": 3, "metric": "macro_f1",
                "val_ratio": 0.2, "seed": 0, "device": "auto", "text_forward": "cached", "eval_batch_size": 1024,
                "threads": 0, "plots": False}


def test_old_run_directories_still_load(cache, tmp_path):
    """predict, show and finetune --init read a format-1 config.json (upgrade_config) exactly as a new one."""
    from cli import heads_app
    from heads.config import FinetuneConfig
    from heads.rundir import upgrade_config
    from heads.train.stage2 import finetune
    run = str(tmp_path / "run")
    train(cfg(fusion="gmu"), cache, run)
    new_preds, old_preds = str(tmp_path / "new.txt"), str(tmp_path / "old.txt")
    predict(run, cache, new_preds)
    assert TrainConfig.from_flat(OLD_TRAIN).flat() == OLD_TRAIN  # the literal is today's TrainConfig
    with open(os.path.join(run, "config.json"), "w") as f:
        json.dump({"train": OLD_TRAIN, "head": OLD_HEAD}, f)
    predict(run, cache, old_preds)
    assert open(old_preds).read() == open(new_preds).read()
    r = CliRunner().invoke(heads_app, ["show", run])
    assert r.exit_code == 0 and "macro_f1" in r.output
    init = finetune(FinetuneConfig.from_flat(text_layers=0, init=run, lr=0.0, epochs=1, plots=False), cache,
                    str(tmp_path / "ft"))
    assert init.metrics["init_scores"]["macro_f1"] == json.load(open(os.path.join(run, "metrics.json")))["macro_f1"]

    # A format-1 stage-2 run: the head and loss from its "train" section, optimisation from "finetune".
    up = upgrade_config({"finetune": OLD_FINETUNE, "train": {**OLD_TRAIN, "lr": 0.0002, "epochs": 5},
                         "head": OLD_HEAD})
    assert up["stage"] == "finetune" and up["classes"] == LABELS and up["dims"]["num_classes"] == 3
    ft = FinetuneConfig.from_flat(up["train"])
    assert ft.text_layers == 0 and ft.optim.lr == 0.0002 and ft.optim.batch_size == 32 and ft.head.hidden == 32
    with open(os.path.join(run, "config.json"), "w") as f:
        json.dump({"finetune": OLD_FINETUNE, "train": OLD_TRAIN, "head": OLD_HEAD}, f)
    predict(run, cache, old_preds)
    assert open(old_preds).read() == open(new_preds).read()
    # Probe runs: {"probe": ...} only
    assert upgrade_config({"probe": {"seed": 1}})["probe"] == {"seed": 1}


def test_class_names_come_from_the_cache(make_synthetic_cache, tmp_path):
    """A cache that records its own class names: metrics, predictions and predict's tags use them, and a run
    refuses a cache whose classes differ even when its features match."""
    named = make_synthetic_cache("named.h5", noise=3.0, classes=["bad", "meh", "good"])
    out = str(tmp_path / "run")
    res = train(cfg(fusion="concat", tune_bias=True), named, out)
    assert list(res.metrics["per_class"]) == ["bad", "meh", "good"] == res.metrics["classes"]
    assert json.load(open(os.path.join(out, "config.json")))["classes"] == ["bad", "meh", "good"]
    assert json.load(open(os.path.join(out, "bias.json")))["labels"] == ["bad", "meh", "good"]
    assert {r["pred"] for r in read_csv(os.path.join(out, "val_predictions.csv"))} <= {"bad", "meh", "good"}
    preds = str(tmp_path / "preds.txt")
    r = predict(out, named, preds)
    assert set(r.tags) <= {"bad", "meh", "good"} and r.fallback_tag in ("bad", "meh", "good")
    with pytest.raises(CacheError, match="predicts the classes bad, meh, good"):
        predict(out, make_synthetic_cache("legacy.h5", noise=3.0), preds)
