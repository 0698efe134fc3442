"""A one-page summary of an ablation from its run files: summary.html (self-contained: the figures are PNGs
embedded as base64 data URIs, inline CSS, no script, no external asset) and summary.png (the same figures
tiled into one image).

    figures   comparison   mean ± std of the report metric per configuration (summary.comparison_bars)
              cost         head parameters (log scale) and train seconds per configuration, same order
              radar        per-class F1 (negative / neutral / positive) of the top configurations
              curves       validation macro-F1 per epoch from history.json, mean over each configuration's
                           runs still training at that epoch (early stopping ends seeds at different epochs)
    tables    every configuration (metric, per-class F1, params, train s, n); correlation of numeric
              hyperparameters with the metric (heads.groupby)

Written by `heads report` (so at the end of every `heads ablate`). Each figure is drawn once; summary.png
pastes the PNGs together instead of drawing them again.
"""
from __future__ import annotations

import base64
import html
import io
import os

import numpy as np

from featcache.dataset import LABELS

from .export import config_params, fmt, ranked
from .rundir import load_json
from .summary import TITLES, comparison_bars

TOP = 5  # configurations drawn in colour on the radar and the curves


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.tight_layout()
    # bbox tight: keeps legends placed outside the axes; no Software metadata: no tool URL inside the page.
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _width(rows) -> float:
    return max(6.0, 0.45 * len(rows) + 2)


def fig_comparison(rows, metric: str) -> bytes:
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(_width(rows), 4.5))
    comparison_bars(ax, rows, metric)
    ax.set_title(f"{TITLES[metric]} per configuration")
    return _png(fig)


def fig_cost(rows, params: dict) -> bytes:
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(_width(rows), 5.5), sharex=True)
    x = np.arange(len(rows))
    counts = [params.get(r["config"]) for r in rows]
    known = [c for c in counts if c]
    ax1.bar([i for i, c in zip(x, counts) if c], known, color="tab:purple")
    if known and max(known) > 20 * min(known):  # log only when sizes span orders of magnitude
        ax1.set_yscale("log")
    ax1.set_ylabel("head parameters")
    ax1.set_title("parameters and train time per configuration")
    ax2.bar(x, [r["train_s_mean"] for r in rows], yerr=[r["train_s_std"] for r in rows], capsize=3,
            color="tab:orange")
    ax2.set_ylabel("train s (mean ± std)")
    ax2.set_xticks(x, [r["config"] for r in rows], rotation=60, ha="right", fontsize=7)
    return _png(fig)


def per_class_f1(runs) -> dict[str, list[float]]:
    """Configuration -> mean over its runs of the validation F1 of each class in LABELS order."""
    groups: dict[str, list] = {}
    for r in runs:
        groups.setdefault(r.config, []).append([r.metrics["per_class"][c]["f1"] for c in LABELS])
    return {c: np.mean(v, axis=0).tolist() for c, v in groups.items()}


def fig_radar(rows, f1: dict) -> bytes:
    import matplotlib.pyplot as plt
    angles = np.linspace(0, 2 * np.pi, len(LABELS), endpoint=False).tolist()
    fig = plt.figure(figsize=(6, 4.5))
    ax = fig.add_subplot(projection="polar")
    for i, row in enumerate(rows[:TOP]):
        values = f1[row["config"]]
        ax.plot(angles + angles[:1], values + values[:1], color=f"C{i}", lw=2, label=row["config"])
        ax.fill(angles + angles[:1], values + values[:1], color=f"C{i}", alpha=0.08)
    ax.set_xticks(angles, LABELS)
    ax.set_ylim(0, 1)
    ax.set_title(f"per-class F1, top {min(TOP, len(rows))} configurations", pad=14)
    ax.legend(loc="upper left", bbox_to_anchor=(1.08, 1.0), fontsize=7, frameon=False)
    return _png(fig)


def mean_curves(runs, key: str) -> dict[str, np.ndarray]:
    """Configuration -> per-epoch mean of history[key] over its runs that reached the epoch (runs without a
    history.json, e.g. probes, are left out)."""
    histories: dict[str, list] = {}
    for r in runs:
        path = os.path.join(r.dir, "history.json")
        if os.path.exists(path):
            histories.setdefault(r.config, []).append([h[key] for h in load_json(path)])
    curves = {}
    for config, hs in histories.items():
        n = max(len(h) for h in hs)
        curves[config] = np.array([np.mean([h[e] for h in hs if len(h) > e]) for e in range(n)])
    return curves


def fig_curves(rows, curves: dict, key: str) -> bytes:
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4.5))
    top = [r["config"] for r in rows[:TOP]]
    for config, c in curves.items():
        if config not in top:  # the rest as a grey background: where the top ones stand among all
            ax.plot(np.arange(1, len(c) + 1), c, color="0.75", lw=0.8)
    for i, config in enumerate(top):
        if config in curves:
            ax.plot(np.arange(1, len(curves[config]) + 1), curves[config], color=f"C{i}", lw=2, label=config)
    if not curves:
        ax.text(0.5, 0.5, "no history.json in these runs", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation {TITLES.get(key, key)}")
    ax.set_title(f"{TITLES.get(key, key)} per epoch (mean over runs still training)")
    if any(c in curves for c in top):
        ax.legend(fontsize=7, frameon=False)
    return _png(fig)


def tile(rows_of_pngs: list[list[bytes]], path: str) -> None:
    """Paste PNGs into one image: each inner list is a row, left-aligned on white."""
    from PIL import Image
    grid = [[Image.open(io.BytesIO(b)).convert("RGB") for b in row] for row in rows_of_pngs]
    width = max(sum(im.width for im in row) for row in grid)
    height = sum(max(im.height for im in row) for row in grid)
    canvas = Image.new("RGB", (width, height), "white")
    y = 0
    for row in grid:
        x = 0
        for im in row:
            canvas.paste(im, (x, y))
            x += im.width
        y += max(im.height for im in row)
    canvas.save(path)


def _table(header: list[str], body: list[list], left: int) -> str:
    """HTML table; column `left` (the names) is left-aligned, numbers right-aligned."""
    cls = lambda j: ' class="l"' if j == left else ""  # noqa: E731
    th = "".join(f"<th{cls(j)}>{html.escape(str(h))}</th>" for j, h in enumerate(header))
    trs = "".join("<tr>" + "".join(f"<td{cls(j)}>{html.escape(str(v))}</td>" for j, v in enumerate(row)) + "</tr>"
                  for row in body)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


CSS = ("body{font-family:system-ui,sans-serif;max-width:1280px;margin:1.5em auto;padding:0 1em;color:#222}"
       "img{max-width:100%;height:auto}figure{margin:1em 0}figcaption{color:#555;font-size:90%}"
       "table{border-collapse:collapse;font-size:13px;margin:.5em 0}"
       "th,td{border-bottom:1px solid #ddd;padding:2px 8px;text-align:right}"
       ".l{text-align:left}.pair{display:flex;flex-wrap:wrap;gap:1em}")


def write_page(rows, runs, out: str, metric: str = "macro_f1", correlation: list | None = None,
               sources=()) -> list[str]:
    """summary.html and summary.png in `out` from the summary rows and their runs; returns the two paths."""
    from . import plots  # noqa: F401  (selects the Agg backend)

    rows = ranked(rows, metric)
    params, f1 = config_params(runs), per_class_f1(runs)
    key = metric if metric in ("accuracy", "macro_f1", "weighted_f1") else "macro_f1"  # what history.json has
    figures = [("comparison", fig_comparison(rows, metric),
                f"Mean {TITLES[metric]} per configuration, error bars: std over its runs; probe in grey."),
               ("cost", fig_cost(rows, params), "Head parameter count (the probe: its logistic-regression "
                "coefficients) and training seconds per configuration."),
               ("radar", fig_radar(rows, f1), "Validation F1 per class of the top configurations (mean over runs)."),
               ("curves", fig_curves(rows, mean_curves(runs, key), key),
                f"Validation {TITLES[key]} per epoch from history.json; top configurations in colour.")]
    png_path, html_path = os.path.join(out, "summary.png"), os.path.join(out, "summary.html")
    tile([[figures[0][1]], [figures[1][1]], [figures[2][1], figures[3][1]]], png_path)

    def img(name, data, caption):
        src = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        return f'<figure><img alt="{name}" src="{src}"><figcaption>{html.escape(caption)}</figcaption></figure>'

    body = [[i, r["config"], f"{fmt(metric, r[f'{metric}_mean'])} ± {fmt(metric, r[f'{metric}_std'])}",
             *(f"{v:.4f}" for v in f1[r["config"]]),
             "–" if params.get(r["config"]) is None else f"{params[r['config']]:,}",
             f"{r['train_s_mean']:.2f}", r["n"]] for i, r in enumerate(rows, 1)]
    n_configs, n_runs = len(rows), len(runs)
    parts = [f"<h1>Ablation summary</h1><p>{n_runs} runs in {n_configs} configurations, ranked by mean "
             f"{html.escape(TITLES[metric])} over each configuration's runs (seeds/folds), from "
             f"{html.escape(', '.join(map(str, sources)) or 'the run files')}.</p>",
             img(*figures[0]), img(*figures[1]), f'<div class="pair">{img(*figures[2])}{img(*figures[3])}</div>',
             "<h2>Configurations</h2>",
             _table(["#", "configuration", f"{TITLES[metric]} (mean ± std)", *(f"F1 {c}" for c in LABELS),
                     "params", "train s", "n"], body, left=1)]
    if correlation:
        parts += [f"<h2>Correlation with {html.escape(TITLES[metric])}</h2>",
                  "<p>Over head runs; other axes vary at the same time: descriptive, not a test.</p>",
                  _table(["hyperparameter", "n", "values", "Pearson r", "Spearman ρ"],
                         [[c["key"], c["n"], c["values"], f"{c['pearson']:+.3f}", f"{c['spearman']:+.3f}"]
                          for c in correlation], left=0)]
    with open(html_path, "w", encoding="utf-8") as f:
        f.write(f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Ablation summary</title>'
                f'<style>{CSS}</style></head><body>\n' + "\n".join(parts) + "\n</body></html>\n")
    return [html_path, png_path]
