"""`heads predict`: apply a trained run to one split of a cache and write `guid,tag` lines.

The output has the dataset's label-file format (header `guid,tag`) and one line for EVERY sample of the
split, in cache order. Policy for invalid samples (missing/corrupt image or text at extraction time): their
features cannot be trusted, so they are not run through the head; they are written with the run's fallback
tag (the most frequent class of its training split) and returned in `PredictResult.invalid` so the caller
can list them. Nothing is silently dropped.

A run only applies to a cache whose backbones, weights and preprocessing (featcache.store.feature_signature)
equal those it was trained on (cache.json); otherwise the features mean something else and predict refuses,
naming both. The dataset may differ: applying a head to new data is the point of predict.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from featcache.dataset import LABELS
from featcache.store import CacheError, feature_signature

from .train.bias import apply_bias
from .data.cache import CacheData, load_cache
from .infer import infer
from .rundir import load_head, load_json
from .train.stage1 import resolve_device


@dataclass
class PredictResult:
    out: str
    split: str
    written: int
    fallback_tag: str
    invalid: list[str] = field(default_factory=list)  # guids written with fallback_tag
    tags: dict = field(default_factory=dict)  # tag -> count


def _show(value) -> str:
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)


def check_compatible(run_dir: str, trained_on: dict, cache_path: str, meta: dict) -> None:
    """Raise CacheError naming both sides of every field of the feature signature that differs.

    The dataset may differ (that is what predicting on new data means); backbones, weights and
    preprocessing may not, or the features the head sees would mean something else.
    """
    ran = trained_on.get("signature") or feature_signature(trained_on)
    has = feature_signature(meta)
    diffs = [f"{k}: run has {_show(ran.get(k))}, cache has {_show(has.get(k))}"
             for k in has if ran.get(k) != has.get(k)]
    if diffs:
        raise CacheError(f"run {run_dir} was trained on cache {trained_on.get('path')}, which differs from "
                         f"{cache_path}: " + "; ".join(diffs) + ". Train a head on this cache, or extract "
                         "the cache with the run's backbone and preprocessing.")


def fallback_tag(run_dir: str) -> str:
    counts = load_json(os.path.join(run_dir, "split.json")).get("train_per_class") or {}
    return max(LABELS, key=lambda c: (counts.get(c, 0), -LABELS.index(c)))  # ties: first label


def predict(run_dir: str, cache: str | CacheData, out: str, split: str = "test", device: str = "auto",
            batch_size: int = 1024) -> PredictResult:
    model, cfg = load_head(run_dir, resolve_device(device))
    trained_on = load_json(os.path.join(run_dir, "cache.json"))
    data = cache if isinstance(cache, CacheData) else load_cache(str(cache))
    check_compatible(run_dir, trained_on, data.path, data.meta)

    rows = data.rows(split)
    if rows.size == 0:
        have = ", ".join(sorted(set(data.splits.tolist()))) or "none"
        raise ValueError(f"{data.path} has no samples in split {split!r} (splits present: {have})")
    bias_path = os.path.join(run_dir, "bias.json")
    bias = load_json(bias_path)["offsets"] if os.path.exists(bias_path) else None

    ok = data.valid[rows]
    fallback = fallback_tag(run_dir)
    tags = np.full(rows.size, fallback, dtype=object)
    if ok.any():
        if "finetune" in cfg:  # stage-2 run: the cache's text backbone with the run's layers (ft_model.py)
            from .train.text_model import finetune_logits
            logits = finetune_logits(run_dir, cfg, model, data, rows[ok], next(model.parameters()).device)
        else:
            logits = infer(model, data, rows[ok], next(model.parameters()).device, batch_size)["logits"]
        tags[ok] = np.asarray(LABELS, dtype=object)[apply_bias(logits, bias).argmax(1)]

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", newline="\n") as f:
        f.write("guid,tag\n")
        for r, tag in zip(rows, tags):
            f.write(f"{data.guids[r]},{tag}\n")
    return PredictResult(out=out, split=split, written=int(rows.size), fallback_tag=fallback,
                         invalid=[data.guids[r] for r in rows[~ok]], tags=dict(Counter(tags.tolist())))
