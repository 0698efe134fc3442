"""`heads train`: one fusion head from an in-memory cache, in seconds, into a self-describing run directory.

    cfg = TrainConfig.from_flat(fusion="film", seed=0)
    result = train(cfg, "cache/mvsa.h5", "runs/film")          # or train(cfg, load_cache(...), ...)

`train` accepts an already loaded CacheData (or a StreamData, heads.data.stream) so that an ablation loads
the cache once and trains many configs from it; with out_dir=None nothing is written. Runs are repeatable: the seed fixes the split,
the initialisation, dropout, modality dropout and the batch order.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from featcache.device import resolve_device
from featcache.env import environment

from ..config import TrainConfig
from ..data.cache import CacheData
from ..data.stream import data_record, describe_stream, load_data
from ..data.splits import Split, split_labelled
from ..fusions import HeadDims, create_fusion, get_fusion
from ..infer import infer, softmax
from ..report import figures
from ..report.console import print_summary
from ..rundir import HEAD_FILE, RunRecord, cache_info, write_run
from .bias import apply_bias, tune_bias
from .loop import Trainer
from .losses import build_loss, rdrop_kl
from .metrics import check_metric_classes, compute_metrics, quick_scores
from .runtime import native_bf16, seed_everything, set_threads


@dataclass
class TrainResult:
    run_dir: str | None
    metrics: dict
    history: list[dict]
    model: torch.nn.Module
    split: Split
    val_logits: np.ndarray
    val_gate: np.ndarray | None = None


def train(cfg: TrainConfig, data: str | os.PathLike | CacheData, out_dir: str | None = None,
          console=None) -> TrainResult:
    """Train one head; write the run directory when out_dir is given. Raises ValueError/CacheError on user
    mistakes (unknown names, unusable cache) before any training."""
    cfg.validate()
    t_start = time.perf_counter()
    if not isinstance(data, CacheData):  # read only what this head consumes
        data = load_data(str(data), keys=get_fusion(cfg.head.fusion).inputs, budget=cfg.memory_budget)
    t_loaded = time.perf_counter()
    check_metric_classes(cfg.optim.metric, data.classes, data.path)
    say = (lambda m: console.print(m, markup=False, highlight=False, soft_wrap=True)) if console is not None else None
    if say and data_record(data)["streamed"]:
        say(describe_stream(data))
    split = split_labelled(data, cfg.split, cfg.seed, say)
    data.keep(split.val)  # a streamed cache keeps the rows validated after every epoch in memory, if they fit
    device = resolve_device(cfg.device)
    data.to_device(device)  # CUDA: the arrays move to the GPU once (an ablation's later runs find them there)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and native_bf16(device))
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    model = create_fusion(cfg.head, HeadDims(**data.dims(), num_classes=len(data.classes))).to(device)
    n_views = data.num_views() if cfg.image_aug_views else 0

    t_fit = time.perf_counter()
    trainer = _trainer(cfg, model, data, split, device, bf16, n_views)
    history = trainer.run()
    t_trained = time.perf_counter()

    out = infer(model, data, split.val, device, cfg.eval_batch_size)
    logits, gate = out["logits"], out.get("gate")
    metrics, bias = _score(cfg, model, data, split, device, logits)
    metrics["counts"] = split.counts
    metrics["image_views_used"] = n_views
    metrics["data"] = data_record(data)
    metrics["fusion"], metrics["modality"], metrics["metric"] = cfg.head.fusion, cfg.head.modality, cfg.optim.metric
    metrics["best_epoch"], metrics["epochs_run"] = trainer.best_epoch, len(history)
    metrics["head_params"] = sum(p.numel() for p in model.parameters())  # size axis of the report page
    # train_s is the optimisation loop only; setup_s the split and model construction.
    metrics["timing"] = {"load_s": t_loaded - t_start, "setup_s": t_fit - t_loaded, "train_s": t_trained - t_fit,
                         "device": str(device), "threads": torch.get_num_threads(),
                         "precision": "bf16" if bf16 else "fp32"}
    pred = apply_bias(logits, bias).argmax(1)
    run_dir = None
    if out_dir is not None:
        run_dir = _write(out_dir, cfg, model, data, split, metrics, history, logits, pred, bias, gate, device)
    if console is not None:
        print_summary(metrics, run_dir, console)
    return TrainResult(run_dir, metrics, history, model, split, logits, gate)


def _trainer(cfg: TrainConfig, model, data: CacheData, split: Split, device, bf16: bool, n_views: int) -> Trainer:
    """The Trainer with stage 1's loss step (autocast, image views, R-Drop) and validation scores."""
    labels = torch.from_numpy(data.labels)
    loss = build_loss(cfg.loss, list(split.counts["train_per_class"].values()))
    train_rows = torch.from_numpy(split.train)
    y_val = data.labels[split.val]
    view_gen = torch.Generator().manual_seed(cfg.seed)  # its own stream: views do not shift the batch order
    # Training steps read the token arrays pre-normalised (by the batcher, without autograd; Projector.normed
    # folds the LayerNorm's affine into its Linear): no LayerNorm backward over (B, L, D) per step. On the CPU without
    # image views (a GPU batch is gathered on the device; a view is a different array). Validation and predict
    # read them so only for heads with normed_eval (heads.infer): film's keep the plain path, so predictions of
    # its older runs do not move.
    normed = model.prenorm if device.type == "cpu" and not n_views else ()
    normed_dtype = torch.bfloat16 if bf16 else torch.float32

    def loss_fn(model, idx):
        rows = train_rows[idx]
        views = torch.randint(0, n_views + 1, (len(rows),), generator=view_gen) if n_views else None
        batch = data.batch(rows, device, model.inputs, views=views, normed=normed, normed_dtype=normed_dtype)
        y = labels[rows].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(batch)["logits"]
            logits2 = model(batch)["logits"] if cfg.rdrop > 0 else None  # second pass, other dropout masks
        if logits2 is None:
            return loss(logits, y)
        return 0.5 * (loss(logits, y) + loss(logits2, y)) + cfg.rdrop * rdrop_kl(logits, logits2)

    def evaluate(model):
        logits = infer(model, data, split.val, device, cfg.eval_batch_size)["logits"]
        val_loss = float(loss(torch.from_numpy(logits), torch.from_numpy(y_val)))
        return {"val_loss": val_loss, **quick_scores(y_val, logits.argmax(1), len(data.classes), logits)}

    # Heads that read text tokens train on batches of similar text length (CacheData.epoch_order): less padding.
    group = cfg.optim.batch_size if "text_tokens" in model.inputs else 0
    return Trainer(model, cfg.optim, cfg.seed, len(split.train), loss_fn, evaluate,
                   order=lambda gen: data.epoch_order(split.train, gen, group))


def _score(cfg: TrainConfig, model, data: CacheData, split: Split, device, logits: np.ndarray):
    """(metrics, bias): validation metrics (tuned and untuned with --tune-bias) and the internal test's."""
    classes, y_val = data.classes, data.labels[split.val]
    metrics = compute_metrics(y_val, logits.argmax(1), classes, logits)
    bias = None
    if cfg.tune_bias:
        # Tuned and scored on the same split: optimistic, hence the untuned numbers are kept alongside.
        bias = tune_bias(logits, y_val)
        metrics = {**compute_metrics(y_val, apply_bias(logits, bias).argmax(1), classes, logits),
                   "untuned": metrics, "bias": {c: float(b) for c, b in zip(classes, bias)}}

    def held(rows):  # scored once, with the head and bias that validation chose
        y, out = data.labels[rows], infer(model, data, rows, device, cfg.eval_batch_size)["logits"]
        m = compute_metrics(y, apply_bias(out, bias).argmax(1), classes, out)
        if cfg.tune_bias:
            m["untuned"] = compute_metrics(y, out.argmax(1), classes, out)
        return m

    if cfg.split.test_ratio:
        metrics["test"] = held(split.test)
    if split.heldout:  # the data's own labelled test splits (test, dev_unseen, ...): one entry each
        metrics["heldout"] = {name: held(rows) for name, rows in split.heldout.items()}
    metrics["classes"] = list(classes)
    return metrics, bias


def _write(out_dir, cfg: TrainConfig, model, data: CacheData, split: Split, metrics, history, logits, pred, bias,
           gate, device) -> str:
    y_val = data.labels[split.val]
    predictions = {"guids": [data.guids[i] for i in split.val], "labels": y_val, "probs": softmax(logits),
                   "pred": pred}
    if bias is not None:
        predictions["pred_untuned"] = logits.argmax(1)
    record = RunRecord(
        stage="train", config=cfg.flat(), classes=data.classes, env=environment(str(device), torch.get_num_threads()),
        cache=cache_info(data.meta, data.path), split=split.record(data, seed=cfg.seed, **asdict(cfg.split)),
        metrics=metrics, predictions=predictions, dims=asdict(model.dims), history=history,
        bias=None if bias is None else bias.tolist(), weights={HEAD_FILE: model.state_dict()})

    def draw(out_dir):
        figures.plot_history(history, os.path.join(out_dir, "curves.png"), cfg.optim.metric)
        figures.plot_confusion(np.array(metrics["confusion_matrix"]), data.classes,
                             os.path.join(out_dir, "confusion.png"))
        if gate is not None:
            figures.plot_gate(gate, y_val, pred, data.classes, os.path.join(out_dir, "gate.png"))

    return write_run(out_dir, record, draw if cfg.plots else None)
