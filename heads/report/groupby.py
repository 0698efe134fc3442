"""How the report metric depends on single hyperparameters, across all runs of a report.

    rows = group_by(runs, ["fusion", "loss"], "macro_f1")   # `heads report DIR --group-by fusion,loss`
    corr = correlations(runs, "macro_f1")                   # correlation.md / .csv

group_by: the runs grouped by the values of any config keys (seed included): per group the number of
runs and of configurations, mean and std (ddof=1, 0 for one run, as in summary.csv) over the runs, the best
configuration of the group by its mean over its own runs (a single lucky seed is not a result) and the best
single run. Probe runs are not a value of any key: they form one "logreg-probe" group, shown for reference.

correlations: for every numeric config key (int or float, not bool) that varies across the head runs,
Pearson and Spearman correlation of its value with the metric over the runs (n = runs). Runs share seeds
and the other axes vary at the same time, so these are descriptive, not tests: no p-values.
"""
from __future__ import annotations

import os

import numpy as np

from featcache.errors import ConfigError
from featcache.outdir import atomic_file

from .runs import IGNORED, LOWER_IS_BETTER, PROBE_NAME, STATS, TITLES
from .tables import fmt, md_table, write_csv

NOT_HYPERPARAMETERS = IGNORED + ("folds",)  # seed/fold/threads...: numeric, but not something one tunes


def config_keys(runs) -> list[str]:
    """Config parameters of the head runs, plus `cache` (the cache file's stem, see runs.load_run) when runs
    record it."""
    return sorted({k for r in runs if r.train is not None for k in (*r.train, *r.params)})


def _value(run, key: str):
    return run.train[key] if key in run.train else run.params.get(key)


def parse_keys(text: str, runs) -> list[str]:
    """`fusion,loss` -> ["fusion", "loss"], each checked against the runs' config keys."""
    keys = [k.strip().replace("-", "_") for k in text.split(",") if k.strip()]
    valid = config_keys(runs)
    if not valid:
        raise ConfigError("--group-by needs head runs (config.json with a 'train' section); these are probes only")
    for k in keys:
        if k not in valid:
            raise ConfigError(f"unknown --group-by key {k!r}: not a config key of these runs; valid: "
                             f"{', '.join(valid)}")
    if not keys or len(set(keys)) != len(keys):
        raise ConfigError(f"--group-by expects distinct keys separated by commas, got {text!r}")
    return keys


def _order(value) -> tuple:
    # Numbers by value, then everything else by text; the probe group last.
    if value == PROBE_NAME:
        return (2, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value)
    return (1, str(value))


def group_by(runs, keys: list[str], metric: str) -> list[dict]:
    get, pick = STATS[metric], (min if metric in LOWER_IS_BETTER else max)
    groups: dict[tuple, list] = {}
    for r in runs:
        values = (PROBE_NAME,) + ("",) * (len(keys) - 1) if r.train is None else tuple(_value(r, k) for k in keys)
        groups.setdefault(values, []).append(r)
    rows = []
    for values, members in sorted(groups.items(), key=lambda kv: tuple(_order(v) for v in kv[0])):
        v = np.array([get(r.metrics) for r in members], dtype=np.float64)
        per_config: dict[str, list] = {}
        for r in members:
            per_config.setdefault(r.config, []).append(get(r.metrics))
        means = {c: float(np.mean(x)) for c, x in per_config.items()}
        best = pick(sorted(means), key=means.get)
        rows.append({**dict(zip(keys, values)), "runs": len(members), "configs": len(per_config),
                     "mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                     "best_config_mean": means[best], "best_config": best, "best_run": float(pick(v))})
    return rows


def write_groupby(rows: list[dict], keys: list[str], metric: str, out: str) -> list[str]:
    """out/groupby_<keys>.csv (exact floats) and .md; returns the two paths."""
    base = os.path.join(out, "groupby_" + "_".join(keys))
    cols = [*keys, "runs", "configs", "mean", "std", "best_config_mean", "best_config", "best_run"]
    write_csv(base + ".csv", cols, rows)
    title = TITLES[metric]
    body = [[*(row[k] for k in keys), row["runs"], row["configs"], fmt(metric, row["mean"]),
             fmt(metric, row["std"]), f"{fmt(metric, row['best_config_mean'])} ({row['best_config']})",
             fmt(metric, row["best_run"])] for row in rows]
    lines = [f"# {title} by {', '.join(keys)}", "",
             "Over runs (every seed/fold of every configuration with these values): mean, std; best "
             "configuration by its mean over its own runs; best single run.", "",
             *md_table([*keys, "runs", "configs", f"{title} mean", "std", "best configuration", "best run"], body,
                       "l" * len(keys) + "rrrrlr")]
    with atomic_file(base + ".md", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return [base + ".csv", base + ".md"]


# ------------------------------------------------------------------------------------------ correlation
def numeric_keys(runs) -> list[str]:
    """Config keys with a number in every head run and at least two distinct values."""
    heads = [r for r in runs if r.train is not None]
    out = []
    for k in config_keys(heads):
        values = [r.train.get(k) for r in heads]
        if k not in NOT_HYPERPARAMETERS and len(set(values)) > 1 and \
                all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out.append(k)
    return out


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if x.std() == 0 or y.std() == 0:
        return float("nan")  # undefined: one of the two does not vary
    return float(np.corrcoef(x, y)[0, 1])


def correlations(runs, metric: str) -> list[dict]:
    from scipy.stats import rankdata  # heavy: scipy is only needed for the correlations

    heads = [r for r in runs if r.train is not None]
    y = np.array([STATS[metric](r.metrics) for r in heads], dtype=np.float64)
    rows = []
    for k in numeric_keys(heads):
        x = np.array([r.train[k] for r in heads], dtype=np.float64)
        # Spearman = Pearson of the ranks (ties get their average rank).
        rows.append({"key": k, "n": len(heads), "values": len(set(x.tolist())), "pearson": _pearson(x, y),
                     "spearman": _pearson(rankdata(x), rankdata(y))})
    return rows


def write_correlation(rows: list[dict], metric: str, out: str) -> list[str]:
    csv_path, md_path = os.path.join(out, "correlation.csv"), os.path.join(out, "correlation.md")
    write_csv(csv_path, ["key", "n", "values", "pearson", "spearman"], rows)
    lines = [f"# Correlation of numeric hyperparameters with {TITLES[metric]}", "",
             "Over head runs (n); values = distinct settings. Other axes vary at the same time and runs share "
             "seeds: descriptive, not a test.", ""]
    if rows:
        lines += md_table(["hyperparameter", "n", "values", "Pearson r", "Spearman ρ"],
                          [[r["key"], r["n"], r["values"], f"{r['pearson']:+.3f}", f"{r['spearman']:+.3f}"]
                           for r in rows])
    else:
        lines.append("(no numeric hyperparameter varies across these runs)")
    with atomic_file(md_path, encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return [csv_path, md_path]
