"""A linear probe: logistic regression on standardized [text pooled ‖ image pooled], the floor every fusion
head has to beat (`heads ablate --probe`, configuration "logreg-probe" in the summary).

It uses exactly the train/validation split of the head runs it is compared with (same split_labelled
arguments), standardizes with training statistics only, and picks C by stratified 5-fold CV on the training
part only (macro-F1, the ablation's headline metric); no class weights. It writes a run directory with the
same files and metric keys as a head run (config.json holds {"probe": ProbeConfig}), so `heads report`
summarizes it like any other run.
"""
from __future__ import annotations

import inspect
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from featcache.dataset import LABELS

from ..data.cache import CacheData, split_labelled
from .metrics import compute_metrics

PROBE_NAME = "logreg-probe"


@dataclass
class ProbeConfig:
    seed: int = 0
    val_ratio: float = 0.2
    test_ratio: float = 0.0
    folds: int = 0
    fold: int = 0
    Cs: list = field(default_factory=lambda: [0.001, 0.01, 0.1, 1.0])
    cv: int = 5
    max_iter: int = 2000


def probe_specs(runs) -> list[tuple[str, ProbeConfig]]:
    """One probe per distinct split among the ablation's runs (seed, val_ratio, test_ratio, folds, fold)."""
    seen, out = set(), []
    for r in runs:
        t = r.train
        key = (t.seed, t.val_ratio, t.test_ratio, t.folds, t.fold)
        if key in seen:
            continue
        seen.add(key)
        name = f"probe=logreg,seed={t.seed}" + (f",fold={t.fold}" if t.folds else "")
        if t.val_ratio != 0.2:
            name += f",val_ratio={t.val_ratio}"
        if t.test_ratio:
            name += f",test_ratio={t.test_ratio}"
        out.append((name, ProbeConfig(seed=t.seed, val_ratio=t.val_ratio, test_ratio=t.test_ratio, folds=t.folds,
                                      fold=t.fold)))
    return out


def probe_done(run_dir: str, cfg: ProbeConfig) -> bool:
    from ..rundir import is_finished
    return is_finished(run_dir, "probe", asdict(cfg))


def pooled_features(data: CacheData, rows) -> np.ndarray:
    f = data.features
    return np.concatenate([f["text_pooled"][rows].float().numpy(), f["image_pooled"][rows].float().numpy()], 1)


def run_probe(cfg: ProbeConfig, data: CacheData, out_dir: str | None = None) -> dict:
    """Fit the probe on the split's training rows, score its validation rows; returns metrics (and writes the
    run directory when out_dir is given)."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    split = split_labelled(data, cfg.val_ratio, cfg.seed, cfg.folds, cfg.fold, cfg.test_ratio)
    y_train, y_val = data.labels[split.train], data.labels[split.val]
    t0 = time.perf_counter()
    inner = StratifiedKFold(n_splits=cfg.cv, shuffle=True, random_state=cfg.seed)
    # Newer scikit-learn warns unless these are explicit (plain L2, new attribute layout); older lacks them.
    params = inspect.signature(LogisticRegressionCV).parameters
    extra = {k: v for k, v in (("l1_ratios", (0.0,)), ("use_legacy_attributes", False)) if k in params}
    model = make_pipeline(StandardScaler(), LogisticRegressionCV(
        Cs=list(cfg.Cs), cv=inner, scoring="f1_macro", max_iter=cfg.max_iter, class_weight=None, **extra))
    model.fit(pooled_features(data, split.train), y_train)
    train_s = time.perf_counter() - t0

    def predict(rows):  # predict_proba's columns follow the classes seen in training; map them onto LABELS
        full = np.zeros((len(rows), len(LABELS)))
        full[:, model.classes_] = model.predict_proba(pooled_features(data, rows))
        return full

    full = predict(split.val)
    pred = full.argmax(1)
    metrics = compute_metrics(y_val, pred)
    if cfg.test_ratio:
        metrics["test"] = compute_metrics(data.labels[split.test], predict(split.test).argmax(1))
    metrics["counts"] = split.counts
    metrics["fusion"], metrics["modality"], metrics["metric"] = PROBE_NAME, "both", "macro_f1"
    metrics["C"] = float(np.ravel(model[-1].C_)[0])
    metrics["image_views_used"] = 0  # the probe always fits the clean pooled features
    metrics["head_params"] = int(model[-1].coef_.size + model[-1].intercept_.size)  # the probe's linear "head"
    metrics["timing"] = {"train_s": train_s}
    if out_dir is not None:
        _write_run(out_dir, cfg, data, split, full, pred, metrics)
    return metrics


def _write_run(out_dir, cfg, data, split, probs, pred, metrics) -> None:
    from ..rundir import cache_info, save_json, write_predictions

    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, "metrics.json")):
        os.remove(os.path.join(out_dir, "metrics.json"))
    save_json(os.path.join(out_dir, "config.json"), {"probe": asdict(cfg)})
    save_json(os.path.join(out_dir, "cache.json"), cache_info(data.meta, data.path))
    save_json(os.path.join(out_dir, "split.json"), {
        "seed": cfg.seed, "val_ratio": cfg.val_ratio, "test_ratio": cfg.test_ratio, "folds": cfg.folds,
        "fold": cfg.fold, "train": [data.guids[i] for i in split.train], "val": [data.guids[i] for i in split.val],
        "test": [data.guids[i] for i in split.test]})
    write_predictions(os.path.join(out_dir, "val_predictions.csv"), [data.guids[i] for i in split.val],
                      data.labels[split.val], probs, pred)
    save_json(os.path.join(out_dir, "metrics.json"), metrics)  # last: its presence means the run is complete
