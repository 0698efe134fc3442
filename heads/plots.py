"""PNG plots for a run directory (matplotlib, Agg backend: no display needed, safe in threads and CI).

    curves.png     train loss, validation loss and the early-stopping metric per epoch
    confusion.png  validation confusion matrix (counts, rows = true class)
    gate.png       GMU only: the per-sample text share of the gate, overall / by true class / correct vs wrong
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402


def plot_history(history: list[dict], path: str, metric: str = "macro_f1") -> None:
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    ax1.plot(epochs, [h["val_loss"] for h in history], label="val loss")
    ax1.set_xlabel("epoch")
    ax1.legend()
    for name in ("accuracy", "macro_f1", "weighted_f1"):
        ax2.plot(epochs, [h[name] for h in history], label=name, lw=2.5 if name == metric else 1)
    ax2.set_xlabel("epoch")
    ax2.set_ylim(0, 1)
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_confusion(cm: np.ndarray, labels, path: str) -> None:
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
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_gate(gate: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray, labels, path: str) -> None:
    """Gate = mean text weight per sample (1 = text only, 0 = image only)."""
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
    fig.savefig(path, dpi=90)
    plt.close(fig)
