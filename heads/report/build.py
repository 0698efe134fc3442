"""`heads report` (and the last step of `heads ablate`): every summary file of a set of finished runs.

    report = write_reports(["ablations/a"], out="ablations/a", baseline="concat")

    summary.csv / summary.md   one row per configuration: mean ± std over its runs, sorted by macro-F1 (tables)
    best.json                  the best configuration by mean macro-F1 and the config to retrain it (runs)
    comparison.png             mean macro-F1 per configuration with std error bars (figures)
    paired.csv / paired.md     each configuration vs its baseline (compare)
    modality.md                text-only vs image-only vs fused (compare)
    correlation.csv / .md      numeric hyperparameters vs the metric (groupby)
    groupby_<keys>.csv / .md   with group_by: mean / std / best per value of the keys (groupby)
    top<K>.md / top<K>.tex     with export: the top-k configurations for papers (tables)
    summary.html / .png        one-page summary with embedded figures (page)

The top of heads.report: the only module that imports the others (runs, plan <- tables, figures <- compare,
groupby, page <- build).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from featcache.errors import ConfigError

from .plan import BEFORE_REPORT, missing_note, unfinished
from ..rundir import load_json, save_json
from .compare import modality_analysis, paired_comparison, parse_baseline, write_modality_md, write_paired
from .figures import plot_comparison
from .groupby import correlations
from .groupby import group_by as groups_of
from .groupby import parse_keys, write_correlation, write_groupby
from .page import write_page
from .runs import (Run, best_config, check_report_metric, find_run_dirs, label_runs, load_run, report_classes,
                   summary_rows)
from .tables import parse_formats, write_summary_csv, write_summary_md, write_top


@dataclass
class Report:
    rows: list[dict]
    runs: list[Run]
    best: dict | None
    paired: list[dict] = field(default_factory=list)
    modality: list[dict] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    metric: str = "macro_f1"  # what the group-by, correlation, top-k and page outputs rank by
    correlation: list[dict] = field(default_factory=list)  # groupby.correlations
    groups: list[dict] = field(default_factory=list)  # groupby.group_by (with --group-by)
    # ablation folder -> (its grid's runs not finished yet, runs planned): from its ablate.json (heads.report.plan)
    missing: dict[str, tuple[list[str], int]] = field(default_factory=dict)

    @property
    def printed(self) -> list[str]:
        """The Markdown files `heads report` prints: the summary, the group-by table, the correlations."""
        names = [os.path.basename(f) for f in self.files]
        return [f for prefix in ("summary.md", "groupby_", "correlation.md") for f, n in zip(self.files, names)
                if n.startswith(prefix) and n.endswith(".md")]


def write_reports(paths, out: str, baseline: str | None = None, n_boot: int = 2000, seed: int = 0,
                  metric: str = "macro_f1", group_by: str = "", top: int = 0, export: str = "") -> Report:
    """Find the runs under `paths`, write every summary file into `out`; returns the Report. baseline: of the
    paired comparison (None: the one recorded in paths[0]/ablate.json, else concat). `metric` ranks the
    group-by, correlation, top-k and page outputs (summary.csv/md and best.json stay by macro-F1); group_by
    ("fusion,loss") and top + export ("md,latex") add those files."""
    runs = [load_run(d) for d in find_run_dirs(paths)]
    missing = unfinished(paths)  # an ablation's slices still running, or some never started
    if not runs:
        raise FileNotFoundError(f"no finished run directories (metrics.json + config.json) under "
                                f"{', '.join(map(str, paths))}" + "".join(
                                    f"; {missing_note(p, names, planned, BEFORE_REPORT)}"
                                    for p, (names, planned) in missing.items()))
    baseline = ablation_baseline(paths[0]) if baseline is None else baseline
    # Every option is checked before anything is written.
    report_classes(runs)
    metric = check_report_metric(metric, runs)
    parse_baseline(baseline)
    keys = parse_keys(group_by, runs) if group_by else []
    formats = parse_formats(export or ("md" if top else ""))  # --top alone: Markdown
    if top < 0:
        raise ConfigError(f"--top must be a positive number of configurations, got {top}")
    label_runs(runs)
    os.makedirs(out, exist_ok=True)
    report = _write_summaries(runs, out, baseline, n_boot, seed, metric)
    report.missing = missing
    if keys:
        report.groups = groups_of(runs, keys, metric)
        report.files += write_groupby(report.groups, keys, metric, out)
    if formats:
        report.files += write_top(report.rows, runs, top or 10, metric, formats, out)
    report.files += write_page(report.rows, runs, out, metric, report.correlation, sources=paths)
    return report


def ablation_baseline(path: str) -> str:
    """The --baseline `heads ablate` recorded in path/ablate.json; concat for any other folder."""
    meta = os.path.join(str(path), "ablate.json")
    return load_json(meta).get("baseline", "concat") if os.path.exists(meta) else "concat"


def _write_summaries(runs: list[Run], out: str, baseline: str, n_boot: int, seed: int, metric: str) -> Report:
    """The files every report has: summary, best, comparison, paired, modality, correlation."""
    rows = summary_rows(runs)
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
    report.files += write_correlation(report.correlation, metric, out)
    return report
