"""The bottom layer of the reports: finished run directories read back, grouped into configurations, averaged.

    runs = [load_run(d) for d in find_run_dirs(["ablations/a"])]
    label_runs(runs)                 # each run's configuration label: the config keys that vary
    rows = summary_rows(runs)        # one row per configuration: mean ± std of STATS, best macro-F1 first

Runs are found by their metrics.json + config.json (head runs: {"train": TrainConfig}; probe runs:
{"probe": ProbeConfig}). A *configuration* is a run's config minus seed and fold (and the fields that do
not change results: device, threads, plots, eval_batch_size); its label lists only the fields that vary
among the runs reported together. Every number is read from the runs' metrics.json and averaged here, so
the summary agrees with the runs exactly. Reports read run directories only: nothing here imports the
training code.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from featcache.cache.store import LEGACY_CLASSES
from featcache.errors import ConfigError

from ..rundir import PROBE_NAME, head_params, load_json  # the other report modules take PROBE_NAME from here

IGNORED = ("seed", "fold", "device", "threads", "plots", "eval_batch_size")
STATS = {  # summary column -> how to read it from metrics.json (None: the run has no such number)
    "accuracy": lambda m: m["accuracy"],
    "macro_f1": lambda m: m["macro_f1"],
    "weighted_f1": lambda m: m["weighted_f1"],
    "neutral_f1": lambda m: m["per_class"].get("neutral", {}).get("f1"),  # datasets with a neutral class
    "roc_auc": lambda m: m.get("roc_auc"),  # two-class tasks: ROC-AUC of class 1
    "train_s": lambda m: m["timing"]["train_s"],
}
OPTIONAL_STATS = ("neutral_f1", "roc_auc")  # a column only where every run of a configuration has the number
ALIASES = {"auroc": "roc_auc"}  # the training option's name for the same number
# Scored once at the end, next to validation (they never chose anything): the internal --test-ratio split
# ("test") and each labelled split the data ships besides train and validation ("heldout" in metrics.json).
HELD_STATS = ("accuracy", "macro_f1", "roc_auc")
TITLES = {"accuracy": "accuracy", "macro_f1": "macro-F1", "weighted_f1": "weighted-F1", "neutral_f1": "neutral F1",
          "roc_auc": "ROC-AUC", "train_s": "train s"}  # column headings of the tables and plots
LOWER_IS_BETTER = ("train_s",)
# config.json parts that describe the machine or the data, not a setting one could vary.
NOT_PARAMETERS = ("env", "classes")
SPLIT_DEFAULTS = {"test_ratio": 0.0, "val_split": "auto", "split_file": ""}  # runs from before these existed


def check_report_metric(name: str, runs: list | None = None) -> str:
    """A STATS name (what `heads report --metric` ranks by; training's early-stopping metric is another), by
    its alias too (auroc); with `runs`, one every run has (roc_auc: two classes, neutral_f1: a neutral class)."""
    name = ALIASES.get(name, name)
    if name not in STATS:
        raise ConfigError(f"unknown report metric {name!r}; valid: {', '.join(STATS)}")
    lacking = [r.dir for r in runs or [] if STATS[name](r.metrics) is None]
    if lacking:
        raise ConfigError(f"report metric {name}: {len(lacking)} run(s) have no such number (e.g. {lacking[0]}; "
                          "roc_auc needs a two-class task, neutral_f1 a class named neutral); pick another --metric")
    return name


def held_stats(metrics: dict) -> dict[str, float]:
    """`<split>_<stat>` -> value for the splits scored once at the end: test_* (the internal --test-ratio split)
    and heldout_<name>_* (the data's own labelled splits)."""
    parts = ([("test", metrics["test"])] if "test" in metrics else []) + \
        [(f"heldout_{name}", m) for name, m in metrics.get("heldout", {}).items()]
    return {f"{prefix}_{s}": m[s] for prefix, m in parts for s in HELD_STATS if m.get(s) is not None}


@dataclass
class Run:
    dir: str
    params: dict  # the configuration (config minus IGNORED); probes: {"probe": "logreg"}
    seed: int
    fold: int | None  # None: a single val_ratio split
    metrics: dict
    train: dict | None = None  # head runs: every config parameter, flat (config_params)
    config_json: dict | None = None  # head runs: the config section as written (best.json retrains from it)
    config: str = ""  # label, set by label_runs()

    @property
    def pair_key(self) -> tuple:
        """Runs with the same pair_key validated on the same samples (same split arguments)."""
        return (self.seed, self.fold, self.params.get("val_ratio", 0.2), self.params.get("test_ratio", 0.0),
                self.params.get("folds", 0), self.params.get("val_split", "auto"), self.params.get("split_file", ""))

    @property
    def classes(self) -> list[str]:
        return run_classes(self.metrics)


def run_classes(metrics: dict) -> list[str]:
    """Class names in label order, as a run's metrics.json records them (runs from before they were recorded:
    LEGACY_CLASSES, the three MVSA tags they were all trained on)."""
    return list(metrics.get("classes", LEGACY_CLASSES))


def config_params(config: dict) -> dict:
    """A run's parameters as one flat dict name -> value, from its config.json (as loaded), whatever its shape:
    today's flat sections ({"train": {...}, "head": {...}} / {"probe": {...}}) or nested ones
    ({"train": {"head": {...}, "optim": {...}}} or the same without "train"). The run section is "probe" or
    "train" when present, else the whole file; nested dicts are flattened to their leaf names (the flat names
    that ablation axes and --group-by use); env and classes are not parameters."""
    section = config["probe"] if "probe" in config else config.get("train", config)
    flat: dict = {}
    _flatten(section, flat)
    return flat


def _flatten(tree: dict, out: dict) -> None:
    for k, v in tree.items():
        if k in NOT_PARAMETERS:
            continue
        if isinstance(v, dict):
            _flatten(v, out)
        elif k in out and out[k] != v:  # one flat name, two values: the report could not tell them apart
            raise ConfigError(f"config.json has two different values for {k!r} ({out[k]!r}, {v!r})")
        else:
            out[k] = v


def find_run_dirs(paths) -> list[str]:
    """Run directories under each path (a path may itself be one), sorted, without duplicates. Hidden folders
    are skipped: a run being written, or left by a killed writer, is a .NAME.tmp-* sibling (featcache.outdir)."""
    found = set()
    for p in paths:
        if not os.path.isdir(p):
            raise FileNotFoundError(f"{p} is not a directory")
        for root, dirs, files in os.walk(p):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            if "metrics.json" in files and "config.json" in files:
                found.add(os.path.normpath(root))
    return sorted(found)


def load_run(run_dir: str) -> Run:
    cfg = load_json(os.path.join(run_dir, "config.json"))
    metrics = load_json(os.path.join(run_dir, "metrics.json"))
    flat = config_params(cfg)
    if "probe" in cfg:
        params = {"probe": "logreg", "val_ratio": flat["val_ratio"], "folds": flat["folds"],
                  **{k: flat.get(k, v) for k, v in SPLIT_DEFAULTS.items()}, **_cache_param(run_dir)}
        return Run(run_dir, params, flat["seed"], flat["fold"] if flat["folds"] else None, metrics)
    params = {k: v for k, v in flat.items() if k not in IGNORED}
    for k, v in SPLIT_DEFAULTS.items():  # runs from before --test-ratio / --val-split / --split-file existed
        params.setdefault(k, v)
    params.update(_cache_param(run_dir))
    return Run(run_dir, params, flat["seed"], flat["fold"] if flat.get("folds") else None, metrics, train=flat,
               config_json=cfg.get("train", cfg))


def _cache_param(run_dir: str) -> dict:
    """{"cache": file stem} of the cache a run trained on: runs of different caches are different
    configurations (the label shows it only when it varies, as for any parameter)."""
    try:
        path = load_json(os.path.join(run_dir, "cache.json"))["path"]
    except (OSError, ValueError, KeyError):
        return {}
    return {"cache": os.path.splitext(os.path.basename(path))[0]}


def report_classes(runs: list[Run]) -> list[str]:
    """The class names shared by all the runs (per-class columns and figures need one list)."""
    classes = runs[0].classes
    for r in runs:
        if r.classes != classes:
            raise ConfigError(f"{r.dir} has classes {r.classes}, {runs[0].dir} has {classes}: report runs of one "
                             "dataset together")
    return classes


def varying_keys(runs: list[Run]) -> list[str]:
    """The head-config fields that vary across these runs (fusion if none does), in label order."""
    heads = [r for r in runs if "probe" not in r.params]
    keys = sorted({k for r in heads for k in r.params})
    varying = [k for k in keys if len({repr(r.params.get(k)) for r in heads}) > 1] or ["fusion"]
    first = ("fusion", "modality")  # the default grid's axes lead, the rest follow alphabetically
    varying.sort(key=lambda k: (first.index(k) if k in first else len(first), k))
    return varying


def label_runs(runs: list[Run]) -> None:
    """Label each run's configuration by the head-config fields that vary across these runs."""
    varying = varying_keys(runs)
    for r in runs:
        if "probe" in r.params:  # one probe per cache when caches are compared
            r.config = PROBE_NAME + (f",cache={r.params.get('cache')}" if "cache" in varying else "")
        else:
            r.config = ",".join(f"{k}={r.params.get(k)}" for k in varying)


def summary_rows(runs: list[Run]) -> list[dict]:
    """One row per configuration: n, mean and std (ddof=1; 0 for one run) of STATS and of the held-out splits'
    numbers; a number some run of the configuration lacks gets no column in that row. Sorted by macro-F1."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.config, []).append(r)
    rows = []
    for config, members in groups.items():
        row = {"config": config, "n": len(members)}
        values = [{**{k: get(r.metrics) for k, get in STATS.items()}, **held_stats(r.metrics)} for r in members]
        names = [k for k in values[0] if all(v.get(k) is not None for v in values)]
        for name in names:
            column = np.array([v[name] for v in values], dtype=np.float64)
            row[f"{name}_mean"] = float(np.mean(column))
            row[f"{name}_std"] = float(np.std(column, ddof=1)) if len(column) > 1 else 0.0
        row["runs"] = [r.dir for r in members]
        rows.append(row)
    rows.sort(key=lambda row: (-row["macro_f1_mean"], row["config"]))
    return rows


def summary_stats(rows: list[dict]) -> list[str]:
    """The stat names of the summary's columns: STATS (optional ones where some row has them), then the
    held-out splits' numbers, in first-seen order."""
    seen = [k[:-5] for row in rows for k in row if k.endswith("_mean")]
    held = [k for k in dict.fromkeys(seen) if k not in STATS]
    return [s for s in STATS if s not in OPTIONAL_STATS or s in seen] + held


def ranked(rows: list[dict], metric: str) -> list[dict]:
    """Summary rows best first by `metric` (train_s: fastest first); ties in configuration-label order."""
    sign = 1 if metric in LOWER_IS_BETTER else -1
    return sorted(rows, key=lambda r: (sign * r[f"{metric}_mean"], r["config"]))


def best_config(rows: list[dict], runs: list[Run]) -> dict | None:
    """best.json: the best head configuration by mean macro-F1, its stats and the config to retrain it."""
    heads = [row for row in rows if row["config"] != PROBE_NAME]
    if not heads:
        return None
    best = heads[0]
    first = next(r for r in runs if r.config == best["config"])
    stats = {k: v for k, v in best.items() if k != "runs"}
    return {**stats, "runs": best["runs"], "train_config": first.config_json}


def params_by_config(runs: list[Run]) -> dict[str, int | None]:
    """Head parameter count per configuration (every run of a configuration builds the same head)."""
    out: dict[str, int | None] = {}
    for r in runs:
        if out.get(r.config) is None:
            out[r.config] = head_params(r.dir, r.metrics)
    return out
