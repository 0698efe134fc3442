"""A linear probe: logistic regression on standardized [text pooled ‖ image pooled], the floor every fusion
head has to beat (`heads ablate --probe`, configuration "logreg-probe" in the summary).

It uses exactly the train/validation split of the head runs it is compared with (same split_labelled
arguments), standardizes with training statistics only, and picks C by stratified 5-fold CV on the training
part only (macro-F1, the ablation's headline metric); no class weights. It writes a run directory with the
same files and metric keys as a head run (through heads.rundir.write_run; config.json: stage "probe", the
flat ProbeConfig under "probe"), so `heads report` summarizes it like any other run.
"""
from __future__ import annotations

import inspect
import os
import time
from dataclasses import asdict, astuple, dataclass, replace

import numpy as np

from featcache.env import environment

from ..config import ProbeConfig
from ..data.cache import CacheData
from ..data.stream import data_record
from ..data.splits import Split, split_labelled
from ..rundir import PROBE_NAME, RunRecord, cache_info, is_finished, write_run
from .crossfit import fold_configs, fold_summary, gather_oof, oof_counts
from .metrics import compute_metrics



def probe_specs(runs) -> list[tuple[str, ProbeConfig]]:
    """One probe per distinct split among the ablation's runs (seed and every SplitConfig field)."""
    seen, out = set(), []
    for r in runs:
        seed, s = r.train.seed, r.train.split
        key = (seed, *astuple(s))
        if key in seen:
            continue
        seen.add(key)
        name = f"probe=logreg,seed={seed}" + (f",folds={s.folds}" if s.folds else "")  # cross-fitted
        if s.val_ratio != 0.2:
            name += f",val_ratio={s.val_ratio}"
        if s.test_ratio:
            name += f",test_ratio={s.test_ratio}"
        if s.val_split != "auto":
            name += f",val_split={s.val_split}"
        if s.split_file:
            name += f",split_file={os.path.basename(os.path.normpath(s.split_file))}"
        out.append((name, ProbeConfig(seed=seed, split=replace(s))))
    return out


def probe_done(run_dir: str, cfg: ProbeConfig, cache_key: str | None) -> bool:
    return is_finished(run_dir, "probe", cfg.flat(), cache_key, lambda saved: ProbeConfig.from_flat(saved).flat())


def pooled_features(data: CacheData, rows) -> np.ndarray:
    b = data.batch(rows, keys=("text_pooled", "image_pooled"))  # through the batcher: a streamed cache too
    return np.concatenate([b["text_pooled"].numpy(), b["image_pooled"].numpy()], 1)


def run_probe(cfg: ProbeConfig, data: CacheData, out_dir: str | None = None) -> dict:
    """Fit the probe on the split's training rows, score its validation rows; returns metrics (and writes the
    run directory when out_dir is given). With split.folds = K (`heads ablate --folds K`, whose unit is a
    cross-fit run): K probes on crossfit's folds, scored on their out-of-fold predictions like a cross-fit
    head run, probabilities averaged on the test and held-out splits."""
    fits = [_fit(c, data) for c in (fold_configs(cfg, cfg.split.folds) if cfg.split.folds else [cfg])]
    split = fits[0].split
    if cfg.split.folds:
        rows, full = gather_oof([f.split.val for f in fits], [f.predict(f.split.val) for f in fits])
    else:
        rows, full = split.val, fits[0].predict(split.val)
    pred = full.argmax(1)
    metrics = compute_metrics(data.labels[rows], pred, data.classes, full)

    def held(held_rows):
        probs = np.mean([f.predict(held_rows) for f in fits], axis=0) if len(fits) > 1 else fits[0].predict(held_rows)
        return compute_metrics(data.labels[held_rows], probs.argmax(1), data.classes, probs)

    if cfg.split.test_ratio:
        metrics["test"] = held(split.test)
    if split.heldout:
        metrics["heldout"] = {name: held(r) for name, r in split.heldout.items()}
    metrics["classes"] = list(data.classes)
    metrics["counts"] = split.counts
    if cfg.split.folds:
        per_fold = [compute_metrics(data.labels[f.split.val], f.predict(f.split.val).argmax(1), data.classes)
                    for f in fits]
        metrics.update(folds=fold_summary(per_fold), crossfit=len(fits),
                       counts=oof_counts(split, rows, data.classes, len(fits), data.labels))
    metrics["fusion"], metrics["modality"], metrics["metric"] = PROBE_NAME, "both", "macro_f1"
    metrics["C"] = fits[0].C
    metrics["image_views_used"] = 0  # the probe always fits the clean pooled features
    metrics["head_params"] = sum(f.params for f in fits)  # the probe's linear "head"
    metrics["timing"] = {"train_s": sum(f.train_s for f in fits)}
    metrics["data"] = data_record(data)  # how its pooled features were read (in memory or streamed)
    if out_dir is not None:
        _write_run(out_dir, cfg, data, [f.split for f in fits], rows, full, pred, metrics)
    return metrics


@dataclass
class _Fit:
    split: Split
    predict: object  # rows -> (n, C) probabilities over every class
    C: float
    params: int
    train_s: float


def _fit(cfg: ProbeConfig, data: CacheData) -> _Fit:
    """The probe fitted on the training rows of cfg's split."""
    from sklearn.linear_model import LogisticRegressionCV  # heavy (with scipy): only probe runs pay for it
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    split = split_labelled(data, cfg.split, cfg.seed)
    y_train = data.labels[split.train]
    t0 = time.perf_counter()
    inner = StratifiedKFold(n_splits=cfg.cv, shuffle=True, random_state=cfg.seed)
    # Newer scikit-learn warns unless these are explicit (plain L2, new attribute layout); older lacks them.
    params = inspect.signature(LogisticRegressionCV).parameters
    extra = {k: v for k, v in (("l1_ratios", (0.0,)), ("use_legacy_attributes", False)) if k in params}
    # Two classes: scikit-learn 1.9 rebuilds the "f1_macro" scorer with pos_label twice and fails; the same
    # macro-F1 as a plain callable avoids that path (more classes keep the string: their C choice is unchanged).
    scoring = _binary_macro_f1 if len(data.classes) == 2 else "f1_macro"
    model = make_pipeline(StandardScaler(), LogisticRegressionCV(
        Cs=list(cfg.Cs), cv=inner, scoring=scoring, max_iter=cfg.max_iter, class_weight=None, **extra))
    model.fit(pooled_features(data, split.train), y_train)
    train_s = time.perf_counter() - t0

    def predict(rows):  # predict_proba's columns follow the classes seen in training; map them onto all classes
        full = np.zeros((len(rows), len(data.classes)))
        full[:, model.classes_] = model.predict_proba(pooled_features(data, rows))
        return full

    return _Fit(split, predict, float(np.ravel(model[-1].C_)[0]),
                int(model[-1].coef_.size + model[-1].intercept_.size), train_s)


def _binary_macro_f1(estimator, X, y) -> float:
    """The f1_macro scorer for a two-class probe: macro-F1 over both classes (zero_division 0)."""
    return compute_metrics(y, estimator.predict(X), ["0", "1"])["macro_f1"]


def _write_run(out_dir, cfg: ProbeConfig, data: CacheData, splits: list, rows, probs, pred, metrics) -> None:
    record = splits[0].record(data, seed=cfg.seed, **asdict(cfg.split))
    if len(splits) > 1:  # cross-fitted: every fold's validation rows (as `heads train --folds` records them)
        guids = [data.guids[i] for i in rows]
        record.update(fold=None, train=guids, val=guids,
                      fold_val=[[data.guids[i] for i in s.val] for s in splits])
    write_run(out_dir, RunRecord(
        stage="probe", config=cfg.flat(), classes=data.classes, env=environment("cpu"),
        cache=cache_info(data.meta, data.path), split=record, metrics=metrics,
        predictions={"guids": [data.guids[i] for i in rows], "labels": data.labels[rows], "probs": probs,
                     "pred": pred}))
