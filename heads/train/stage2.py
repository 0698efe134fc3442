"""`heads finetune --unfreeze-text N` (stage 2): train the top N text layers together with a fusion head.

    cfg = FinetuneConfig.from_flat(text_layers=1, init="runs/film")
    result = finetune(cfg, "cache/mvsa.h5", "runs/film-ft1")

Nothing frozen runs in the loop: image features come from the cache (the image tower never runs) and the
text starts from the cache's text_hidden/states, the states entering layer L-N (heads.data.text_layers);
without them the whole text tower runs every step and a message says so (`text_forward="full"` asks for it).

`--init RUN` starts from a stage-1 run: its head weights, its head/loss config and its train/val split
(split.json), so stage 1 vs stage 2 compare on the same validation rows; the init head is scored before the
first step and kept unless an epoch beats it (metrics.json: init_scores); when the init run set aside an
internal test split (--test-ratio), both are also scored once on it (metrics.json: init_test, test). The
run's config records the head, loss and split it really used (the init run's). Without --init a fresh head
is built and the split is stage 1's for the same seed and split settings. N = 0 trains only the head on the
cached features through the stage-1 code path, so it reproduces `heads train` exactly (tested).

`--init` a cross-fit run (`heads train --folds K`) works fold by fold (finetune_folds): fold k's head, with
its own copy of the top text layers, trains on the rows it trained on and is early-stopped on fold k (the
init run's folds, by guid); the result is one cross-fit run (K head and K text-layer files, one config)
scored on its out-of-fold predictions by heads.train.crossfit, and `heads predict` averages the K models.

The run directory is a stage-1 run's (config.json stage "finetune": how `heads predict` recognises it) plus
text_layers.safetensors with ONLY the unfrozen parameters. R-Drop, --tune-bias and image views are stage-1
options (TrainConfig); stage 2 runs bf16 autocast on CUDA devices that compute it natively (runtime.native_bf16) only.
"""
from __future__ import annotations

import copy
import os
import time
from dataclasses import asdict, replace

import numpy as np
import torch

from featcache.device import resolve_device
from featcache.env import environment
from featcache.errors import ConfigError
from featcache.text_tower import load_text_backbone

from ..config import FinetuneConfig, TrainConfig
from ..data.cache import CacheData, load_cache
from ..data.splits import Split, split_from_guids, split_labelled
from ..data.text_layers import stage2_keys, with_text_inputs
from ..fusions import HeadDims, create_fusion, get_fusion
from ..infer import infer, load_head, load_heads, mean_log_proba, softmax
from ..report import figures
from ..report.console import print_summary
from ..rundir import (HEAD_FILE, TEXT_LAYERS_FILE, RunRecord, cache_info, check_cache, head_files, load_json,
                      read_config, write_run)
from .loop import Trainer
from .losses import build_loss
from .metrics import check_metric_classes, compute_metrics, quick_scores
from .runtime import native_bf16, seed_everything, set_threads
from .crossfit import CrossfitResult, finish_crossfit, write_crossfit
from .stage1 import TrainResult
from .text_model import FinetuneModel


def finetune(cfg: FinetuneConfig, data: str | os.PathLike | CacheData, out_dir: str | None = None,
             console=None) -> TrainResult | CrossfitResult:
    """Stage 2 end to end; writes the run directory when out_dir is given. User mistakes raise
    ValueError / CacheError / FileNotFoundError before any training. From a cross-fit --init run: one
    stage-2 model per fold (finetune_folds) and a CrossfitResult."""
    cfg = _with_init(cfg.validate())
    say = (lambda m: console.print(m, highlight=False)) if console is not None else (lambda m: None)
    t_start = time.perf_counter()
    if not isinstance(data, CacheData):  # the head's inputs, and what the text layers read
        keys = get_fusion(cfg.head.fusion).inputs + (stage2_keys(cfg.text_forward) if cfg.text_layers else ())
        data = load_cache(str(data), keys=keys, texts=bool(cfg.text_layers))
    device = resolve_device(cfg.device)
    set_threads(cfg.threads)
    check_metric_classes(cfg.optim.metric, data.classes, data.path)
    if cfg.init and len(head_files(read_config(cfg.init))) > 1:
        return finetune_folds(cfg, data, device, say, t_start, out_dir, console)
    head, split = _init_head(cfg, data, device) if cfg.init else \
        (None, split_labelled(data, cfg.split, cfg.seed, say))  # the order of seeded steps of `heads train`
    text, data = _text_inputs(cfg, data, device, say)
    seed_everything(cfg.seed)
    if head is None:
        head = create_fusion(cfg.head, HeadDims(**data.dims(), num_classes=len(data.classes))).to(device)
    model = FinetuneModel(head, text, cfg.text_layers, cached="text_states" in data.features).to(device)
    t_loaded = time.perf_counter()
    # An init run with an internal test split (heads train --test-ratio): both the init head and the final
    # model are scored once on those rows, which neither stage ever selected on. Validation gains of stage 2
    # are a best-of-epochs pick against a head that was itself picked on validation; this is the check.
    init_test = infer(model, data, split.test, device, cfg.eval_batch_size)["logits"] if split.test.size \
        else None
    result = _fit(cfg, model, data, split, device, say, t_loaded)
    metrics = result.metrics
    if init_test is not None:
        y_test = data.labels[split.test]
        metrics["init_test"] = compute_metrics(y_test, init_test.argmax(1), data.classes, init_test)
    metrics["timing"] = {"setup_s": t_loaded - t_start, **metrics["timing"]}
    if out_dir is not None:
        result.run_dir = _write(out_dir, cfg, model, data, split, metrics, result.history, result.val_logits, device)
    if console is not None:
        print_summary(metrics, result.run_dir, console)
    return result


def _text_inputs(cfg: FinetuneConfig, data: CacheData, device, say):
    """(the cache's text backbone with its top N layers unlocked, None for N = 0; data with the stage-2
    inputs, on `device`)."""
    n, text = cfg.text_layers, None
    if n:
        text = load_text_backbone(data.meta)
        if n > text.num_layers:
            raise ConfigError(f"--unfreeze-text {n}: {data.meta['backbone']['text']} has {text.num_layers} layers")
        text.lock(n)
        text.to(device)
        data = with_text_inputs(data, text, n, cfg.text_forward, device, say)
    return text, data.to_device(device)  # CUDA: once, after stage 2's arrays (input_ids, frozen states) are added


def _fit(cfg: FinetuneConfig, model, data: CacheData, split: Split, device, say, t_loaded: float) -> TrainResult:
    """Train `model` on split.train, early-stopped on split.val: its validation logits and metrics (the
    internal test and held-out splits scored once)."""
    trainer = _trainer(cfg, model, data, split, device, say)
    history = trainer.run()
    if trainer.best_epoch == 0:
        say(f"no epoch beat the --init head ({cfg.optim.metric} {trainer.best_score:.4f}); kept its weights")
    t_trained = time.perf_counter()
    logits = infer(model, data, split.val, device, cfg.eval_batch_size)["logits"]
    metrics = _metrics(cfg, model, data, split, device, trainer, logits)
    metrics["timing"] = {"train_s": t_trained - t_loaded, "device": str(device), "threads": torch.get_num_threads(),
                         "epoch_s": [round(r["seconds"], 3) for r in history]}
    return TrainResult(None, metrics, history, model, split, logits)


def finetune_folds(cfg: FinetuneConfig, data: CacheData, device, say, t_start: float, out_dir=None,
                   console=None) -> CrossfitResult:
    """Stage 2 from a cross-fit run, fold by fold: fold k's head, with its own copy of the top text layers,
    trains on the rows that head trained on and is early-stopped on fold k (the init run's folds, from its
    split.json by guid); then scored on the out-of-fold predictions and written as one cross-fit run
    (heads.train.crossfit.finish_crossfit, the code `heads train --folds` ends with)."""
    heads, saved = load_heads(cfg.init, device)
    check_cache(cfg.init, saved, data.path, data.meta, data.classes)
    splits = _fold_splits(cfg.init, data)
    if len(splits) != len(heads):
        raise ConfigError(f"--init {cfg.init}: {len(heads)} fold heads but {len(splits)} folds in its split.json; "
                          "the run is incomplete or was edited")
    text, data = _text_inputs(cfg, data, device, say)
    cached = "text_states" in data.features
    # Each fold fine-tunes its own copy of the top layers (they train in place); the frozen states are shared.
    models = [FinetuneModel(h, copy.deepcopy(text), cfg.text_layers, cached=cached).to(device) for h in heads]
    test = splits[0].test
    init_test = mean_log_proba(models, data, test, device, cfg.eval_batch_size) if test.size else None
    results = []
    for k, (model, split) in enumerate(zip(models, splits)):
        say(f"fold {k + 1} of {len(splits)}")
        seed_everything(cfg.seed)
        results.append(_fit(cfg, model, data, split, device, say, time.perf_counter()))
    result = finish_crossfit(cfg, data, results, t_start)
    result.metrics.update({k: results[0].metrics[k] for k in ("stage", "text_layers", "init", "text_forward")},
                          init_scores=[r.metrics.get("init_scores") for r in results])
    if init_test is not None:  # the init run's averaged heads on the same test rows, before any stage-2 step
        result.metrics["init_test"] = compute_metrics(data.labels[test], init_test.argmax(1), data.classes, init_test)
    if out_dir is not None:
        result.run_dir = write_crossfit(out_dir, cfg, data, result, stage="finetune")
    if console is not None:
        print_summary(result.metrics, result.run_dir, console)
    return result


def _fold_splits(init: str, data: CacheData) -> list[Split]:
    """Fold k of a cross-fit run's split.json: validates on its fold_val[k], trains on every other fold."""
    saved = load_json(os.path.join(init, "split.json"))
    splits = []
    for val in saved.get("fold_val") or []:
        held = set(val)
        fold = {**saved, "train": [g for g in saved["train"] if g not in held], "val": val}
        splits.append(split_from_guids(data, fold, f"{init}/split.json"))
    return splits


def _with_init(cfg: FinetuneConfig) -> FinetuneConfig:
    """With --init: the head, loss and split settings of that stage-1 run (what stage 2 really uses)."""
    if not cfg.init:
        return cfg
    saved = read_config(cfg.init)
    if saved["stage"] != "train":
        raise ConfigError(f"--init {cfg.init} is a {saved['stage']} run; give the stage-1 run it started from")
    stage1 = TrainConfig.from_flat(saved["train"])
    if cfg.split.split_file or cfg.split.val_split != "auto":
        raise ConfigError(f"--init {cfg.init} brings its own split (its split.json); --split-file and --val-split "
                          "apply only to a fresh head (without --init)")
    return replace(cfg, head=stage1.head, loss=stage1.loss, split=stage1.split)


def _init_head(cfg: FinetuneConfig, data: CacheData, device) -> tuple[torch.nn.Module, Split]:
    """The --init run's head (on `device`) and its train/val/test rows, by guid, after checking the cache."""
    head, saved = load_head(cfg.init, device)
    check_cache(cfg.init, saved, data.path, data.meta, data.classes)
    return head, split_from_guids(data, load_json(os.path.join(cfg.init, "split.json")),
                                  f"{cfg.init}/split.json")


def _trainer(cfg: FinetuneConfig, model, data: CacheData, split: Split, device, say) -> Trainer:
    """The Trainer with stage 2's loss step, validation scores and two learning rates (head, text layers)."""
    loss = build_loss(cfg.loss, list(split.counts["train_per_class"].values()))
    labels = torch.from_numpy(data.labels)
    train_rows = torch.from_numpy(split.train)
    y_val = data.labels[split.val]
    bf16 = device.type == "cuda" and native_bf16(device)  # never on the CPU, as before; emulated bf16 is slow
    normed = model.prenorm if device.type == "cpu" else ()  # the pre-normalised inputs stage 1 trains on

    def loss_fn(model, idx):
        rows = train_rows[idx]
        batch, y = data.batch(rows, device, model.inputs, normed=normed), labels[rows].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(batch)["logits"]
        return loss(logits.float() if logits.dtype != torch.float32 else logits, y)

    def evaluate(model):
        logits = infer(model, data, split.val, device, cfg.eval_batch_size)["logits"]
        val_loss = float(loss(torch.from_numpy(logits), torch.from_numpy(y_val)))
        return {"val_loss": val_loss, **quick_scores(y_val, logits.argmax(1), len(data.classes), logits)}

    metric = cfg.optim.metric
    groups = [(model.head.parameters(), cfg.optim.lr)]
    if cfg.text_layers:
        groups.append((model.text_params().values(), cfg.lr_text))
    return Trainer(model, cfg.optim, cfg.seed, len(split.train), loss_fn, evaluate,
                   on_epoch=lambda r: say(f"epoch {r['epoch']}: {metric} {r[metric]:.4f} "
                                          f"val_loss {r['val_loss']:.4f} ({r['seconds']:.1f}s)"),
                   lr_groups=groups, eval_at_start=bool(cfg.init), grad_accum=cfg.grad_accum)


def _metrics(cfg: FinetuneConfig, model, data: CacheData, split: Split, device, trainer: Trainer,
             logits: np.ndarray) -> dict:
    classes, y_val = data.classes, data.labels[split.val]
    metrics = compute_metrics(y_val, logits.argmax(1), classes, logits)
    metrics["classes"] = list(classes)
    metrics["counts"] = split.counts
    metrics["fusion"], metrics["modality"], metrics["metric"] = cfg.head.fusion, cfg.head.modality, cfg.optim.metric
    metrics["stage"], metrics["text_layers"], metrics["init"] = "finetune", cfg.text_layers, cfg.init
    metrics["text_forward"] = "none" if not cfg.text_layers else \
        ("cached" if "text_states" in model.inputs else "full")
    metrics["best_epoch"], metrics["epochs_run"] = trainer.best_epoch, len(trainer.history)
    metrics["head_params"] = sum(p.numel() for p in model.head.parameters())  # a cross-fit run sums its folds'
    if trainer.start_scores is not None:  # the --init head on the same split, before any stage-2 step
        metrics["init_scores"] = trainer.start_scores
    if split.test.size:
        y_test = data.labels[split.test]
        test = infer(model, data, split.test, device, cfg.eval_batch_size)["logits"]
        metrics["test"] = compute_metrics(y_test, test.argmax(1), classes, test)
    if split.heldout:  # the data's own labelled test splits, scored once with the selected model
        scored = {n: infer(model, data, rows, device, cfg.eval_batch_size)["logits"]
                  for n, rows in split.heldout.items()}
        metrics["heldout"] = {n: compute_metrics(data.labels[split.heldout[n]], out.argmax(1), classes, out)
                              for n, out in scored.items()}
    return metrics


def _write(out_dir, cfg: FinetuneConfig, model, data: CacheData, split: Split, metrics, history, logits,
           device) -> str:
    y_val, pred = data.labels[split.val], logits.argmax(1)
    record = RunRecord(
        stage="finetune", config=cfg.flat(), classes=data.classes,
        env=environment(str(device), torch.get_num_threads()), cache=cache_info(data.meta, data.path),
        split=split.record(data, seed=cfg.seed, **asdict(cfg.split), init=cfg.init), metrics=metrics,
        predictions={"guids": [data.guids[i] for i in split.val], "labels": y_val, "probs": softmax(logits),
                     "pred": pred},
        dims=asdict(model.head.dims), history=history,
        weights={HEAD_FILE: model.head.state_dict(), TEXT_LAYERS_FILE: model.text_params()})

    def draw(out_dir):
        figures.plot_history(history, os.path.join(out_dir, "curves.png"), cfg.optim.metric)
        figures.plot_confusion(np.array(metrics["confusion_matrix"]), data.classes,
                             os.path.join(out_dir, "confusion.png"))

    return write_run(out_dir, record, draw if cfg.plots else None)
