"""`heads ensemble RUN... --out DIR`: finished stage-1 runs of one cache combined into one run by averaging
their class probabilities; `heads predict --run DIR` applies it like any run.

    build_ensemble(["runs/film-cv5", "runs/gmu-cv5", "runs/cross-attn-cv5"], "runs/ens")

Members may be single heads, cross-fit runs (`heads train --folds K`, themselves K averaged heads) or other
fusions; they must have been trained on caches with the same feature signature and class names (the same
check predict makes). A member's probabilities are its heads' averaged softmax (no --tune-bias offsets: they
move one head's thresholds and do not carry over to an average).

Weighting: `equal` (1/n each) or `val`: each member weighted by its validation macro-F1 (metrics.json,
untuned with --tune-bias), normalised to sum 1. With cross-fit members of the same seed and K, those are
out-of-fold scores of the same rows, so the weights are not fitted on rows a member trained on.

The ensemble's own metrics.json scores the averaged validation probabilities when every member validated on
the same rows (cross-fit runs with one seed and K, or single runs with one seed); otherwise a member's
validation rows were training rows of another member, and there is no honest validation score: metrics.json
then lists the members' own metrics only (`validated: false`).

Run directory: config.json {"format": 2, "stage": "ensemble", "ensemble": {"members", "weights",
"weighting"}, "classes"}, cache.json and split.json of the first member (what predict checks and its
fallback tag), metrics.json, and val_predictions.csv when validated.
"""
from __future__ import annotations

import os
import shutil

import numpy as np

from featcache.errors import ConfigError
from featcache.outdir import atomic_dir

from .data.cache import CacheData
from .infer import infer, load_heads, mean_log_proba
from .rundir import (FORMAT, check_out_dir, load_json, read_config, read_predictions, save_json,
                     write_predictions)
from .train.metrics import compute_metrics

STAGE = "ensemble"
WEIGHTINGS = ("equal", "val")


def is_ensemble(run_dir: str) -> bool:
    path = os.path.join(run_dir, "config.json")
    return os.path.exists(path) and load_json(path).get("stage") == STAGE


def build_ensemble(runs: list[str], out: str, weighting: str = "equal") -> dict:
    """Write the ensemble run directory `out`; returns its metrics.json."""
    if weighting not in WEIGHTINGS:
        raise ConfigError(f"unknown weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)}")
    if len(runs) < 2:
        raise ConfigError(f"an ensemble needs at least two runs, got {len(runs)}")
    if any(os.path.realpath(r) == os.path.realpath(out) for r in runs):
        raise ConfigError(f"--out {out} is one of the runs; the ensemble needs a directory of its own")
    cfgs = [_member_config(r) for r in runs]
    sigs = [load_json(os.path.join(r, "cache.json")).get("signature") for r in runs]
    for r, cfg, sig in zip(runs[1:], cfgs[1:], sigs[1:]):
        if sig != sigs[0] or cfg["classes"] != cfgs[0]["classes"]:
            raise ConfigError(f"{r} was trained on a cache with other features or classes than {runs[0]}; an "
                              "ensemble combines runs of one cache")
    classes, metrics = cfgs[0]["classes"], [load_json(os.path.join(r, "metrics.json")) for r in runs]
    raw = [m.get("untuned", m)["macro_f1"] for m in metrics] if weighting == "val" else [1.0] * len(runs)
    weights = (np.asarray(raw, dtype=np.float64) / np.sum(raw)).tolist()
    check_out_dir(out)
    with atomic_dir(out, "nothing was kept (an earlier run there is unchanged); free some space (or fix the "
                    "disk) and run `heads ensemble` again") as tmp:  # whole or not at all, as write_run
        save_json(os.path.join(tmp, "config.json"), {
            "format": FORMAT, "stage": STAGE, "classes": classes,
            "ensemble": {"members": [os.path.abspath(r) for r in runs], "weights": weights,
                         "weighting": weighting}})
        for name in ("cache.json", "split.json"):
            shutil.copyfile(os.path.join(runs[0], name), os.path.join(tmp, name))
        result = {"fusion": "ensemble(" + "+".join(c["train"]["fusion"] for c in cfgs) + ")", "modality": "both",
                  "members": [{"run": os.path.abspath(r), "weight": w, "macro_f1": m.get("macro_f1")}
                              for r, w, m in zip(runs, weights, metrics)], "classes": classes}
        result.update(_validate(runs, weights, classes, tmp))
        result["counts"] = metrics[0].get("counts", {})
        save_json(os.path.join(tmp, "metrics.json"), result)
    return result


def _member_config(run: str) -> dict:
    cfg = read_config(run)  # raises FileNotFoundError naming what is missing
    if cfg["stage"] != "train":
        raise ConfigError(f"{run} is a {cfg['stage']} run; an ensemble combines `heads train` runs (single or "
                          "--folds)")
    if not os.path.exists(os.path.join(run, "metrics.json")):
        raise ConfigError(f"{run} has no metrics.json: it did not finish; train it again")
    load_json(os.path.join(run, "split.json"))  # copied into the ensemble: a damaged one stops it before writing
    return cfg


def _validate(runs, weights, classes, out) -> dict:
    """The averaged validation probabilities' metrics, when every member validated on the same rows."""
    preds = [read_predictions(os.path.join(r, "val_predictions.csv")) for r in runs]
    by_guid = [{row["guid"]: row for row in p} for p in preds]
    guids = [row["guid"] for row in preds[0]]
    if any(set(g) != set(guids) for g in by_guid[1:]):
        return {"validated": False}
    probs = sum(w * np.array([[float(g[guid][f"p_{c}"]) for c in classes] for guid in guids])
                for w, g in zip(weights, by_guid))
    y = np.array([classes.index(preds[0][k]["label"]) for k in range(len(guids))])
    pred = probs.argmax(1)
    write_predictions(os.path.join(out, "val_predictions.csv"), guids, y, probs, pred, classes)
    return {"validated": True, **compute_metrics(y, pred, classes, np.log(np.clip(probs, 1e-12, None)))}


def ensemble_inputs(run_dir: str) -> tuple[str, ...]:
    """Every cache array the members' heads read (the cache is loaded once for all of them)."""
    keys: list[str] = []
    for member in load_json(os.path.join(run_dir, "config.json"))["ensemble"]["members"]:
        models, _ = load_heads(member)
        keys += [k for k in models[0].inputs if k not in keys]
    return tuple(keys)


def ensemble_log_proba(run_dir: str, data: CacheData, rows, device="cpu", batch_size: int = 1024) -> np.ndarray:
    """log of the members' weighted averaged probabilities (n, C) on `rows` of `data`."""
    spec = load_json(os.path.join(run_dir, "config.json"))["ensemble"]
    total = 0.0
    for member, weight in zip(spec["members"], spec["weights"]):
        models, _ = load_heads(member, device)
        if len(models) == 1:
            logits = infer(models[0], data, rows, device, batch_size)["logits"]
            logits = logits - logits.max(1, keepdims=True)
            probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        else:
            probs = np.exp(mean_log_proba(models, data, rows, device, batch_size))
        total = total + weight * probs
    return np.log(np.clip(total, 1e-12, None)).astype(np.float32)
