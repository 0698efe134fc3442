"""`heads train --folds K`: a cross-fit run, K heads over every labelled row, saved as ONE run directory.

    cfg = TrainConfig.from_flat(fusion="film", seed=0, folds=5)
    result = train_crossfit(cfg, "cache/mvsa.h5", "runs/film-cv5")

Why: a single head trains on 80% of the labelled rows and is early-stopped on a 20% split, so a fifth of the
labels never reach the weights and its scores move with the seed. Here the labelled rows are split into K
stratified folds (seeded: `split_labelled` with folds=K, fold=k: fold_configs), head k trains on the other K-1 folds and is early-stopped on fold k, so every
labelled row gets one out-of-fold (OOF) prediction from a head that never saw it. metrics.json scores those
OOF predictions of every labelled row (plus per-fold mean and std); `--tune-bias` tunes the offsets on the
OOF logits, so the offsets are not fitted on rows they are scored on by the same head's selection alone.
`heads predict` averages the K heads' probabilities (heads.infer.mean_log_proba).

The cache is loaded once; the K heads train (stage1.train with out_dir=None) at once in K forked workers
that share it, one CPU thread each (fold_workers: the numbers of `--threads 1`), or one after the other in
this process with --threads N or on a GPU. A --test-ratio share (and the data's other labelled splits) is set
aside before the folds and scored once with the averaged heads. The same code is the unit of `heads ablate
--folds K` (one cross-fit run per configuration and seed), and its scoring and writing (finish_crossfit,
write_crossfit) end stage 2 from a cross-fit run (`heads finetune --init`, fold by fold:
heads.train.stage2.finetune_folds).
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from featcache.env import environment
from featcache.errors import ConfigError

from ..config import TrainConfig
from ..data.cache import CacheData
from ..data.splits import stratified_kfold
from ..data.stream import data_record, describe_stream, load_data
from ..fusions import get_fusion
from ..infer import mean_log_proba, softmax
from ..parallel import count_workers, fork_map
from ..report import figures
from ..report.console import print_summary
from ..rundir import FOLD_FILE, TEXT_FOLD_FILE, RunRecord, cache_info, write_run
from .bias import apply_bias, tune_bias
from .metrics import compute_metrics
from .runtime import set_threads
from .stage1 import TrainResult, train

FOLD_KEYS = ("accuracy", "macro_f1", "weighted_f1")  # summarised per fold as mean and std


@dataclass
class CrossfitResult:
    run_dir: str | None
    metrics: dict
    folds: list[TrainResult]  # one per fold, in fold order
    oof_rows: np.ndarray  # every cross-fitted row, sorted
    oof_logits: np.ndarray  # (len(oof_rows), C): each row's logits from the head that did not train on it
    bias: np.ndarray | None = None  # --tune-bias offsets, tuned on the OOF logits


def fold_configs(cfg, folds: int) -> list:
    """The K fold configs of a cross-fit: fold k validates on the k-th of `folds` stratified folds
    (split_labelled). Any config with a SplitConfig: TrainConfig, FinetuneConfig, ProbeConfig (the probe of
    `heads ablate --probe --folds K`)."""
    return [cfg.with_flat(folds=folds, fold=k) for k in range(folds)]


def fold_workers(cfg: TrainConfig, streamed: bool = False) -> int:
    """How many folds train side by side: on the CPU, when the run may use every core (threads=0, the default)
    and there is more than one, every fold at once in its own forked worker with one thread
    (heads.parallel.fork_map): small heads use two threads poorly, and with fewer cores than folds, workers taking
    folds in rounds leave cores idle in the last round (five folds on two cores: three rounds, the last on one
    core), while K workers sharing the cores keep them all busy to the end (whole commands timed in 4
    interleaved pairs on 2 cores: 1.10x faster, 1.02x-1.14x). A `streamed` cache keeps one worker per core:
    each holds its own block buffers and kept rows, which the memory budget counts once. The numbers are those
    of `--threads 1` (the thread count changes floating-point sums), whatever the number of cores. 1 (one fold
    after another) with --threads N, on a GPU, on one core, or inside an ablation worker (threads=1)."""
    per_core = count_workers(0, [cfg] * cfg.split.folds) if cfg.threads == 0 else 1
    return per_core if streamed or per_core == 1 else cfg.split.folds


def train_crossfit(cfg: TrainConfig, data: str | os.PathLike | CacheData, out_dir: str | None = None,
                   console=None) -> CrossfitResult:
    """Train cfg.split.folds heads (K >= 2), score their OOF predictions, write one run directory."""
    folds = cfg.split.folds
    if folds < 2:
        raise ConfigError(f"--folds must be at least 2 for a cross-fit run, got {folds}")
    cfg.validate()
    t_start = time.perf_counter()
    if not isinstance(data, CacheData):  # once, for all K heads
        data = load_data(str(data), keys=get_fusion(cfg.head.fusion).inputs, budget=cfg.memory_budget)
        if console is not None and data_record(data)["streamed"]:
            console.print(describe_stream(data), markup=False, highlight=False, soft_wrap=True)
    # Each fold head is early-stopped on its own fold; bias and plots belong to the whole run.
    workers = fold_workers(cfg, streamed=data_record(data)["streamed"])
    one = cfg.with_flat(threads=1) if workers > 1 else cfg
    fold_cfgs = [fc.with_flat(tune_bias=False, plots=False, test_ratio=cfg.split.test_ratio)
                 for fc in fold_configs(one, folds)]
    if workers > 1:
        stratified_kfold()  # imported once here, inherited by the fold workers
    results = fork_map(lambda fc: train(fc, data), fold_cfgs, workers)
    if workers > 1:
        set_threads(1)  # the averaged heads score the held-out rows as a --threads 1 run does
    result = finish_crossfit(cfg, data, results, t_start)
    result.metrics["timing"]["workers"] = workers
    if out_dir is not None:
        result.run_dir = write_crossfit(out_dir, cfg, data, result)
    if console is not None:
        print_summary(result.metrics, result.run_dir, console)
    return result


def finish_crossfit(cfg, data: CacheData, results: list[TrainResult], t_start: float) -> CrossfitResult:
    """The K trained folds -> their OOF predictions and metrics (and bias). Shared by stage 1 (here) and stage
    2 from a cross-fit run (heads.train.stage2.finetune_folds, whose folds are TrainResults too)."""
    rows, logits = gather_oof([r.split.val for r in results], [r.val_logits for r in results])
    metrics, bias = score_oof(cfg, data, results, rows, logits)
    timing = results[0].metrics["timing"]
    metrics["timing"] = {"total_s": time.perf_counter() - t_start,
                         "train_s": sum(r.metrics["timing"]["train_s"] for r in results),
                         **{k: timing[k] for k in ("device", "threads", "precision") if k in timing}}
    return CrossfitResult(None, metrics, results, rows, logits, bias)


def gather_oof(vals: list[np.ndarray], outputs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(rows, outputs) of every fold's validation rows, in row order: the out-of-fold predictions (also the
    probe's, heads.train.probe)."""
    rows = np.concatenate(vals)
    order = np.argsort(rows)
    if np.unique(rows).size != rows.size:  # a fold split bug would silently double-count rows
        raise AssertionError("cross-fit folds overlap")
    return rows[order], np.concatenate(outputs)[order]


def fold_summary(per_fold: list[dict]) -> dict:
    """metrics.json "folds": each FOLD_KEYS number per fold, with its mean and std over the folds."""
    return {k: {"per_fold": [m[k] for m in per_fold], "mean": float(np.mean([m[k] for m in per_fold])),
                "std": float(np.std([m[k] for m in per_fold]))} for k in FOLD_KEYS}


def oof_counts(split, rows: np.ndarray, classes, folds: int, labels: np.ndarray) -> dict:
    """metrics.json "counts" of a cross-fit run: every OOF row both trains (in K-1 folds) and validates once."""
    counts = dict(split.counts)
    y = labels[rows]
    counts.update(train=int(rows.size), val=int(rows.size), folds=folds,
                  train_per_class={c: int((y == k).sum()) for k, c in enumerate(classes)})
    counts["val_per_class"] = counts["train_per_class"]
    return counts


def score_oof(cfg, data: CacheData, results: list[TrainResult], rows, logits):
    """(metrics, bias): the OOF metrics (tuned and untuned with --tune-bias), per-fold summary, held-out.
    `cfg` is the run's TrainConfig, or a FinetuneConfig (no bias tuning in stage 2)."""
    classes, y = data.classes, data.labels[rows]
    metrics = compute_metrics(y, logits.argmax(1), classes, logits)
    bias = None
    if getattr(cfg, "tune_bias", False):
        bias = tune_bias(logits, y)  # on the OOF logits: each row scored by a head that did not train on it
        metrics = {**compute_metrics(y, apply_bias(logits, bias).argmax(1), classes, logits),
                   "untuned": metrics, "bias": {c: float(b) for c, b in zip(classes, bias)}}
    metrics["folds"] = fold_summary([r.metrics for r in results])
    metrics["folds"]["best_epoch"] = [r.metrics["best_epoch"] for r in results]
    models, first = [r.model for r in results], results[0]
    device = next(first.model.parameters()).device

    def held(held_rows):  # the averaged heads, scored once
        out = mean_log_proba(models, data, held_rows, device, cfg.eval_batch_size)
        m = compute_metrics(data.labels[held_rows], apply_bias(out, bias).argmax(1), classes, out)
        if bias is not None:
            m["untuned"] = compute_metrics(data.labels[held_rows], out.argmax(1), classes, out)
        return m

    if first.split.test.size:
        metrics["test"] = held(first.split.test)
    if first.split.heldout:
        metrics["heldout"] = {name: held(r) for name, r in first.split.heldout.items()}
    metrics.update(counts=oof_counts(first.split, rows, classes, len(results), data.labels), classes=list(classes), fusion=cfg.head.fusion, modality=cfg.head.modality,
                   metric=cfg.optim.metric, best_epoch=max(r.metrics["best_epoch"] for r in results),
                   epochs_run=sum(r.metrics["epochs_run"] for r in results),
                   head_params=sum(r.metrics["head_params"] for r in results),
                   image_views_used=first.metrics.get("image_views_used", 0), crossfit=len(results))
    return metrics, bias


def write_crossfit(out_dir, cfg, data: CacheData, result: CrossfitResult, stage: str = "train") -> str:
    """One run directory: K fold heads (stage 2: and K text-layer files), one config (folds=K), split.json with
    every fold's rows by guid."""
    results, rows, logits, metrics, bias = result.folds, result.oof_rows, result.oof_logits, result.metrics, \
        result.bias
    guids = lambda idx: [data.guids[i] for i in idx]  # noqa: E731
    pred = apply_bias(logits, bias).argmax(1)
    predictions = {"guids": guids(rows), "labels": data.labels[rows], "probs": softmax(logits), "pred": pred}
    if bias is not None:
        predictions["pred_untuned"] = logits.argmax(1)
    first = results[0].split
    split = {"seed": cfg.seed, **asdict(cfg.split), **first.source, "fold": None,
             "train_per_class": metrics["counts"]["train_per_class"], "train": guids(rows), "val": guids(rows),
             "test": guids(first.test), "fold_val": [guids(r.split.val) for r in results]}
    if first.heldout:
        split["heldout"] = {name: guids(r) for name, r in first.heldout.items()}
    files = [FOLD_FILE.format(k) for k in range(len(results))]
    device = next(results[0].model.parameters()).device
    heads = [getattr(r.model, "head", r.model) for r in results]  # stage 2: the FinetuneModel's head
    weights = {f: h.state_dict() for f, h in zip(files, heads)}
    if stage == "finetune":  # the init run it started from, and each fold's unfrozen text layers
        split["init"] = cfg.init
        weights.update({TEXT_FOLD_FILE.format(k): r.model.text_params() for k, r in enumerate(results)})
    record = RunRecord(
        stage=stage, config=cfg.flat(), classes=data.classes, env=environment(str(device), torch.get_num_threads()),
        cache=cache_info(data.meta, data.path), split=split, metrics=metrics, predictions=predictions,
        dims=asdict(heads[0].dims), history=[{"fold": k, **h} for k, r in enumerate(results) for h in r.history],
        bias=None if bias is None else bias.tolist(), weights=weights, heads=files)
    return write_run(out_dir, record, _draw(cfg, data, metrics) if cfg.plots else None)


def _draw(cfg: TrainConfig, data: CacheData, metrics: dict):
    def draw(out_dir):
        figures.plot_confusion(np.array(metrics["confusion_matrix"]), data.classes,
                               os.path.join(out_dir, "confusion.png"))
    return draw
