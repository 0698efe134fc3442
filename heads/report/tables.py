"""Text tables of a report: CSV (exact floats), Markdown and LaTeX; the summary tables and the top-k table.

    summary.csv / summary.md   one row per configuration: mean ± std over its runs, sorted by macro-F1
    top5.md    | fusion | modality | macro-F1 | accuracy | ... |   values "0.609 ± 0.038"
    top5.tex   booktabs tabular in a table float, "$0.609 \\pm 0.038$", LaTeX specials escaped

The top-k table (`heads report --top K --export md,latex`) has one row per configuration (the summary's rows:
mean ± std over its seeds/folds), ranked by the report metric; the configuration is split into one column per
config key that varies across the reported runs, so a table of a fusion x loss grid reads as a fusion column
and a loss column. Parameters are the head's parameter count (rundir.head_params; the probe: its
logistic-regression coefficients; "–" where no run recorded it).
"""
from __future__ import annotations

import csv
import os

from featcache.errors import ConfigError
from featcache.outdir import atomic_file

from .runs import PROBE_NAME, TITLES, params_by_config, ranked, summary_stats, varying_keys

FORMATS = {"md": ".md", "latex": ".tex"}  # --export name -> file suffix
DASH = "–"


def parse_formats(text: str) -> list[str]:
    formats = [f.strip().lower() for f in text.split(",") if f.strip()]
    for f in formats:
        if f not in FORMATS:
            raise ConfigError(f"unknown export format {f!r}; valid: {', '.join(FORMATS)}")
    return formats


def fmt(metric: str, value: float) -> str:
    return f"{value:.2f}" if metric == "train_s" else f"{value:.4f}"


def write_csv(path: str, cols: list[str], rows: list[dict]) -> None:
    """rows (dicts) as CSV with the given columns; floats as repr (exact, so files can be compared)."""
    with atomic_file(path, newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for row in rows:
            w.writerow([repr(row[c]) if isinstance(row[c], float) else row[c] for c in cols])


def md_table(header: list[str], rows: list[list], align: str = "") -> list[str]:
    """Markdown table lines; `align` has one character per column, l or r (default: first l, rest r)."""
    align = align or "l" + "r" * (len(header) - 1)
    cell = lambda v: str(v).replace("|", "\\|")  # noqa: E731  (a | inside a value would split the cell)
    return (["| " + " | ".join(cell(h) for h in header) + " |",
             "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
            + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


# ------------------------------------------------------------------------------------------ summary table
def write_summary_csv(rows: list[dict], path: str) -> None:
    """Every summary number as mean/std columns; a configuration without one (runs with and without
    --test-ratio reported together) leaves its cells empty."""
    cols = ["config", "n"] + [f"{s}_{k}" for s in summary_stats(rows) for k in ("mean", "std")]
    with atomic_file(path, newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for row in rows:  # repr: exact floats
            w.writerow([row[c] if c in ("config", "n") else repr(row[c]) if c in row else "" for c in cols])


def _title(stat: str) -> str:
    """Column heading: TITLES; `test accuracy` for the internal --test-ratio split (as always); `<name> split
    macro-F1` for the data's own held-out splits."""
    if stat in TITLES:
        return TITLES[stat]
    if not stat.startswith("heldout_"):
        return stat.replace("_", " ")
    for s in ("macro_f1", "accuracy", "roc_auc"):
        if stat.endswith("_" + s):
            return f"{stat[len('heldout_'):-len(s) - 1]} split {TITLES[s]}"
    return stat


def write_summary_md(rows: list[dict], path: str) -> None:
    stats = [s for s in summary_stats(rows) if s != "train_s"]
    held = [s for s in stats if s not in TITLES]
    notes = (("; test = the internal --test-ratio split" if any(s.startswith("test_") for s in held) else "")
             + ("; other splits = the data's own labelled splits" if any(s.startswith("heldout_") for s in held)
                else "") + (", never used for selection." if held else "."))
    lines = ["# Ablation summary", "", f"{len(rows)} configurations, sorted by mean validation macro-F1 (mean ± std over "
             "runs)" + notes, "",
             "| configuration | " + "".join(f"{_title(s)} | " for s in stats) + "train s | n |",
             "|---|" + "---|" * len(stats) + "---|---|"]

    def cell(row, s):
        return f"{row[f'{s}_mean']:.4f} ± {row[f'{s}_std']:.4f}" if f"{s}_mean" in row else "-"
    for row in rows:
        cells = [cell(row, s) for s in stats]
        lines.append(f"| {row['config']} | {' | '.join(cells)} | {row['train_s_mean']:.1f} ± "
                     f"{row['train_s_std']:.1f} | {row['n']} |")
    with atomic_file(path, encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------ top-k table
def _stat_columns(metric: str) -> list[str]:
    # The ranking metric first, then the headline numbers; train s last (cost, not quality).
    rest = [s for s in ("macro_f1", "accuracy", "weighted_f1", "train_s") if s != metric]
    return [metric] + rest


def top_table(rows: list[dict], runs, k: int, metric: str) -> tuple[list[str], list[list], list[list]]:
    """(header, cells, numbers) of the k best configurations. cells: key values as strings; numbers: for
    each stat column (mean, std), then the parameter count (None if not recorded) and n."""
    keys = varying_keys(runs)
    by_config = {r.config: r for r in runs}
    params = params_by_config(runs)
    stats = _stat_columns(metric)
    header = ["rank", *keys, *[TITLES[s] for s in stats], "params", "n"]
    cells, numbers = [], []
    for rank, row in enumerate(ranked(rows, metric)[:k], 1):
        run = by_config[row["config"]]
        values = [PROBE_NAME] + [""] * (len(keys) - 1) if run.train is None else [run.train.get(k) for k in keys]
        cells.append([rank, *values])
        numbers.append([*[(row[f"{s}_mean"], row[f"{s}_std"]) for s in stats], params.get(row["config"]),
                        row["n"]])
    return header, cells, numbers


def write_top_md(rows, runs, k: int, metric: str, path: str) -> None:
    header, cells, numbers = top_table(rows, runs, k, metric)
    stats = _stat_columns(metric)
    body = []
    for c, nums in zip(cells, numbers):
        pairs = [f"{fmt(s, m)} ± {fmt(s, sd)}" for s, (m, sd) in zip(stats, nums[:len(stats)])]
        p = nums[len(stats)]
        body.append([*c, *pairs, DASH if p is None else f"{p:,}", nums[-1]])
    n_keys = len(header) - len(stats) - 3
    lines = [f"# Top {len(body)} configurations by {TITLES[metric]}", "",
             "Mean ± std over each configuration's runs (seeds/folds); params = head parameters.", "",
             *md_table(header, body, "r" + "l" * n_keys + "r" * (len(stats) + 2))]
    with atomic_file(path, encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
          "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "<": r"\textless{}",
          ">": r"\textgreater{}", "|": r"\textbar{}"}


def latex_escape(text) -> str:
    """Plain text for LaTeX: every special character escaped (one pass, so escapes are not re-escaped)."""
    return "".join(_LATEX.get(ch, ch) for ch in str(text))


def _latex_num(metric: str, value: float) -> str:
    return f"{value:.1f}" if metric == "train_s" else f"{value:.3f}"


def write_top_latex(rows, runs, k: int, metric: str, path: str) -> None:
    header, cells, numbers = top_table(rows, runs, k, metric)
    stats = _stat_columns(metric)
    n_keys = len(header) - len(stats) - 3
    body = []
    for c, nums in zip(cells, numbers):
        pairs = [f"${_latex_num(s, m)} \\pm {_latex_num(s, sd)}$" for s, (m, sd) in zip(stats, nums[:len(stats)])]
        p = nums[len(stats)]
        body.append(" & ".join([*(latex_escape(v) for v in c), *pairs,
                                "--" if p is None else f"{p:,}".replace(",", "\\,"), str(nums[-1])]) + r" \\")
    caption = (f"Top {len(body)} configurations by {latex_escape(TITLES[metric])} (mean $\\pm$ std over "
               "seeds/folds; params: head parameters).")
    lines = ["% Written by `heads report`; needs \\usepackage{booktabs} in the preamble.",
             r"\begin{table}[t]", r"\centering", f"\\caption{{{caption}}}", r"\label{tab:top-configurations}",
             f"\\begin{{tabular}}{{r{'l' * n_keys}{'r' * (len(stats) + 2)}}}", r"\toprule",
             " & ".join(latex_escape(h) for h in header) + r" \\", r"\midrule", *body, r"\bottomrule",
             r"\end{tabular}", r"\end{table}"]
    with atomic_file(path, encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def write_top(rows, runs, k: int, metric: str, formats: list[str], out: str) -> list[str]:
    """The top-k table in each of `formats` (md, latex) as out/top<k>.md / .tex; returns the paths."""
    if k < 1:
        raise ConfigError(f"--top must be at least 1, got {k}")
    writers = {"md": write_top_md, "latex": write_top_latex}
    files = []
    for f in formats:
        path = os.path.join(out, f"top{k}{FORMATS[f]}")
        writers[f](rows, runs, k, metric, path)
        files.append(path)
    return files

