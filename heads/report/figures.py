"""Every PNG the project draws (matplotlib, Agg backend: no display needed, safe in threads and CI).

    run directory   curves.png     train loss, validation loss and the early-stopping metric per epoch
                    confusion.png  validation confusion matrix (counts, rows = true class)
                    gate.png       GMU only: the per-sample text share of the gate, overall / by true class /
                                   correct vs wrong
    report          comparison.png mean ± std of a metric per configuration (plot_comparison)
                    the page's figures: comparison, cost, radar, curves (fig_*: PNG bytes), tiled by tile()

matplotlib (and PIL for tile) are imported inside the functions: they are heavy, and `heads train --no-plots`,
`heads show` and the report's tables never need them.
"""
from __future__ import annotations

import io

import numpy as np

from featcache.outdir import atomic_file

from .runs import PROBE_NAME, TITLES

TOP = 5  # configurations drawn in colour on the page's radar and curves


def _pyplot():
    """matplotlib.pyplot on the Agg backend (chosen before pyplot is first imported)."""
    import matplotlib  # heavy: only imported when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): pyplot picks its backend on first import
    return plt


# ------------------------------------------------------------------------------------------ run directory
def plot_history(history: list[dict], path: str, metric: str = "macro_f1") -> None:
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    ax1.plot(epochs, [h["val_loss"] for h in history], label="val loss")
    ax1.set_xlabel("epoch")
    ax1.legend()
    names = ("accuracy", "macro_f1", "weighted_f1") + (("auroc",) if history and "auroc" in history[0] else ())
    for name in names:  # auroc: two-class runs (heads.train.metrics.quick_scores)
        ax2.plot(epochs, [h[name] for h in history], label=name, lw=2.5 if name == metric else 1)
    ax2.set_xlabel("epoch")
    ax2.set_ylim(0, 1)
    ax2.legend()
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_confusion(cm: np.ndarray, labels, path: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4, 3.6))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_gate(gate: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray, labels, path: str) -> None:
    """Gate = mean text weight per sample (1 = text only, 0 = image only)."""
    plt = _pyplot()
    bins = np.linspace(0, 1, 26)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5), sharex=True)
    axes[0].hist(gate, bins=bins, color="grey")
    axes[0].set_title("all validation samples")
    for c, name in enumerate(labels):
        axes[1].hist(gate[y_true == c], bins=bins, alpha=0.5, label=name)
    axes[1].set_title("by true class")
    ok = y_true == y_pred
    axes[2].hist(gate[ok], bins=bins, alpha=0.5, label=f"correct ({ok.sum()})")
    axes[2].hist(gate[~ok], bins=bins, alpha=0.5, label=f"wrong ({(~ok).sum()})")
    axes[2].set_title("correct vs wrong")
    for ax in axes:
        ax.set_xlabel("gate (text share)")
    for ax in axes[1:]:
        ax.legend()
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ report
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


def _width(rows) -> float:
    return max(6.0, 0.45 * len(rows) + 2)


def plot_comparison(rows: list[dict], path: str) -> None:
    """comparison.png: mean macro-F1 per configuration with std error bars."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(_width(rows), 4.5))
    comparison_bars(ax, rows)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _save(fig, path: str) -> None:
    """A figure as PNG at `path`, written atomically (a report read meanwhile never meets half a picture)."""
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=90)


def _png(fig) -> bytes:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.tight_layout()
    # bbox tight: keeps legends placed outside the axes; no Software metadata: no tool URL inside the page.
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def fig_comparison(rows, metric: str) -> bytes:
    fig, ax = _pyplot().subplots(figsize=(_width(rows), 4.5))
    comparison_bars(ax, rows, metric)
    ax.set_title(f"{TITLES[metric]} per configuration")
    return _png(fig)


def fig_cost(rows, params: dict) -> bytes:
    """Head parameters (log scale when they span orders of magnitude) and train seconds per configuration."""
    fig, (ax1, ax2) = _pyplot().subplots(2, 1, figsize=(_width(rows), 5.5), sharex=True)
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


def fig_radar(rows, f1: dict, classes: list[str]) -> bytes:
    """Per-class F1 (f1: configuration -> one value per class, in `classes` order) of the top configurations."""
    angles = np.linspace(0, 2 * np.pi, len(classes), endpoint=False).tolist()
    fig = _pyplot().figure(figsize=(6, 4.5))
    ax = fig.add_subplot(projection="polar")
    for i, row in enumerate(rows[:TOP]):
        values = f1[row["config"]]
        ax.plot(angles + angles[:1], values + values[:1], color=f"C{i}", lw=2, label=row["config"])
        ax.fill(angles + angles[:1], values + values[:1], color=f"C{i}", alpha=0.08)
    ax.set_xticks(angles, classes)
    ax.set_ylim(0, 1)
    ax.set_title(f"per-class F1, top {min(TOP, len(rows))} configurations", pad=14)
    ax.legend(loc="upper left", bbox_to_anchor=(1.08, 1.0), fontsize=7, frameon=False)
    return _png(fig)


def fig_curves(rows, curves: dict, key: str) -> bytes:
    """curves: configuration -> per-epoch mean of history[key]; the top configurations in colour."""
    fig, ax = _pyplot().subplots(figsize=(6, 4.5))
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
    from PIL import Image  # heavy: only the report page pastes images

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
    with atomic_file(path, "wb") as f:
        canvas.save(f, format="PNG")
