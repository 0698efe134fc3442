"""`heads predict`: apply a trained run to one split of a cache and write `guid,tag` lines.

The output has the dataset's label-file format (header `guid,tag`) and one line for EVERY sample of the
split, in cache order. Policy for invalid samples (missing/corrupt image or text at extraction time): their
features cannot be trusted, so they are not run through the head; they are written with the run's fallback
tag (the most frequent class of its training split) and returned in `PredictResult.invalid` so the caller
can list them. Nothing is silently dropped.

A run only applies to a cache whose backbones, weights and preprocessing (featcache.cache.store.feature_signature)
equal those it was trained on (cache.json); otherwise the features mean something else and predict refuses,
naming both; so does a cache with other class names. The dataset may differ: applying a head to new data is
the point of predict. A stage-2 run (config.json stage "finetune") also rebuilds the cache's text backbone,
loads the run's text layers onto it and feeds them the cache's stored states, through the same inference
loop as a head (heads.infer).

Raw data (`heads predict --data`, `predict_data`; the Python API heads.api uses it too): featcache's one
extraction engine reproduces the run's features on the rows of the split (backbones, preprocessing and the
weights' sha256 from cache.json; weights with another checksum are refused before anything loads, and a stage-2
run gets the states entering its text layers) into a temporary cache or `--keep-cache FILE`, and `predict`
reads that cache as any other: no second extraction loop, no second inference loop.
"""
from __future__ import annotations

import copy
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from featcache.cache.store import CacheReader
from featcache.device import resolve_device
from featcache.errors import ConfigError
from featcache.outdir import atomic_file
from featcache.text_tower import load_text_backbone

from .data.cache import CacheData, load_cache, split_rows
from .data.stream import load_data
from .data.text_layers import stage2_keys, with_text_inputs
from .ensemble import ensemble_predict, is_ensemble, member_groups
from .infer import infer, load_heads, mean_log_proba, softmax
from .rundir import check_cache, load_json, load_text_layers, read_config, text_layer_files
from .train.bias import apply_bias
from .train.text_model import FinetuneModel

# Rows per forward pass. Stage-2 runs have always predicted in chunks of 512 (text layers hold more per row);
# a chunk's padding cut depends on its rows, so keeping the size keeps their predictions bit for bit.
BATCH = {"train": 1024, "finetune": 512}


@dataclass
class PredictResult:
    out: str
    split: str
    written: int
    fallback_tag: str
    invalid: list[str] = field(default_factory=list)  # guids written with fallback_tag
    tags: dict = field(default_factory=dict)  # tag -> count
    problems: dict = field(default_factory=dict)  # predict_data: guid -> what extraction found wrong with it


def fallback_tag(run_dir: str, classes: list[str]) -> str:
    counts = load_json(os.path.join(run_dir, "split.json")).get("train_per_class") or {}
    return max(classes, key=lambda c: (counts.get(c, 0), -classes.index(c)))  # ties: first class


def predict(run_dir: str, cache: str | CacheData | list, out: str, split: str = "test", device: str = "auto",
            batch_size: int | None = None, proba: bool = False, memory_budget: str = "auto") -> PredictResult:
    """Write `guid,tag` lines (with `proba`, also p_<class> per line) for every sample of `split`. A cross-fit
    run's K heads vote by their averaged probabilities, an ensemble's members by their weighted average
    (`cache`: a list of one cache per backbone when its members come from several, heads.ensemble).
    A stage-1 run's cache is streamed from disk when its arrays need more than `memory_budget`
    (heads.data.stream; the same numbers); stage 2 reads it into memory."""
    dev = resolve_device(device)
    if is_ensemble(run_dir):  # `heads ensemble`: its members' heads (one cache per backbone), probabilities averaged
        cfg, bias = load_json(os.path.join(run_dir, "config.json")), None
        data, rows, ok, logits = ensemble_predict(run_dir, cache, split, dev, batch_size or BATCH["train"],
                                                  memory_budget)
    else:
        cfg, data, rows, ok, logits, bias = _run_rows(run_dir, cache, split, dev, batch_size, memory_budget)
    classes = cfg["classes"]
    fallback = fallback_tag(run_dir, classes)
    tags = np.full(rows.size, fallback, dtype=object)
    probs = np.full((rows.size, len(classes)), np.nan)  # invalid samples: no probabilities (empty cells)
    if ok.any():
        tags[ok] = np.asarray(classes, dtype=object)[apply_bias(logits, bias).argmax(1)]
        probs[ok] = softmax(logits)
    _write_tags(out, [data.guids[r] for r in rows], tags, probs if proba else None, classes)
    return PredictResult(out=out, split=split, written=int(rows.size), fallback_tag=fallback,
                         invalid=[data.guids[r] for r in rows[~ok]], tags=dict(Counter(tags.tolist())))


def _run_rows(run_dir: str, cache, split: str, dev, batch_size, memory_budget):
    """(config, data, rows of `split`, which are valid, logits of the valid ones, bias offsets) of one run:
    a head, a cross-fit run's K heads (log of their averaged probabilities) or a stage-2 run."""
    models, cfg = load_heads(run_dir, dev)
    flat, keys = cfg["train"], models[0].inputs
    n = flat.get("text_layers", 0) if cfg["stage"] == "finetune" else 0
    text_forward = flat.get("text_forward", "cached")
    if isinstance(cache, (list, tuple)):
        if len(cache) != 1:
            raise ConfigError(f"{run_dir} reads one cache; {len(cache)} were given (several caches are for "
                              "`heads ensemble` runs of several backbones)")
        cache = cache[0]
    if not isinstance(cache, CacheData) and n:
        cache = load_cache(str(cache), keys=keys + stage2_keys(text_forward), texts=True)
    elif not isinstance(cache, CacheData):
        cache = load_data(str(cache), keys=keys, budget=memory_budget)
    data = cache
    check_cache(run_dir, cfg, data.path, data.meta, data.classes)
    rows = split_rows(data, split)
    bias_path = os.path.join(run_dir, "bias.json")
    bias = load_json(bias_path)["offsets"] if os.path.exists(bias_path) else None
    ok = data.valid[rows]
    logits = None
    if ok.any():
        if n:
            models, data = _with_text_layers(run_dir, cfg, models, data, n, text_forward, dev)
        size = batch_size or BATCH.get(cfg["stage"], BATCH["train"])
        if len(models) == 1:  # one head: its raw logits, as always (bit for bit)
            logits = infer(models[0], data, rows[ok], dev, size)["logits"]
        else:
            logits = mean_log_proba(models, data, rows[ok], dev, size)
    return cfg, data, rows, ok, logits, bias


def predict_data(run_dir: str, data: str, out: str, split: str = "test", fmt: str = "auto",
                 reader_options: dict | None = None, keep_cache: str | None = None, device: str = "auto",
                 proba: bool = False, console=None, progress: bool = True, keep_models: bool = False,
                 memory_budget: str = "auto") -> PredictResult:
    """`heads predict --data`: extract the rows of `split` of raw data exactly as the run's cache was extracted
    (extract_for_run), into `keep_cache` or a temporary file, then `predict` on it: one extraction engine, one
    inference loop, so the result is what `featcache extract` + `heads predict --cache` give. `keep_models`:
    keep the backbones loaded for the next call (the Python API)."""
    with tempfile.TemporaryDirectory(prefix="heads-predict-") as tmp:
        caches = extract_for_run(run_dir, data, keep_cache or os.path.join(tmp, "features.h5"), split, fmt,
                                 reader_options, device, console, progress, keep_models)
        res = predict(run_dir, caches, out, split=split, device=device, proba=proba, memory_budget=memory_budget)
        problems = []
        for cache in caches:
            with CacheReader(cache) as r:
                problems += [p for p in r.meta.get("problems") or [] if p not in problems]
    bad = set(res.invalid)
    for p in problems:  # "[kind] guid G (file): message -> level" (featcache.sources.base.Problem)
        m = re.match(r"\[[^]]*\] guid (.*?) \(", p)
        if m and m[1] in bad:
            res.problems[m[1]] = "; ".join(filter(None, (res.problems.get(m[1]), p)))
    return res


def extract_for_run(run_dir: str, data: str, out: str, split: str = "test", fmt: str = "auto",
                    reader_options: dict | None = None, device: str = "auto", console=None,
                    progress: bool = True, keep_models: bool = False) -> list[str]:
    """Extract `split` of `data` into `out` with the backbones, weights (their sha256 checked: other weights
    are refused by name) and preprocessing of the cache the run was trained on (its cache.json), plus the
    text-layer states a stage-2 run reads; returns the cache paths (a complete one of the same key is reused):
    one, or for an ensemble of several backbones one per member group, the k-th (k >= 1) as `out` + `.k.h5`."""
    # heavy (the backbones' libraries): only predicting from raw data extracts; heads never import them directly
    from featcache.extract.config import ExtractConfig, recorded_weights
    from featcache.extract.engine import extract
    from featcache.sources.base import detect_format

    if is_ensemble(run_dir):
        cfg, flat = load_json(os.path.join(run_dir, "config.json")), {}
        recorded = [g[0] for g in member_groups(run_dir)]
    else:
        cfg = read_config(run_dir)
        flat, recorded = cfg["train"], [load_json(os.path.join(run_dir, "cache.json"))]
    cached_states = cfg["stage"] == "finetune" and flat.get("text_forward", "cached") == "cached"
    options = dict(reader_options or {})
    if (detect_format(data) if fmt == "auto" else fmt) == "manifest":  # unlabelled rows: the run's classes
        options.setdefault("classes", list(cfg["classes"]))
    paths = []
    for k, rec in enumerate(recorded):
        path = str(out) if k == 0 else f"{os.path.splitext(str(out))[0]}.{k}.h5"
        xcfg = ExtractConfig.like(rec, str(data), format=fmt, reader_options=options, out=path, splits=(split,),
                                  text_layers=flat.get("text_layers", 0) if cached_states else 0, device=device,
                                  batch_size=0)
        paths.append(extract(xcfg, console=console, progress=progress, expect_weights=recorded_weights(rec),
                             keep_models=keep_models))
    return paths


def _write_tags(out: str, guids: list[str], tags, probs, classes: list[str]) -> None:
    """The label-file format (`guid,tag`); with probabilities, one p_<class> column per class after it."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with atomic_file(out, newline="\n", encoding="utf-8") as f:  # whole or not at all; an earlier file stays till then
        f.write("guid,tag" + ("".join(f",p_{c}" for c in classes) if probs is not None else "") + "\n")
        for k, (guid, tag) in enumerate(zip(guids, tags)):
            extra = "".join("," if np.isnan(p) else f",{p:.6f}" for p in probs[k]) if probs is not None else ""
            f.write(f"{guid},{tag}{extra}\n")


def _with_text_layers(run_dir: str, cfg: dict, heads: list, data: CacheData, n: int, text_forward: str, device):
    """(stage-2 models, data with their text inputs): per head, the cache's text backbone with the run's top
    `n` layers for it (a cross-fit run has one text-layer file per fold head: rundir.text_layer_files)."""
    text = load_text_backbone(data.meta)
    text.lock(n)
    text.to(device)
    # before loading the run's layers: the stored states are checked against the cache with the original weights
    data = with_text_inputs(data, text, n, text_forward, device, say=lambda m: None)
    models = []
    for head, name in zip(heads, text_layer_files(cfg)):
        own = text if len(heads) == 1 else copy.deepcopy(text)  # fold k's layers on its own copy
        model = FinetuneModel(head, own, n, cached="text_states" in data.features).to(device)
        model.load_text_params(load_text_layers(run_dir, name), os.path.join(run_dir, name))
        models.append(model)
    return models, data
