"""`heads report`: summaries of finished run directories (what `heads ablate` writes at its end).

    report = write_reports(["ablations/a"], out="ablations/a", baseline="concat")

Runs are found by their metrics.json + config.json (head runs: {"train": TrainConfig}; probe runs:
{"probe": ProbeConfig}). A *configuration* is a run's config minus seed and fold (and the fields that do
not change results: device, threads, plots, eval_batch_size); its label lists only the fields that vary
among the runs reported together. Every number is read from the runs' metrics.json and averaged here, so
the summary agrees with the runs exactly.

    summary.csv / summary.md   one row per configuration: mean ± std over its runs, sorted by macro-F1
    best.json                  the best configuration by mean macro-F1 and a TrainConfig to retrain it
    comparison.png             mean macro-F1 per configuration with std error bars
    paired.csv / paired.md     each configuration vs its baseline (heads.compare)
    modality.md                text-only vs image-only vs fused (heads.compare)
    correlation.csv / .md      numeric hyperparameters vs the metric (heads.groupby)
    groupby_<keys>.csv / .md   with group_by: mean / std / best per value of the keys (heads.groupby)
    top<K>.md / top<K>.tex     with export: the top-k configurations for papers (heads.export)
    summary.html / .png        one-page summary with embedded figures (heads.page)
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field

import numpy as np

from .probe import PROBE_NAME
from .rundir import load_json, save_json

IGNORED = ("seed", "fold", "device", "threads", "plots", "eval_batch_size")
STATS = {  # summary column -> how to read it from metrics.json
    "accuracy": lambda m: m["accuracy"],
    "macro_f1": lambda m: m["macro_f1"],
    "weighted_f1": lambda m: m["weighted_f1"],
    "neutral_f1": lambda m: m["per_class"]["neutral"]["f1"],
    "train_s": lambda m: m["timing"]["train_s"],
}
# With --test-ratio: the internal test split, reported next to validation (it never chose anything).
TEST_STATS = {"test_accuracy": lambda m: m["test"]["accuracy"], "test_macro_f1": lambda m: m["test"]["macro_f1"]}
TITLES = {"accuracy": "accuracy", "macro_f1": "macro-F1", "weighted_f1": "weighted-F1", "neutral_f1": "neutral F1",
          "train_s": "train s"}  # column headings of the tables and plots


@dataclass
class Run:
    dir: str
    params: dict  # the configuration (config minus IGNORED); probes: {"probe": "logreg"}
    seed: int
    fold: int | None  # None: a single val_ratio split
    metrics: dict
    train: dict | None = None  # the full TrainConfig dict (head runs)
    config: str = ""  # label, set by label_runs()

    @property
    def pair_key(self) -> tuple:
        """Runs with the same pair_key validated on the same samples (same split arguments)."""
        return (self.seed, self.fold, self.params.get("val_ratio", 0.2), self.params.get("test_ratio", 0.0),
                self.params.get("folds", 0))


@dataclass
class Report:
    rows: list[dict]
    runs: list[Run]
    best: dict | None
    paired: list[dict] = field(default_factory=list)
    modality: list[dict] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    metric: str = "macro_f1"  # what the group-by, correlation, top-k and page outputs rank by
    correlation: list[dict] = field(default_factory=list)  # heads.groupby.correlations
    groups: list[dict] = field(default_factory=list)  # heads.groupby.group_by (with --group-by)

    @property
    def printed(self) -> list[str]:
        """The Markdown files `heads report` prints: the summary, the group-by table, the correlations."""
        names = [os.path.basename(f) for f in self.files]
        return [f for prefix in ("summary.md", "groupby_", "correlation.md") for f, n in zip(self.files, names)
                if n.startswith(prefix) and n.endswith(".md")]


def find_run_dirs(paths) -> list[str]:
    """Run directories under each path (a path may itself be one), sorted, without duplicates."""
    found = set()
    for p in paths:
        if not os.path.isdir(p):
            raise FileNotFoundError(f"{p} is not a directory")
        for root, _, files in os.walk(p):
            if "metrics.json" in files and "config.json" in files:
                found.add(os.path.normpath(root))
    return sorted(found)


def load_run(run_dir: str) -> Run:
    cfg = load_json(os.path.join(run_dir, "config.json"))
    metrics = load_json(os.path.join(run_dir, "metrics.json"))
    if "probe" in cfg:
        p = cfg["probe"]
        params = {"probe": "logreg", "val_ratio": p["val_ratio"], "test_ratio": p.get("test_ratio", 0.0),
                  "folds": p["folds"], **_cache_param(run_dir)}
        return Run(run_dir, params, p["seed"], p["fold"] if p["folds"] else None, metrics)
    t = cfg["train"]
    params = {k: v for k, v in t.items() if k not in IGNORED}
    params.setdefault("test_ratio", 0.0)  # runs from before --test-ratio existed
    params.update(_cache_param(run_dir))
    return Run(run_dir, params, t["seed"], t["fold"] if t.get("folds") else None, metrics, train=t)


def _cache_param(run_dir: str) -> dict:
    """{"cache": file stem} of the cache a run trained on: runs of different caches are different
    configurations (the label shows it only when it varies, as for any parameter)."""
    try:
        path = load_json(os.path.join(run_dir, "cache.json"))["path"]
    except (OSError, ValueError, KeyError):
        return {}
    return {"cache": os.path.splitext(os.path.basename(path))[0]}


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


def summarize(runs: list[Run]) -> list[dict]:
    """One row per configuration: n, mean and std (ddof=1; 0 for one run) of STATS; sorted by macro-F1."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.config, []).append(r)
    rows = []
    for config, members in groups.items():
        row = {"config": config, "n": len(members)}
        tested = all("test" in r.metrics for r in members)
        for name, get in {**STATS, **(TEST_STATS if tested else {})}.items():
            values = np.array([get(r.metrics) for r in members], dtype=np.float64)
            row[f"{name}_mean"] = float(np.mean(values))
            row[f"{name}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        row["runs"] = [r.dir for r in members]
        rows.append(row)
    rows.sort(key=lambda row: (-row["macro_f1_mean"], row["config"]))
    return rows


def write_summary_csv(rows: list[dict], path: str) -> None:
    cols = ["config", "n"] + [f"{s}_{k}" for s in (*STATS, *TEST_STATS) for k in ("mean", "std")
                              if any(f"{s}_mean" in row for row in rows)]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for row in rows:
            w.writerow([row[c] if c in ("config", "n") else repr(row[c]) for c in cols])  # repr: exact floats


def write_summary_md(rows: list[dict], path: str, title: str = "Ablation summary") -> None:
    test = [s for s in TEST_STATS if any(f"{s}_mean" in row for row in rows)]
    lines = [f"# {title}", "", f"{len(rows)} configurations, sorted by mean validation macro-F1 (mean ± std over "
             "runs)" + ("; test = the internal --test-ratio split, never used for selection." if test else "."), "",
             "| configuration | accuracy | macro-F1 | weighted-F1 | neutral F1 | "
             + "".join(f"{s.replace('_', ' ')} | " for s in test) + "train s | n |",
             "|---|---|---|---|---|" + "---|" * len(test) + "---|---|"]

    def cell(row, s):
        return f"{row[f'{s}_mean']:.4f} ± {row[f'{s}_std']:.4f}" if f"{s}_mean" in row else "-"
    for row in rows:
        cells = [cell(row, s) for s in STATS if s != "train_s"] + [cell(row, s) for s in test]
        lines.append(f"| {row['config']} | {' | '.join(cells)} | {row['train_s_mean']:.1f} ± "
                     f"{row['train_s_std']:.1f} | {row['n']} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def comparison_bars(ax, rows: list[dict], metric: str = "macro_f1") -> None:
    """Mean of `metric` per configuration (rows in the given order) with std error bars; the probe in grey."""
    x = np.arange(len(rows))
    mean, std = [r[f"{metric}_mean"] for r in rows], [r[f"{metric}_std"] for r in rows]
    ax.bar(x, mean, yerr=std, capsize=3,
           color=["tab:grey" if r["config"] == PROBE_NAME else "tab:blue" for r in rows])
    ax.set_xticks(x, [r["config"] for r in rows], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(f"{TITLES[metric]} (mean ± std over runs)")
    if metric != "train_s":  # scores live in [0, 1]: zoom on the range the bars use
        lo = min(m - s for m, s in zip(mean, std))
        ax.set_ylim(max(0.0, lo - 0.05), 1.0 if lo > 0.9 else min(1.0, max(mean) + 0.1))


def plot_comparison(rows: list[dict], path: str) -> None:
    from . import plots  # noqa: F401  (selects the Agg backend)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(rows) + 2), 4.5))
    comparison_bars(ax, rows)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def best_config(rows: list[dict], runs: list[Run]) -> dict | None:
    heads = [row for row in rows if row["config"] != PROBE_NAME]
    if not heads:
        return None
    best = heads[0]
    first = next(r for r in runs if r.config == best["config"])
    stats = {k: v for k, v in best.items() if k != "runs"}
    return {**stats, "runs": best["runs"], "train_config": first.train}


def write_reports(paths, out: str, baseline: str = "concat", n_boot: int = 2000, seed: int = 0,
                  metric: str = "macro_f1", group_by: str = "", top: int = 0, export: str = "") -> Report:
    """Find the runs under `paths`, write every summary file into `out`; returns the Report. `metric` ranks
    the group-by, correlation, top-k and page outputs (summary.csv/md and best.json stay by macro-F1);
    group_by ("fusion,loss") and top + export ("md,latex") add those files."""
    from .compare import modality_analysis, paired_comparison, write_modality_md, write_paired
    from .export import check_metric, parse_formats, write_top
    from .groupby import correlations, group_by as groups_of, parse_keys, write_correlation, write_groupby
    from .page import write_page

    runs = [load_run(d) for d in find_run_dirs(paths)]
    if not runs:
        raise FileNotFoundError(f"no finished run directories (metrics.json + config.json) under "
                                f"{', '.join(map(str, paths))}")
    check_metric(metric)  # every option is checked before anything is written
    keys = parse_keys(group_by, runs) if group_by else []
    formats = parse_formats(export or ("md" if top else ""))  # --top alone: Markdown
    if top < 0:
        raise ValueError(f"--top must be a positive number of configurations, got {top}")
    label_runs(runs)
    rows = summarize(runs)
    os.makedirs(out, exist_ok=True)
    files = [os.path.join(out, n) for n in ("summary.csv", "summary.md", "comparison.png", "best.json",
                                             "paired.csv", "paired.md", "modality.md")]
    write_summary_csv(rows, files[0])
    write_summary_md(rows, files[1])
    plot_comparison(rows, files[2])
    best = best_config(rows, runs)
    save_json(files[3], best)
    paired = paired_comparison(runs, baseline, n_boot=n_boot, seed=seed)
    write_paired(paired, files[4], files[5], baseline)
    modality = modality_analysis(runs)
    write_modality_md(modality, files[6])
    report = Report(rows, runs, best, paired, modality, files, metric=metric,
                    correlation=correlations(runs, metric))
    files += write_correlation(report.correlation, metric, out)
    if keys:
        report.groups = groups_of(runs, keys, metric)
        files += write_groupby(report.groups, keys, metric, out)
    if formats:
        files += write_top(rows, runs, top or 10, metric, formats, out)
    files += write_page(rows, runs, out, metric, report.correlation, sources=paths)
    return report
