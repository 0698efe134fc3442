"""`heads finetune --unfreeze-text N` (stage 2): train the top N text layers together with a fusion head.

    cfg = FinetuneConfig(cache="cache/mvsa.h5", unfreeze_text=1, init="runs/film")
    result = finetune(cfg, "runs/film-ft1")

Nothing frozen runs in the loop: image features come from the cache (the image tower never runs) and the
text starts from the cache's text_hidden/states, the states entering block L-N (see ft_data.py); without
them the whole text tower runs every step and a message says so (`text_forward="full"` asks for that).

`--init RUN` starts from a stage-1 run: its head weights, its head/loss config and its train/val split
(split.json), so stage 1 vs stage 2 compare on the same validation rows; the init head is scored before the
first step and kept unless an epoch beats it (metrics.json: init_scores); when the init run set aside an
internal test split (--test-ratio), both are also scored once on it (metrics.json: init_test, test).
Without --init a fresh head is built and the split is stage 1's for the same seed and val_ratio. N = 0
trains only the head on the cached features through the stage-1 code path, so it reproduces `heads train`
exactly (tested).

The run directory has stage 1's files (config.json holds "finetune" next to "train"/"head": that key is
how `heads predict` recognises a stage-2 run) plus text_layers.safetensors with ONLY the unfrozen
parameters. R-Drop of an init run is not applied in stage 2 (two text forwards per step).
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from featcache.dataset import LABELS

from ..data.cache import CacheData, DataError, Split, load_cache, split_labelled
from ..fusions import DEFAULT_FUSION, create_fusion
from ..data.text_layers import model_batch, prepare_text_inputs
from .text_model import FinetuneModel, ft_logits, save_text_layers
from ..infer import softmax
from .losses import build_loss
from .metrics import compute_metrics, quick_scores
from .stage1 import TrainConfig, TrainResult, resolve_device, seed_everything
from .loop import Trainer, TrainerConfig

TEXT_FORWARDS = ("cached", "full")


@dataclass
class FinetuneConfig:
    cache: str
    unfreeze_text: int = 1
    init: str | None = None  # a stage-1 run directory: head weights, head config and split come from it
    # head options, used only without --init (a fresh head)
    fusion: str = DEFAULT_FUSION
    modality: str = "both"
    hidden: int = 128
    dropout: float = 0.1
    attn_heads: int = 4
    loss: str = "ce"
    label_smoothing: float = 0.0
    # optimisation (AdamW, linear warmup + cosine, per-group learning rates)
    lr_head: float = 2e-4  # below stage 1's 1e-3: an --init head is already trained
    lr_text: float = 5e-5
    epochs: int = 5
    batch_size: int = 32
    grad_accum: int = 1
    grad_clip: float = 1.0
    warmup_frac: float = 0.1
    weight_decay: float = 0.01
    patience: int = 3
    metric: str = "macro_f1"
    val_ratio: float = 0.2
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda (CUDA steps run under bf16 autocast)
    text_forward: str = "cached"  # cached: top N on stored states | full: the whole text tower every step
    eval_batch_size: int = 1024
    threads: int = 0
    plots: bool = True

    def validate(self) -> "FinetuneConfig":
        if self.unfreeze_text < 0:
            raise ValueError(f"--unfreeze-text must be >= 0, got {self.unfreeze_text}")
        if self.text_forward not in TEXT_FORWARDS:
            raise ValueError(f"text_forward must be one of {', '.join(TEXT_FORWARDS)}, got {self.text_forward!r}")
        if self.grad_accum < 1:
            raise ValueError(f"--grad-accum must be >= 1, got {self.grad_accum}")
        if self.lr_head < 0 or self.lr_text < 0:
            raise ValueError("learning rates must be >= 0")
        if self.init is not None and not os.path.isdir(self.init):
            raise FileNotFoundError(f"--init {self.init} is not a run directory")
        self.head_train_config().validate()  # fusion, loss, metric, modality, device, epochs
        return self

    def head_train_config(self) -> TrainConfig:
        """The stage-1 config a fresh head is built from (and that stage 1 would train with lr=lr_head)."""
        names = {f.name for f in fields(TrainConfig)}
        return TrainConfig(**{k: v for k, v in asdict(self).items() if k in names}, lr=self.lr_head)

    def trainer_config(self) -> TrainerConfig:
        names = {f.name for f in fields(TrainerConfig)}
        return TrainerConfig(**{k: v for k, v in asdict(self).items() if k in names}, lr=self.lr_head)


def _init_split(run: str, data: CacheData) -> Split:
    """The init run's train/val rows, by guid, with stage 1's counts."""
    from ..rundir import load_json
    saved = load_json(os.path.join(run, "split.json"))
    row = {g: i for i, g in enumerate(data.guids)}
    lost = [g for g in saved["train"] + saved["val"] + saved.get("test", []) if g not in row]
    if lost:
        raise DataError(f"{len(lost)} guids of {run}/split.json are not in {data.path} (e.g. {lost[0]}): the "
                        "init run was trained on another dataset")
    train = np.array([row[g] for g in saved["train"]], dtype=np.int64)
    val = np.array([row[g] for g in saved["val"]], dtype=np.int64)
    test = np.array([row[g] for g in saved.get("test", [])], dtype=np.int64)
    per = lambda idx: {LABELS[c]: int(n) for c, n in enumerate(np.bincount(data.labels[idx], minlength=len(LABELS)))}
    counts = {"samples": len(data), "labelled": int((data.labels >= 0).sum()),
              "unlabelled": int((data.labels < 0).sum()), "invalid": int((~data.valid).sum()),
              "invalid_excluded": int(((data.labels >= 0) & ~data.valid).sum()), "train": int(train.size),
              "val": int(val.size), "train_per_class": per(train), "val_per_class": per(val)}
    if test.size:
        counts.update(test=int(test.size), test_per_class=per(test))
    return Split(train=train, val=val, counts=counts, test=test)


def _load_init(cfg: FinetuneConfig, data: CacheData, device):
    from ..predict import check_compatible
    from ..rundir import load_head, load_json
    head, saved = load_head(cfg.init, device)
    if "finetune" in saved:
        raise ValueError(f"--init {cfg.init} is a finetune run; give the stage-1 run it started from")
    check_compatible(cfg.init, load_json(os.path.join(cfg.init, "cache.json")), data.path, data.meta)
    return head, TrainConfig(**saved["train"]), _init_split(cfg.init, data)


def finetune(cfg: FinetuneConfig, out_dir: str | None = None, console=None,
             data: CacheData | None = None) -> TrainResult:
    """Stage 2 end to end; writes the run directory when out_dir is given. User mistakes raise
    ValueError / CacheError / FileNotFoundError before any training."""
    cfg.validate()
    say = (lambda m: console.print(m, highlight=False)) if console is not None else (lambda m: None)
    t_start = time.perf_counter()
    data = data if data is not None else load_cache(cfg.cache)
    device = resolve_device(cfg.device)
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    n = cfg.unfreeze_text
    if cfg.init:
        head, train_cfg, split = _load_init(cfg, data, device)
    else:  # the same order of seeded steps as `heads train`, so N=0 reproduces it
        train_cfg, head = cfg.head_train_config(), None
        split = split_labelled(data, cfg.val_ratio, cfg.seed)

    text, inputs = None, None
    if n:
        from featcache.addon import load_text_backbone
        text = load_text_backbone(data.meta)
        if n > text.num_layers:
            raise ValueError(f"--unfreeze-text {n}: {data.meta['backbone']['text']} has {text.num_layers} layers")
        text.lock(n)
        text.to(device)
        inputs = prepare_text_inputs(data, text, n, cfg.text_forward, device, say)
    seed_everything(cfg.seed)
    if head is None:
        head = create_fusion(train_cfg.fusion, train_cfg.head_config(data.dims())).to(device)
    model = FinetuneModel(head, text, n).to(device)
    t_loaded = time.perf_counter()

    loss = build_loss(train_cfg.loss, list(split.counts["train_per_class"].values()), train_cfg.label_smoothing,
                      train_cfg.focal_gamma)
    labels = torch.from_numpy(data.labels)
    train_rows = torch.from_numpy(split.train)
    y_val = data.labels[split.val]

    def loss_fn(model, idx):
        rows = train_rows[idx]
        batch, y = model_batch(data, inputs, rows, device, model.inputs), labels[rows].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(batch)["logits"]
        return loss(logits.float() if logits.dtype != torch.float32 else logits, y)

    def evaluate(model):
        logits = ft_logits(model, data, inputs, split.val, device, cfg.eval_batch_size)
        val_loss = float(loss(torch.from_numpy(logits), torch.from_numpy(y_val)))
        return {"val_loss": val_loss, **quick_scores(y_val, logits.argmax(1), len(LABELS))}

    groups = [(head.parameters(), cfg.lr_head)] + ([(model.text_params().values(), cfg.lr_text)] if n else [])
    trainer = Trainer(model, cfg.trainer_config(), len(split.train), loss_fn, evaluate, cfg.metric,
                      on_epoch=lambda r: say(f"epoch {r['epoch']}: {cfg.metric} {r[cfg.metric]:.4f} "
                                             f"val_loss {r['val_loss']:.4f} ({r['seconds']:.1f}s)"),
                      lr_groups=groups, eval_at_start=bool(cfg.init))
    # An init run with an internal test split (heads train --test-ratio): both the init head and the final
    # model are scored once on those rows, which neither stage ever selected on. Validation gains of stage 2
    # are a best-of-epochs pick against a head that was itself picked on validation; this is the check.
    init_test = ft_logits(model, data, inputs, split.test, device, cfg.eval_batch_size) if split.test.size \
        else None
    history = trainer.run()
    if trainer.best_epoch == 0:
        say(f"no epoch beat the --init head ({cfg.metric} {trainer.best_score:.4f}); kept its weights")
    t_trained = time.perf_counter()

    logits = ft_logits(model, data, inputs, split.val, device, cfg.eval_batch_size)
    pred = logits.argmax(1)
    metrics = compute_metrics(y_val, pred)
    metrics["counts"] = split.counts
    metrics["fusion"], metrics["modality"], metrics["metric"] = train_cfg.fusion, train_cfg.modality, cfg.metric
    metrics["stage"], metrics["unfreeze_text"], metrics["init"] = "finetune", n, cfg.init
    metrics["text_forward"] = "none" if not n else ("cached" if inputs.hidden is not None else "full")
    metrics["best_epoch"], metrics["epochs_run"] = trainer.best_epoch, len(history)
    if trainer.start_scores is not None:  # the --init head on the same split, before any stage-2 step
        metrics["init_scores"] = trainer.start_scores
    if init_test is not None:
        y_test = data.labels[split.test]
        metrics["test"] = compute_metrics(y_test, ft_logits(model, data, inputs, split.test, device,
                                                            cfg.eval_batch_size).argmax(1))
        metrics["init_test"] = compute_metrics(y_test, init_test.argmax(1))
    metrics["timing"] = {"setup_s": t_loaded - t_start, "train_s": t_trained - t_loaded, "device": str(device),
                         "threads": torch.get_num_threads(),
                         "epoch_s": [round(r["seconds"], 3) for r in history]}
    run_dir = _write_run(out_dir, cfg, train_cfg, model, data, split, metrics, history, logits, pred) \
        if out_dir is not None else None
    if console is not None:
        from ..report import print_summary
        print_summary(metrics, run_dir, console)
    return TrainResult(run_dir, metrics, history, model, split, logits)


def _write_run(out_dir, cfg, train_cfg, model, data, split, metrics, history, logits, pred) -> str:
    from ..rundir import cache_info, save_head, save_json, write_predictions
    os.makedirs(out_dir, exist_ok=True)
    save_head(out_dir, model.head, train_cfg, model.head.cfg)
    save_json(os.path.join(out_dir, "config.json"),  # + "finetune": the marker predict dispatches on
              {"finetune": asdict(cfg), "train": asdict(train_cfg), "head": asdict(model.head.cfg)})
    save_text_layers(out_dir, model)
    save_json(os.path.join(out_dir, "cache.json"), cache_info(data.meta, data.path))
    save_json(os.path.join(out_dir, "split.json"), {
        "seed": cfg.seed, "val_ratio": cfg.val_ratio, "init": cfg.init,
        "train_per_class": split.counts["train_per_class"],
        "train": [data.guids[i] for i in split.train], "val": [data.guids[i] for i in split.val],
        "test": [data.guids[i] for i in split.test]})
    save_json(os.path.join(out_dir, "history.json"), history)
    y_val = data.labels[split.val]
    write_predictions(os.path.join(out_dir, "val_predictions.csv"), [data.guids[i] for i in split.val],
                      y_val, softmax(logits), pred)
    if cfg.plots:
        from .. import plots
        plots.plot_history(history, os.path.join(out_dir, "curves.png"), cfg.metric)
        plots.plot_confusion(np.array(metrics["confusion_matrix"]), LABELS, os.path.join(out_dir, "confusion.png"))
    save_json(os.path.join(out_dir, "metrics.json"), metrics)  # last: its presence means the run is complete
    return out_dir
