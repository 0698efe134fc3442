"""`heads train`: one fusion head from an in-memory cache, in seconds, into a self-describing run directory.

    cfg = TrainConfig(fusion="film", seed=0)
    result = train(cfg, "cache/mvsa.h5", "runs/film")          # or train(cfg, load_cache(...), ...)

`train` accepts an already loaded CacheData so that an ablation loads the cache once and trains many
configs from memory; with out_dir=None nothing is written. Runs are repeatable: the seed fixes the split,
the initialisation, dropout, modality dropout and the batch order.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from featcache.dataset import LABELS

from .bias import apply_bias, tune_bias
from ..data.cache import CacheData, Split, load_cache, split_labelled
from ..fusions import DEFAULT_FUSION, MODALITIES, HeadConfig, create_fusion, get_fusion
from ..infer import infer, softmax
from .losses import build_loss, rdrop_kl
from .metrics import check_metric, compute_metrics, quick_scores
from .loop import Trainer, TrainerConfig


@dataclass
class TrainConfig:
    fusion: str = DEFAULT_FUSION
    modality: str = "both"  # both | text | image
    loss: str = "ce"  # ce | weighted_ce | focal
    label_smoothing: float = 0.0
    focal_gamma: float = 2.0
    rdrop: float = 0.0  # weight of the R-Drop KL term (0 = off; each step then runs two forward passes)
    modality_dropout: float = 0.0
    hidden: int = 128
    dropout: float = 0.1
    attn_heads: int = 4
    epochs: int = 30
    # 128 / patience 3 / precision auto were measured on the shared cache (5 fusions x 3 seeds): heads peak
    # within ~3 epochs, bf16 halves the attention heads' projection cost, and macro-F1 stayed within seed
    # noise of batch 64 / patience 6 / fp32 while runs got 2-3x faster.
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_frac: float = 0.1
    patience: int = 3
    grad_clip: float = 1.0
    metric: str = "macro_f1"  # macro_f1 | accuracy | weighted_f1 (early stopping and best-state choice)
    val_ratio: float = 0.2
    test_ratio: float = 0.0  # > 0: a stratified internal test split, scored once at the end, never for selection
    seed: int = 0
    folds: int = 0  # 0: one val_ratio split; K >= 2: stratified K-fold CV and this run validates on `fold`
    fold: int = 0
    tune_bias: bool = False
    # Caches extracted with --image-views K: each epoch every training sample gets one of its K+1 stored image
    # views (clean or augmented), drawn with the run's seed; evaluation always uses the clean view. No effect
    # on a cache without views (metrics.json records the views actually used).
    image_aug_views: bool = True
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # fp32 | bf16 | auto: bf16 autocast for the training steps (evaluation stays fp32);
    # auto = bf16 where the hardware computes it natively (CUDA with bf16, CPUs with AVX512-BF16/AMX), else fp32
    threads: int = 0  # torch CPU threads (0 = all cores)
    eval_batch_size: int = 1024
    plots: bool = True

    def validate(self) -> "TrainConfig":
        get_fusion(self.fusion)  # raises with the valid names
        build_loss(self.loss, class_counts=[1] * len(LABELS), label_smoothing=self.label_smoothing)
        check_metric(self.metric)
        if self.modality not in MODALITIES:
            raise ValueError(f"unknown modality {self.modality!r}; valid: {', '.join(MODALITIES)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"unknown device {self.device!r}; valid: auto, cpu, cuda")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be at least 1")
        if self.precision not in ("fp32", "bf16", "auto"):
            raise ValueError(f"unknown precision {self.precision!r}; valid: fp32, bf16, auto")
        if not 0.0 <= self.test_ratio < 1.0:
            raise ValueError(f"test_ratio must be in [0, 1), got {self.test_ratio}")
        if self.rdrop < 0:
            raise ValueError(f"rdrop must be >= 0, got {self.rdrop}")
        if self.folds and (self.folds < 2 or not 0 <= self.fold < self.folds):
            raise ValueError(f"folds must be 0 or >= 2 with 0 <= fold < folds; got folds={self.folds}, "
                             f"fold={self.fold}")
        return self

    def trainer_config(self) -> TrainerConfig:
        names = {f.name for f in fields(TrainerConfig)}
        return TrainerConfig(**{k: v for k, v in asdict(self).items() if k in names})

    def head_config(self, dims: dict) -> HeadConfig:
        return HeadConfig(**dims, num_classes=len(LABELS), hidden=self.hidden, dropout=self.dropout,
                          attn_heads=self.attn_heads, modality=self.modality,
                          modality_dropout=self.modality_dropout)


@dataclass
class TrainResult:
    run_dir: str | None
    metrics: dict
    history: list[dict]
    model: torch.nn.Module
    split: Split
    val_logits: np.ndarray
    val_gate: np.ndarray | None = None


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but CUDA is not available here")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls are native (fast) here. Elsewhere autocast emulates them and is slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:  # not Linux: do not guess
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def seed_everything(seed: int) -> None:
    import random
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: TrainConfig, data: str | os.PathLike | CacheData, out_dir: str | None = None,
          console=None) -> TrainResult:
    """Train one head; write the run directory when out_dir is given. Raises ValueError/CacheError on user
    mistakes (unknown names, unusable cache) before any training."""
    cfg.validate()
    t_start = time.perf_counter()
    if not isinstance(data, CacheData):  # read only what this head consumes
        data = load_cache(str(data), keys=get_fusion(cfg.fusion).cls.inputs)
    t_loaded = time.perf_counter()
    split = split_labelled(data, cfg.val_ratio, cfg.seed, cfg.folds, cfg.fold, cfg.test_ratio)
    device = resolve_device(cfg.device)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and native_bf16(device))
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    seed_everything(cfg.seed)

    head_cfg = cfg.head_config(data.dims())
    model = create_fusion(cfg.fusion, head_cfg).to(device)
    labels = torch.from_numpy(data.labels)
    loss = build_loss(cfg.loss, list(split.counts["train_per_class"].values()), cfg.label_smoothing,
                      cfg.focal_gamma)
    train_rows = torch.from_numpy(split.train)
    y_val = data.labels[split.val]
    n_views = data.num_views() if cfg.image_aug_views else 0
    view_gen = torch.Generator().manual_seed(cfg.seed)  # its own stream: views do not shift the batch order

    def loss_fn(model, idx):
        rows = train_rows[idx]
        views = torch.randint(0, n_views + 1, (len(rows),), generator=view_gen) if n_views else None
        batch, y = data.batch(rows, device, model.inputs, views=views), labels[rows].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(batch)["logits"]
            logits2 = model(batch)["logits"] if cfg.rdrop > 0 else None  # second pass, other dropout masks
        if logits2 is None:
            return loss(logits, y)
        return 0.5 * (loss(logits, y) + loss(logits2, y)) + cfg.rdrop * rdrop_kl(logits, logits2)

    def evaluate(model):
        logits = infer(model, data, split.val, device, cfg.eval_batch_size)["logits"]
        val_loss = float(loss(torch.from_numpy(logits), torch.from_numpy(y_val)))
        return {"val_loss": val_loss, **quick_scores(y_val, logits.argmax(1), len(LABELS))}

    t_fit = time.perf_counter()
    trainer = Trainer(model, cfg.trainer_config(), len(split.train), loss_fn, evaluate, cfg.metric)
    history = trainer.run()
    t_trained = time.perf_counter()

    out = infer(model, data, split.val, device, cfg.eval_batch_size)
    logits, gate = out["logits"], out.get("gate")
    pred_untuned = logits.argmax(1)
    metrics = compute_metrics(y_val, pred_untuned)
    bias = None
    if cfg.tune_bias:
        # Tuned and scored on the same split: optimistic, hence the untuned numbers are kept alongside.
        bias = tune_bias(logits, y_val)
        metrics = {**compute_metrics(y_val, apply_bias(logits, bias).argmax(1)), "untuned": metrics,
                   "bias": {c: float(b) for c, b in zip(LABELS, bias)}}
    if cfg.test_ratio:  # scored once, with the head and bias that validation chose
        y_test = data.labels[split.test]
        test_logits = infer(model, data, split.test, device, cfg.eval_batch_size)["logits"]
        metrics["test"] = compute_metrics(y_test, apply_bias(test_logits, bias).argmax(1))
        if cfg.tune_bias:
            metrics["test"]["untuned"] = compute_metrics(y_test, test_logits.argmax(1))
    metrics["counts"] = split.counts
    metrics["image_views_used"] = n_views
    metrics["fusion"], metrics["modality"], metrics["metric"] = cfg.fusion, cfg.modality, cfg.metric
    metrics["best_epoch"], metrics["epochs_run"] = trainer.best_epoch, len(history)
    metrics["head_params"] = sum(p.numel() for p in model.parameters())  # size axis of the report page
    # train_s is the optimisation loop only; setup_s the split and model construction.
    metrics["timing"] = {"load_s": t_loaded - t_start, "setup_s": t_fit - t_loaded, "train_s": t_trained - t_fit,
                         "device": str(device), "threads": torch.get_num_threads(),
                         "precision": "bf16" if bf16 else "fp32"}
    pred = apply_bias(logits, bias).argmax(1)

    run_dir = None
    if out_dir is not None:
        run_dir = _write_run(out_dir, cfg, head_cfg, model, data, split, metrics, history, logits, pred,
                             pred_untuned if cfg.tune_bias else None, bias, gate)
    if console is not None:
        from ..report import print_summary
        print_summary(metrics, run_dir, console)
    return TrainResult(run_dir, metrics, history, model, split, logits, gate)


def _write_run(out_dir, cfg, head_cfg, model, data, split, metrics, history, logits, pred, pred_untuned,
               bias, gate) -> str:
    from ..rundir import cache_info, save_head, save_json, write_predictions

    os.makedirs(out_dir, exist_ok=True)
    save_head(out_dir, model, cfg, head_cfg)
    save_json(os.path.join(out_dir, "cache.json"), cache_info(data.meta, data.path))
    save_json(os.path.join(out_dir, "split.json"), {
        "seed": cfg.seed, "val_ratio": cfg.val_ratio, "test_ratio": cfg.test_ratio, "folds": cfg.folds,
        "fold": cfg.fold, "train_per_class": split.counts["train_per_class"],
        "train": [data.guids[i] for i in split.train], "val": [data.guids[i] for i in split.val],
        "test": [data.guids[i] for i in split.test]})
    if bias is not None:
        save_json(os.path.join(out_dir, "bias.json"), {"labels": list(LABELS), "offsets": bias.tolist()})
    save_json(os.path.join(out_dir, "history.json"), history)
    y_val = data.labels[split.val]
    write_predictions(os.path.join(out_dir, "val_predictions.csv"), [data.guids[i] for i in split.val],
                      y_val, softmax(logits), pred, pred_untuned)
    if cfg.plots:
        from .. import plots
        plots.plot_history(history, os.path.join(out_dir, "curves.png"), cfg.metric)
        plots.plot_confusion(np.array(metrics["confusion_matrix"]), LABELS, os.path.join(out_dir, "confusion.png"))
        if gate is not None:
            plots.plot_gate(gate, y_val, pred, LABELS, os.path.join(out_dir, "gate.png"))
    save_json(os.path.join(out_dir, "metrics.json"), metrics)  # last: its presence means the run is complete
    return out_dir
