"""A one-page summary of an ablation from its run files: summary.html (self-contained: the figures are PNGs
embedded as base64 data URIs, inline CSS, no script, no external asset) and summary.png (the same figures
tiled into one image).

    figures   comparison   mean ± std of the report metric per configuration (figures.comparison_bars)
              cost         head parameters (log scale) and train seconds per configuration, same order
              radar        per-class F1 (the runs' classes) of the top configurations
              curves       validation macro-F1 per epoch from history.json, mean over each configuration's
                           runs still training at that epoch (early stopping ends seeds at different epochs)
    tables    every configuration (metric, per-class F1, params, train s, n); correlation of numeric
              hyperparameters with the metric (groupby.py)

Written by `heads report` (so at the end of every `heads ablate`). Each figure is drawn once (figures.py);
summary.png pastes the PNGs together instead of drawing them again.
"""
from __future__ import annotations

import base64
import html
import os

import numpy as np

from featcache.outdir import atomic_file

from ..rundir import load_json
from .figures import fig_comparison, fig_cost, fig_curves, fig_radar, tile
from .runs import TITLES, params_by_config, ranked, report_classes
from .tables import fmt


def per_class_f1(runs, classes: list[str]) -> dict[str, list[float]]:
    """Configuration -> mean over its runs of the validation F1 of each class, in `classes` order."""
    groups: dict[str, list] = {}
    for r in runs:
        groups.setdefault(r.config, []).append([r.metrics["per_class"][c]["f1"] for c in classes])
    return {c: np.mean(v, axis=0).tolist() for c, v in groups.items()}


def mean_curves(runs, key: str) -> dict[str, np.ndarray]:
    """Configuration -> per-epoch mean of history[key] over its runs that reached the epoch (runs without a
    history.json, e.g. probes, are left out)."""
    histories: dict[str, list] = {}
    for r in runs:
        path = os.path.join(r.dir, "history.json")
        history = load_json(path) if os.path.exists(path) else []
        if history and key in history[0]:
            histories.setdefault(r.config, []).append([h[key] for h in history])
    curves = {}
    for config, hs in histories.items():
        n = max(len(h) for h in hs)
        curves[config] = np.array([np.mean([h[e] for h in hs if len(h) > e]) for e in range(n)])
    return curves


def _table(header: list[str], body: list[list], left: int) -> str:
    """HTML table; column `left` (the names) is left-aligned, numbers right-aligned."""
    cls = lambda j: ' class="l"' if j == left else ""  # noqa: E731
    th = "".join(f"<th{cls(j)}>{html.escape(str(h))}</th>" for j, h in enumerate(header))
    trs = "".join("<tr>" + "".join(f"<td{cls(j)}>{html.escape(str(v))}</td>" for j, v in enumerate(row)) + "</tr>"
                  for row in body)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def _img(name: str, data: bytes, caption: str) -> str:
    """A figure with its PNG embedded as a data URI (the page refers to no other file)."""
    src = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return f'<figure><img alt="{name}" src="{src}"><figcaption>{html.escape(caption)}</figcaption></figure>'


CSS = ("body{font-family:system-ui,sans-serif;max-width:1280px;margin:1.5em auto;padding:0 1em;color:#222}"
       "img{max-width:100%;height:auto}figure{margin:1em 0}figcaption{color:#555;font-size:90%}"
       "table{border-collapse:collapse;font-size:13px;margin:.5em 0}"
       "th,td{border-bottom:1px solid #ddd;padding:2px 8px;text-align:right}"
       ".l{text-align:left}.pair{display:flex;flex-wrap:wrap;gap:1em}")


def write_page(rows, runs, out: str, metric: str = "macro_f1", correlation: list | None = None,
               sources=()) -> list[str]:
    """summary.html and summary.png in `out` from the summary rows and their runs; returns the two paths."""
    rows, classes = ranked(rows, metric), report_classes(runs)
    params, f1 = params_by_config(runs), per_class_f1(runs, classes)
    # what history.json has: the headline numbers, and auroc (roc_auc's per-epoch name) in two-class runs
    key = {"roc_auc": "auroc"}.get(metric, metric if metric in ("accuracy", "macro_f1", "weighted_f1") else "macro_f1")
    figures = [("comparison", fig_comparison(rows, metric),
                f"Mean {TITLES[metric]} per configuration, error bars: std over its runs; probe in grey."),
               ("cost", fig_cost(rows, params), "Head parameter count (the probe: its logistic-regression "
                "coefficients) and training seconds per configuration."),
               ("radar", fig_radar(rows, f1, classes),
                "Validation F1 per class of the top configurations (mean over runs)."),
               ("curves", fig_curves(rows, mean_curves(runs, key), key),
                f"Validation {TITLES.get(key, key)} per epoch from history.json; top configurations in colour.")]
    png_path, html_path = os.path.join(out, "summary.png"), os.path.join(out, "summary.html")
    tile([[figures[0][1]], [figures[1][1]], [figures[2][1], figures[3][1]]], png_path)
    body = [[i, r["config"], f"{fmt(metric, r[f'{metric}_mean'])} ± {fmt(metric, r[f'{metric}_std'])}",
             *(f"{v:.4f}" for v in f1[r["config"]]),
             "–" if params.get(r["config"]) is None else f"{params[r['config']]:,}",
             f"{r['train_s_mean']:.2f}", r["n"]] for i, r in enumerate(rows, 1)]
    parts = [f"<h1>Ablation summary</h1><p>{len(runs)} runs in {len(rows)} configurations, ranked by mean "
             f"{html.escape(TITLES[metric])} over each configuration's runs (seeds/folds), from "
             f"{html.escape(', '.join(map(str, sources)) or 'the run files')}.</p>",
             _img(*figures[0]), _img(*figures[1]), f'<div class="pair">{_img(*figures[2])}{_img(*figures[3])}</div>',
             "<h2>Configurations</h2>",
             _table(["#", "configuration", f"{TITLES[metric]} (mean ± std)", *(f"F1 {c}" for c in classes),
                     "params", "train s", "n"], body, left=1)]
    if correlation:
        parts += [f"<h2>Correlation with {html.escape(TITLES[metric])}</h2>",
                  "<p>Over head runs; other axes vary at the same time: descriptive, not a test.</p>",
                  _table(["hyperparameter", "n", "values", "Pearson r", "Spearman ρ"],
                         [[c["key"], c["n"], c["values"], f"{c['pearson']:+.3f}", f"{c['spearman']:+.3f}"]
                          for c in correlation], left=0)]
    with atomic_file(html_path, encoding="utf-8") as f:
        f.write(f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Ablation summary</title>'
                f'<style>{CSS}</style></head><body>\n' + "\n".join(parts) + "\n</body></html>\n")
    return [html_path, png_path]
