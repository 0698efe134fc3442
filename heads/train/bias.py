"""`--tune-bias`: per-class logit offsets, fitted on the validation split to maximise macro-F1.

A head trained with (weighted) cross-entropy ranks samples well but puts the decision threshold of a rare
class (neutral) where accuracy, not macro-F1, wants it. Adding a constant b_c to class c's logit moves that
threshold without retraining. The search is coordinate ascent over a grid (class 0 stays at 0: only
differences between offsets matter), a few sweeps, ties broken towards the smaller offset.

Caveat, reported with the metrics: offsets tuned and scored on the same validation split are optimistic;
both the tuned and the untuned numbers are written.
"""
from __future__ import annotations

import numpy as np

from .metrics import macro_f1

DEFAULT_GRID = np.round(np.arange(-3.0, 3.0001, 0.1), 4)


def tune_bias(logits: np.ndarray, y: np.ndarray, grid=DEFAULT_GRID, sweeps: int = 3) -> np.ndarray:
    """Offsets b (C,) maximising macro-F1 of argmax(logits + b) on (logits, y)."""
    logits, y = np.asarray(logits, dtype=np.float64), np.asarray(y)
    num_classes = logits.shape[1]
    b = np.zeros(num_classes)
    best = macro_f1(y, (logits + b).argmax(1), num_classes)
    order = np.argsort(np.abs(grid), kind="stable")  # smaller offsets first: they win ties
    for _ in range(sweeps):
        improved = False
        for c in range(1, num_classes):
            for v in np.asarray(grid)[order]:
                trial = b.copy()
                trial[c] = v
                score = macro_f1(y, (logits + trial).argmax(1), num_classes)
                if score > best + 1e-12:
                    best, b, improved = score, trial, True
        if not improved:
            break
    return b


def apply_bias(logits: np.ndarray, bias) -> np.ndarray:
    return np.asarray(logits) + (np.asarray(bias) if bias is not None else 0.0)
