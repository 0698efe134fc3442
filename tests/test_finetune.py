"""Stage 2 (`heads finetune`, `featcache add-text-layers`) on small real extractions.

Every text backbone (MiniLM from its wheel, tiny RoBERTa and tiny CLIP built in tiny_models) is extracted
through featcache.extract; the checks: top-N on the cached states equals the full forward (padding included),
add-text-layers equals extract --text-layers, N=0 reproduces stage 1 exactly, only the top blocks change,
the CLI runs end to end with predict, the fallback without states says so, and wrong weights are refused.
Stage 2's layer wiring is checked on a 5-layer RoBERTa (more than 2N layers) with heads whose output depends on
the text: stored states, the whole tower and the cache's own text features give the same logits.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
from dataclasses import replace

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import tiny_models as tm
from featcache.backbones.weights import ENV_DIR
from featcache.cache.store import CacheError, CacheReader
from featcache.digest import file_sha256
from featcache.extract.config import ExtractConfig
from featcache.extract.engine import extract
from featcache.extract.text_layers import add_text_layers
from featcache.text_tower import load_text_backbone, tokenize_cache
from heads.config import FinetuneConfig, TrainConfig
from heads.data.cache import load_cache
from heads.data.text_layers import with_text_inputs
from heads.infer import infer
from heads.train.stage1 import train
from heads.train.stage2 import finetune
from heads.train.text_model import FinetuneModel

pytestmark = pytest.mark.filterwarnings("ignore")
BACKBONES = {"minilm-l6": "minilm-l6+clip-vit-b32", "roberta-base": "roberta-base+clip-vit-b32",  # tiny image tower
             "clip-vit-b32": "clip-vit-b32"}
FAST = dict(epochs=3, patience=0, hidden=32, plots=False)
STAGE2_KEYS = ("text_tokens", "text_mask", "text_pooled", "image_tokens", "image_pooled", "text_states")


def ft_cfg(**flat) -> FinetuneConfig:
    return FinetuneConfig.from_flat(**flat)


def stage2_data(path: str):
    return load_cache(path, keys=STAGE2_KEYS, texts=True)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Weights folder ($FEATCACHE_WEIGHTS) and one small MVSA-layout dataset with labels for every class."""
    root = tmp_path_factory.mktemp("ft")
    weights = root / "weights"
    tm.make_tiny_roberta(str(weights / "roberta-base"))
    tm.make_tiny_clip(str(weights / "clip-vit-b32"))
    data = tm.make_mvsa(str(root / "mvsa"), n=24, n_test=4)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv(ENV_DIR, str(weights))
        yield {"root": root, "data": data, "weights": weights}


@pytest.fixture(scope="module")
def caches(env):
    """name -> {"plain": extract without states, "added": plain + add-text-layers 1, "extracted": --text-layers 1}."""
    out = {}
    for name, backbone in BACKBONES.items():
        paths = {}
        for kind, layers in (("plain", 0), ("extracted", 1)):
            paths[kind] = extract(ExtractConfig(data=env["data"], backbone=backbone, text_layers=layers,
                                                out=str(env["root"] / f"{name}-{kind}.h5"), workers=0,
                                                batch_size=8, max_text_len=24), progress=False)
        paths["added"] = str(env["root"] / f"{name}-added.h5")
        shutil.copyfile(paths["plain"], paths["added"])
        add_text_layers(paths["added"], 1, batch_size=5, progress=False)
        out[name] = paths
    return out


@pytest.mark.parametrize("name", list(BACKBONES))
def test_top_layers_on_cached_states_equal_full_forward(caches, name):
    data = stage2_data(caches[name]["added"])
    text = load_text_backbone(data.meta)
    inputs = with_text_inputs(data, text, 1)  # also verifies the states against the cached tokens
    assert inputs.start_layer == text.num_layers - 1 and "text_states" in inputs.features
    rows = torch.arange(len(data))
    with CacheReader(data.path) as r:
        full_batch = tokenize_cache(r, text)
    mask = full_batch["attention_mask"]
    assert (~mask).any() and mask.any(1).all()  # real padding, every row has tokens
    with torch.no_grad():
        full = text.forward_features(full_batch)
        b = inputs.batch(rows, "cpu", ("text_states", "input_ids", "text_mask"))  # the training path: trimmed
        top = text.forward_layers(b["text_states"], {"input_ids": b["input_ids"], "attention_mask": b["text_mask"]},
                                  inputs.start_layer)
    n = top["tokens"].shape[1]
    assert n <= mask.shape[1] and torch.equal(top["mask"], mask[:, :n])
    m = mask[:, :n]
    scale = max(1.0, full["tokens"][mask].abs().max().item())
    torch.testing.assert_close(top["tokens"][m], full["tokens"][:, :n][m], atol=1e-2 * scale, rtol=1e-2)
    pscale = max(1.0, full["pooled"].abs().max().item())
    torch.testing.assert_close(top["pooled"], full["pooled"], atol=1e-2 * pscale, rtol=1e-2)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_add_text_layers_equals_extract_text_layers(caches, name):
    paths = caches[name]
    with CacheReader(paths["added"]) as a, CacheReader(paths["extracted"]) as e, CacheReader(paths["plain"]) as p:
        mask = a.array("text/mask")
        assert a.meta["text"]["start_layer"] == e.meta["text"]["start_layer"]
        np.testing.assert_allclose(a.array("text_hidden/states")[mask].astype(np.float32),
                                   e.array("text_hidden/states")[mask].astype(np.float32), atol=1e-2, rtol=1e-2)
        for k in ("text/tokens", "text/pooled", "image/tokens"):  # features untouched, key unchanged
            assert np.array_equal(a.array(k), p.array(k))
        assert a.meta["key"] == p.meta["key"] and a.meta["preprocessing"] == p.meta["preprocessing"]
        assert a.meta["text_hidden"]["added_by"] == "featcache add-text-layers"
    assert not os.path.exists(paths["added"] + ".addon.partial")


def test_add_text_layers_refuses_other_weights(caches, env, tmp_path):
    path = str(tmp_path / "c.h5")
    shutil.copyfile(caches["roberta-base"]["plain"], path)
    other = tm.make_tiny_roberta(str(tmp_path / "other-roberta"), seed=1)
    with h5py.File(path, "r+") as f:  # recorded weights now point at another model (with its own sha)
        meta = json.loads(f.attrs["meta"])
        meta["weights"]["text"].update(location=other, sha256=file_sha256(other))
        f.attrs["meta"] = json.dumps(meta)
    before = file_sha256(path)
    with pytest.raises(CacheError, match="wrong weights"):
        add_text_layers(path, 1, progress=False)
    assert file_sha256(path) == before and not os.path.exists(path + ".addon.partial")
    from cli import featcache_app
    r = CliRunner().invoke(featcache_app, ["add-text-layers", path, "--layers", "3"])
    assert r.exit_code == 2 and "has 2 layers" in r.output and "Traceback" not in r.output


def test_n0_reproduces_stage1_exactly(make_synthetic_cache, tmp_path):
    cache = make_synthetic_cache(noise=3.0)  # no backbone at all: N=0 never loads one
    # Same settings on both sides: stage 2 trains in fp32 on CPU, so stage 1 is pinned to fp32 here.
    ref = train(TrainConfig.from_flat(**FAST, batch_size=64, lr=1e-3, precision="fp32"), cache, str(tmp_path / "s1"))
    res = finetune(ft_cfg(text_layers=0, lr=1e-3, batch_size=64, **FAST), cache)
    assert np.array_equal(res.val_logits, ref.val_logits)
    assert np.array_equal(res.split.val, ref.split.val)
    drop = lambda h: [{k: v for k, v in row.items() if k != "seconds"} for row in h]
    assert drop(res.history) == drop(ref.history)
    # --init with zero learning rates: the stage-1 head, unchanged, on the stage-1 split
    same = finetune(ft_cfg(text_layers=0, init=ref.run_dir, lr=0.0, epochs=1, plots=False), cache)
    assert np.array_equal(same.val_logits, ref.val_logits) and np.array_equal(same.split.val, ref.split.val)


def test_init_run_test_split_scores_both_stages_on_it(make_synthetic_cache, tmp_path):
    """An init run with --test-ratio: stage 2 keeps its test rows out of training and selection and scores the
    init head and the final model on them; with zero learning rates both equal stage 1's own test score."""
    cache = make_synthetic_cache(noise=3.0)
    ref = train(TrainConfig.from_flat(**FAST, test_ratio=0.2, precision="fp32"), cache, str(tmp_path / "s1"))
    zero = finetune(ft_cfg(text_layers=0, init=ref.run_dir, lr=0.0, epochs=1, plots=False), cache,
                    str(tmp_path / "ft0"))
    assert zero.metrics["init_test"] == ref.metrics["test"] == zero.metrics["test"]
    assert zero.metrics["counts"]["test"] == ref.metrics["counts"]["test"] > 0
    held = set(zero.split.test)
    assert held == set(ref.split.test) and not held & (set(zero.split.train) | set(zero.split.val))
    saved = json.load(open(tmp_path / "ft0" / "split.json"))["test"]
    assert saved == json.load(open(tmp_path / "s1" / "split.json"))["test"]
    moved = finetune(ft_cfg(text_layers=0, init=ref.run_dir, lr=1e-2, epochs=2, patience=0, plots=False), cache)
    assert moved.metrics["init_test"] == ref.metrics["test"] and "test" in moved.metrics
    # without a test split in the init run, nothing is invented
    plain = train(TrainConfig.from_flat(**FAST, precision="fp32"), cache, str(tmp_path / "s1b"))
    none = finetune(ft_cfg(text_layers=0, init=plain.run_dir, epochs=1, plots=False), cache)
    assert "test" not in none.metrics and "init_test" not in none.metrics


def test_only_top_blocks_change(caches):
    path = caches["minilm-l6"]["added"]
    res = finetune(ft_cfg(text_layers=1, lr_text=1e-3, lr=1e-3, batch_size=8, **FAST), path)
    trained = dict(res.model.text.named_parameters())
    fresh = dict(load_text_backbone(load_cache(path).meta).named_parameters())
    top = "model.encoder.layer.5."
    changed = [k for k in fresh if not torch.equal(fresh[k], trained[k])]
    assert changed and all(k.startswith(top) for k in changed)
    assert set(res.model.text_params()) == {k for k in fresh if k.startswith(top)}
    assert res.metrics["text_forward"] == "cached"


def test_cli_finetune_predict_and_fallback(caches, tmp_path):
    from cli import heads_app
    runner = CliRunner()
    path = caches["minilm-l6"]["added"]
    s1, ft, preds = str(tmp_path / "s1"), str(tmp_path / "ft"), str(tmp_path / "preds.csv")
    r = runner.invoke(heads_app, ["train", "--cache", path, "--epochs", "2", "--hidden", "32", "--no-plots",
                                  "--out", s1])
    assert r.exit_code == 0, r.output
    r = runner.invoke(heads_app, ["finetune", "--cache", path, "--unfreeze-text", "1", "--init", s1, "--epochs",
                                  "2", "--batch-size", "8", "--grad-accum", "2", "--lr-text", "1e-4", "--out", ft])
    assert r.exit_code == 0, r.output
    for f in ("config.json", "metrics.json", "history.json", "head.safetensors", "val_predictions.csv",
              "cache.json", "split.json", "text_layers.safetensors", "curves.png"):
        assert os.path.exists(os.path.join(ft, f)), f
    split = lambda d: json.load(open(os.path.join(d, "split.json")))
    assert split(ft)["val"] == split(s1)["val"] and split(ft)["train"] == split(s1)["train"]
    cfg = json.load(open(os.path.join(ft, "config.json")))
    assert cfg["stage"] == "finetune" and cfg["train"]["text_layers"] == 1 and cfg["train"]["fusion"] == "film"
    assert cfg["train"]["hidden"] == 32 and cfg["train"]["epochs"] == 2  # the init's head, stage 2's loop
    r = runner.invoke(heads_app, ["predict", "--run", ft, "--cache", path, "--out", preds])
    assert r.exit_code == 0, r.output
    data = load_cache(path)
    lines = open(preds).read().splitlines()
    assert lines[0] == "guid,tag" and [ln.split(",")[0] for ln in lines[1:]] == [data.guids[i] for i in data.rows("test")]
    # no stored states: the fallback is announced and the run still completes
    r = runner.invoke(heads_app, ["finetune", "--cache", caches["minilm-l6"]["plain"], "--unfreeze-text", "1",
                                  "--epochs", "1", "--no-plots", "--out", str(tmp_path / "fb")])
    assert r.exit_code == 0, r.output
    assert "falling back to the full text forward" in " ".join(r.output.split())
    assert json.load(open(tmp_path / "fb" / "metrics.json"))["text_forward"] == "full"
    r = runner.invoke(heads_app, ["finetune", "--cache", path, "--unfreeze-text", "7", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "has 6 layers" in r.output


@pytest.fixture(scope="module")
def roberta5(env):
    """A 5-layer tiny RoBERTa (more layers than 2N for N = 1, 2, so a wrong layer cannot coincide with the right
    one) extracted with --text-layers 2: states entering layer 3."""
    weights = tm.make_tiny_roberta(str(env["root"] / "roberta5"), num_layers=5)
    return extract(ExtractConfig(data=env["data"], backbone="roberta-base+clip-vit-b32", text_weights=weights,
                                 text_layers=2, out=str(env["root"] / "roberta5.h5"), workers=0, batch_size=8,
                                 max_text_len=24), progress=False)


@pytest.mark.parametrize("n,fusion", [(1, "cross-attn"), (2, "film")])
def test_cached_and_full_forward_agree_on_a_text_dependent_head(roberta5, n, fusion):
    """With zero learning rates, stage 2's logits from the stored states (cached; for N=1 the states enter layer
    3, so frozen layer 3 runs once up front), from the whole tower (full) and from the head on the cache's own
    text features (what extraction computed, no stage-2 code involved) agree to fp16 tolerance. The head's output
    must depend on the text (asserted: noise in place of the states changes the logits), so states fed into the
    wrong layer cannot go unnoticed."""
    zero = dict(lr=0.0, lr_text=0.0, epochs=1, patience=0, plots=False, hidden=32, fusion=fusion)
    a = finetune(ft_cfg(text_layers=n, **zero), roberta5)
    b = finetune(ft_cfg(text_layers=n, text_forward="full", **zero), roberta5)
    assert a.metrics["text_forward"] == "cached" and b.metrics["text_forward"] == "full"
    np.testing.assert_allclose(a.val_logits, b.val_logits, atol=2e-3, rtol=1e-3)
    data = stage2_data(roberta5)
    assert data.start_layer == 3
    head = a.model.head
    if fusion == "film":  # a fresh FiLM is the identity (zero-initialised): make it use the text
        with torch.no_grad():
            for p in head.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    rows = np.arange(len(data))
    stored = infer(head, data, rows)["logits"]  # the head on extraction's text features: the reference
    text = load_text_backbone(data.meta)
    text.lock(n)
    for mode in ("cached", "full"):
        inputs = with_text_inputs(data, text, n, mode, say=lambda m: None)
        model = FinetuneModel(head, text, n, cached=mode == "cached")
        got = infer(model, inputs, rows)["logits"]
        np.testing.assert_allclose(got, stored, atol=2e-3, rtol=1e-3, err_msg=mode)
    cached = with_text_inputs(data, text, n, "cached", say=lambda m: None)
    g = torch.Generator().manual_seed(0)
    states = cached.features["text_states"]
    noisy = replace(cached, features={**cached.features,
                                      "text_states": (3 * torch.randn(states.shape, generator=g)).to(states.dtype)})
    model = FinetuneModel(head, text, n, cached=True)
    moved = np.abs(infer(model, noisy, rows)["logits"] - stored).max(1)
    assert (moved > 1e-2).all(), f"{fusion}: the logits ignore the text; the test would be vacuous"


def test_states_that_start_too_high_fall_back_to_the_full_forward(roberta5):
    data = stage2_data(roberta5)
    text = load_text_backbone(data.meta)
    said = []
    text.lock(3)
    inputs = with_text_inputs(data, text, 3, say=said.append)  # states entering layer 3 cover only 2
    assert "text_states" not in inputs.features and "input_ids" in inputs.features
    assert "they enter layer 3, above 2" in said[0]


def _fold_as_single_run(run: str, k: int, dest) -> str:
    """Fold k of a cross-fit stage-2 run as a one-model stage-2 run directory (what predict would see had
    fold k been trained alone): its head and text-layer files under the single-run names."""
    shutil.copytree(run, dest)
    for f in os.listdir(dest):
        if ".fold" in f:
            os.remove(os.path.join(dest, f))
    shutil.copyfile(os.path.join(run, f"head.fold{k}.safetensors"), os.path.join(dest, "head.safetensors"))
    shutil.copyfile(os.path.join(run, f"text_layers.fold{k}.safetensors"),
                    os.path.join(dest, "text_layers.safetensors"))
    cfg = json.load(open(os.path.join(dest, "config.json")))
    del cfg["heads"]
    json.dump(cfg, open(os.path.join(dest, "config.json"), "w"))
    return str(dest)


def test_finetune_from_crossfit_run_fold_by_fold(caches, tmp_path):
    """--init a cross-fit run: fold k's head and its own text layers train on fold k's training rows and stop
    on fold k; metrics on the out-of-fold predictions; predict averages the K stage-2 models."""
    from heads.predict import predict
    from heads.rundir import load_text_layers
    from heads.train.crossfit import train_crossfit
    from heads.train.metrics import compute_metrics
    path = caches["roberta-base"]["extracted"]  # 2 text layers, states entering the top one
    # a barely trained init (one epoch at a tiny rate), so that stage 2 has something to improve on
    cv = train_crossfit(TrainConfig.from_flat(**{**FAST, "epochs": 1}, lr=1e-5, fusion="concat", folds=2,
                                              precision="fp32"), path, str(tmp_path / "cv"))
    # zero learning rates: each fold keeps its init head, so the OOF predictions are the init run's
    zero = finetune(ft_cfg(text_layers=1, init=cv.run_dir, lr=0.0, lr_text=0.0, epochs=1, plots=False), path)
    np.testing.assert_allclose(zero.oof_logits, cv.oof_logits, atol=1e-3, rtol=1e-3)
    run = str(tmp_path / "ft")
    ft = finetune(ft_cfg(text_layers=1, init=cv.run_dir, lr=1e-3, lr_text=1e-3, epochs=2, patience=0,
                         batch_size=4, plots=False), path, run)
    for a, b in zip(ft.folds, cv.folds):  # the init run's folds, row for row
        assert a.split.val.tolist() == b.split.val.tolist() and a.split.train.tolist() == b.split.train.tolist()
    assert ft.oof_rows.tolist() == cv.oof_rows.tolist()
    files = sorted(f for f in os.listdir(run) if f.endswith(".safetensors"))
    assert files == ["head.fold0.safetensors", "head.fold1.safetensors", "text_layers.fold0.safetensors",
                     "text_layers.fold1.safetensors"]
    assert [len(f.history) for f in ft.folds] == [2, 2]
    # On 20 rows of random features no epoch may beat the init head (then its weights are kept); make fold 1's
    # text layers differ so that predict must pair each head with its own text-layer file.
    t1 = load_text_layers(run, "text_layers.fold1.safetensors")
    assert t1.keys() == load_text_layers(run, "text_layers.fold0.safetensors").keys() and t1
    save_file({k: v * 1.5 for k, v in t1.items()}, os.path.join(run, "text_layers.fold1.safetensors"))
    cfg = json.load(open(os.path.join(run, "config.json")))
    assert cfg["stage"] == "finetune" and cfg["train"]["folds"] == 2 and len(cfg["heads"]) == 2
    m = json.load(open(os.path.join(run, "metrics.json")))
    data = load_cache(path)
    want = compute_metrics(data.labels[ft.oof_rows], ft.oof_logits.argmax(1), data.classes)
    assert m["macro_f1"] == pytest.approx(want["macro_f1"]) and m["crossfit"] == 2 and m["stage"] == "finetune"
    assert m["counts"]["val"] == len(ft.oof_rows) and m["text_forward"] == "cached"
    # predict: the average of the two folds' probabilities, each fold as if it were a run of its own
    probs = lambda out: np.array([[float(r[f"p_{c}"]) for c in data.classes]  # noqa: E731
                                  for r in csv.DictReader(open(out)) if r["p_" + data.classes[0]]])
    predict(run, path, str(tmp_path / "p.csv"), device="cpu", proba=True)
    each = [predict(_fold_as_single_run(run, k, tmp_path / f"f{k}"), path, str(tmp_path / f"p{k}.csv"),
                    device="cpu", proba=True) for k in range(2)]
    assert all(r.written == len(probs(str(tmp_path / "p.csv"))) for r in each)
    np.testing.assert_allclose(probs(str(tmp_path / "p.csv")),
                               np.mean([probs(str(tmp_path / f"p{k}.csv")) for k in range(2)], axis=0), atol=2e-5)


def test_cli_finetune_options_are_recorded_and_act(roberta5, tmp_path):
    """--lr-head, --patience, --seed, --text-forward and --device through the CLI: recorded in config.json, and
    the full text forward is what the run used; the table printed holds metrics.json's numbers."""
    from cli import heads_app
    out = tmp_path / "ft"
    r = CliRunner().invoke(heads_app, ["finetune", "--cache", roberta5, "--unfreeze-text", "2", "--fusion", "concat",
                                       "--lr-head", "1e-3", "--lr-text", "0", "--patience", "1", "--seed", "3",
                                       "--text-forward", "full", "--device", "cpu", "--epochs", "1", "--batch-size",
                                       "8", "--no-plots", "--out", str(out)])
    assert r.exit_code == 0, r.output
    flat = json.load(open(out / "config.json"))["train"]
    assert (flat["lr"], flat["lr_text"], flat["patience"], flat["seed"], flat["text_forward"], flat["device"]) == \
        (1e-3, 0.0, 1, 3, "full", "cpu")
    m = json.load(open(out / "metrics.json"))
    assert m["text_forward"] == "full" and m["timing"]["device"] == "cpu"
    line = next(ln for ln in r.output.splitlines() if " macro_f1 " in ln)
    assert f"{m['macro_f1']:.4f}" in line
    # --lr-text 0: the text layers saved are the backbone's own
    fresh = dict(load_text_backbone(load_cache(roberta5).meta).named_parameters())
    saved = load_file(str(out / "text_layers.safetensors"))
    assert saved and all(torch.equal(v, fresh[k]) for k, v in saved.items())
    split = json.load(open(out / "split.json"))  # --seed 3 draws the same split as stage 1 with seed 3
    from heads.data.splits import SplitConfig, split_labelled
    data = load_cache(roberta5)
    want = split_labelled(data, SplitConfig(), 3)
    assert split["val"] == [data.guids[i] for i in want.val]
