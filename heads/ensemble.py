"""`heads ensemble RUN... --out DIR`: finished stage-1 runs combined into one run by averaging their class
probabilities; `heads predict --run DIR` applies it like any run.

    build_ensemble(["runs/film-cv5", "runs/gmu-cv5", "runs/cross-attn-cv5"], "runs/ens")
    build_ensemble(["runs/minilm-cv5", "runs/mpnet-cv5"], "runs/two-backbones")   # two caches of one dataset

Members may be single heads, cross-fit runs (`heads train --folds K`, themselves K averaged heads) or other
fusions, with the same class names. They may come from caches of different backbones (member_groups: the
members grouped by the features they read); predicting then takes one cache per group (`--cache a.h5,b.h5`,
matched by feature signature, rows matched by guid), and `--data` extracts one per group. A member's
probabilities are its heads' averaged softmax (no --tune-bias offsets: they move one head's thresholds and do
not carry over to an average).

Weighting: `equal` (1/n each) or `val`: each member weighted by its validation macro-F1 (metrics.json,
untuned with --tune-bias), normalised to sum 1. With cross-fit members those are out-of-fold scores of every
labelled row, so the weights are not fitted on rows a member trained on.

The ensemble's own metrics.json scores the averaged validation probabilities when every member validated on
the same rows: cross-fit runs (any seeds and K: each scores every labelled row out of fold, so each row's average
comes from heads that never trained on it; `out_of_fold: true`), or single runs with one seed. Otherwise a
member's validation rows were training rows of another member, and there is no honest validation score:
metrics.json then lists the members' own metrics only (`validated: false`).

Run directory: config.json {"format": 2, "stage": "ensemble", "ensemble": {"members", "weights",
"weighting"}, "classes"}: members relative to the ensemble's parent directory, so runs/ holding an ensemble and
its members moves whole (older ensembles stored absolute paths, which still load); cache.json and split.json of
the first member (its fallback tag), metrics.json, and val_predictions.csv when validated. Each member's own cache.json says which cache features it reads.
"""
from __future__ import annotations

import os
import shutil

import numpy as np

from featcache.cache.manifest import open_cache
from featcache.cache.store import CacheError, feature_signature
from featcache.errors import ConfigError
from featcache.outdir import atomic_dir

from .data.cache import CacheData, split_rows
from .data.stream import load_data
from .infer import infer, load_heads, mean_log_proba
from .rundir import (FORMAT, check_cache, check_out_dir, load_json, read_config, read_predictions,
                     recorded_signature, save_json, write_predictions)
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
    for r, cfg in zip(runs[1:], cfgs[1:]):
        if cfg["classes"] != cfgs[0]["classes"]:
            raise ConfigError(f"{r} predicts the classes {', '.join(cfg['classes'])}, {runs[0]} "
                              f"{', '.join(cfgs[0]['classes'])}; an ensemble combines runs of one set of classes")
    classes, metrics = cfgs[0]["classes"], [load_json(os.path.join(r, "metrics.json")) for r in runs]
    raw = [m.get("untuned", m)["macro_f1"] for m in metrics] if weighting == "val" else [1.0] * len(runs)
    weights = (np.asarray(raw, dtype=np.float64) / np.sum(raw)).tolist()
    check_out_dir(out)
    with atomic_dir(out, "nothing was kept (an earlier run there is unchanged); free some space (or fix the "
                    "disk) and run `heads ensemble` again") as tmp:  # whole or not at all, as write_run
        save_json(os.path.join(tmp, "config.json"), {
            "format": FORMAT, "stage": STAGE, "classes": classes,
            "ensemble": {"members": [_relative(r, out) for r in runs], "weights": weights,
                         "weighting": weighting}})
        for name in ("cache.json", "split.json"):
            shutil.copyfile(os.path.join(runs[0], name), os.path.join(tmp, name))
        result = {"fusion": "ensemble(" + "+".join(c["train"]["fusion"] for c in cfgs) + ")", "modality": "both",
                  "members": [{"run": os.path.abspath(r), "weight": w, "macro_f1": m.get("macro_f1")}
                              for r, w, m in zip(runs, weights, metrics)], "classes": classes}
        result.update(_validate(runs, weights, classes, tmp))
        if result["validated"] and all("crossfit" in m for m in metrics):  # every labelled row, out of fold
            result["out_of_fold"] = True
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
    for name in ("split.json", "cache.json"):  # read by the ensemble: a damaged one stops it before writing
        load_json(os.path.join(run, name))
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


def _relative(member: str, out: str) -> str:
    """A member's path as the ensemble stores it: relative to the ensemble's parent directory, so that a folder
    holding both (runs/ with runs/main and runs/main-parts) can move or be copied whole."""
    return os.path.relpath(os.path.abspath(member), os.path.dirname(os.path.abspath(out)))


def members(run_dir: str) -> list[str]:
    """The ensemble's member run directories: stored relative to the ensemble's parent directory (older
    ensembles: absolute)."""
    parent = os.path.dirname(os.path.abspath(run_dir))
    return [os.path.normpath(os.path.join(parent, m)) for m in
            load_json(os.path.join(run_dir, "config.json"))["ensemble"]["members"]]


def member_groups(run_dir: str) -> list[tuple[dict, list[int]]]:
    """The members grouped by the cache features they read, in order of first appearance: [(the cache.json of
    the group's first member, member indices)]. One group unless members come from caches of other backbones."""
    groups: list[tuple[dict, dict, list[int]]] = []
    for i, member in enumerate(members(run_dir)):
        recorded = load_json(os.path.join(member, "cache.json"))
        sig = recorded_signature(recorded)
        same = next((g for g in groups if g[0] == sig), None)
        if same:
            same[2].append(i)
        else:
            groups.append((sig, recorded, [i]))
    return [(recorded, idx) for _, recorded, idx in groups]


def ensemble_predict(run_dir: str, caches, split: str, device="cpu", batch_size: int = 1024,
                     budget: str = "auto") -> tuple[CacheData, np.ndarray, np.ndarray, np.ndarray]:
    """(the first group's data, its rows of `split`, which of them are valid in every cache, log of the
    members' weighted averaged probabilities on the valid ones). `caches`: one cache (path or CacheData) per
    member group, in any order; they are matched to the groups by feature signature and their rows by guid."""
    spec, runs, groups = load_json(os.path.join(run_dir, "config.json"))["ensemble"], members(run_dir), \
        member_groups(run_dir)
    heads = [load_heads(r, device)[0] for r in runs]  # each member's heads, loaded once
    datas = [_group_data([runs[k] for k in which], [heads[k] for k in which], cache, budget)
             for (_, which), cache in zip(groups, _match(run_dir, groups, caches))]
    rows = [split_rows(datas[0], split)]
    guids = [datas[0].guids[r] for r in rows[0]]
    for d in datas[1:]:
        at = {d.guids[r]: r for r in split_rows(d, split)}
        if set(at) != set(guids):
            only = next(iter(set(at) ^ set(guids)))
            raise CacheError(f"{datas[0].path} and {d.path} hold other rows in split {split!r} ({len(guids)} and "
                             f"{len(at)}; guid {only} is in one only): give caches extracted from the same data")
        rows.append(np.array([at[g] for g in guids], dtype=np.int64))
    ok = np.logical_and.reduce([d.valid[r] for d, r in zip(datas, rows)])
    total = np.ones((0, len(datas[0].classes)))
    if ok.any():  # no valid row: nothing to run the heads on
        total = sum(_weighted_proba([heads[k] for k in which], [spec["weights"][k] for k in which], d, r[ok],
                                    device, batch_size) for (_, which), d, r in zip(groups, datas, rows))
    return datas[0], rows[0], ok, np.log(np.clip(total, 1e-12, None)).astype(np.float32)


def _match(run_dir: str, groups, caches) -> list:
    """The given caches in the order of the member groups (each matched by its features' signature)."""
    caches = list(caches) if isinstance(caches, (list, tuple)) else [caches]
    if len(groups) == 1 and len(caches) == 1:
        return caches  # checked by check_cache, whose message names each differing field
    sigs = [feature_signature(c.meta) if isinstance(c, CacheData) else _signature(str(c)) for c in caches]
    names = [c.path if isinstance(c, CacheData) else str(c) for c in caches]
    want = [recorded_signature(g[0]) for g in groups]
    for name, sig in zip(names, sigs):
        if sig not in want:
            raise CacheError(f"{name} has the features of none of the members of {run_dir}; " + _wanted(groups))
    out = []
    for recorded, sig in zip((g[0] for g in groups), want):
        if sigs.count(sig) != 1:
            given = "none of the caches given has" if sig not in sigs else "two caches given have"
            raise CacheError(f"{given} the features of the members trained on {recorded.get('path')} "
                             f"({_backbone(recorded)}); " + _wanted(groups))
        out.append(caches[sigs.index(sig)])
    return out


def _wanted(groups) -> str:
    return ("give one cache per backbone, comma-separated (--cache a.h5,b.h5): " +
            "; ".join(f"one like {g[0].get('path')} ({_backbone(g[0])})" for g in groups))


def _backbone(recorded: dict) -> str:
    backbone = recorded.get("backbone") or (recorded.get("signature") or {}).get("backbone") or {}
    return str(backbone.get("name") or backbone) if isinstance(backbone, dict) else str(backbone)


def _signature(path: str) -> dict:
    with open_cache(path, verify=False) as r:  # the features' meaning only; load_data verifies the shards
        return feature_signature(r.meta)


def _group_data(runs: list[str], heads: list[list], cache, budget) -> CacheData:
    """One member group's cache, loaded with the arrays its members' `heads` read (once for all of them), checked
    as predict checks a run."""
    if isinstance(cache, CacheData):
        data = cache
    else:
        keys: list[str] = []
        for models in heads:
            keys += [k for k in models[0].inputs if k not in keys]
        data = load_data(str(cache), keys=tuple(keys), budget=budget)
    check_cache(runs[0], read_config(runs[0]), data.path, data.meta, data.classes)
    return data


def _weighted_proba(heads: list[list], weights: list[float], data: CacheData, rows, device,
                    batch_size) -> np.ndarray:
    """The weighted sum of the members' probabilities (each member: its heads, averaged) on `rows` of `data`."""
    total = 0.0
    for models, weight in zip(heads, weights):
        if len(models) == 1:
            logits = infer(models[0], data, rows, device, batch_size)["logits"]
            logits = logits - logits.max(1, keepdims=True)
            probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        else:
            probs = np.exp(mean_log_proba(models, data, rows, device, batch_size))
        total = total + weight * probs
    return total
