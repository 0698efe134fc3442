"""Classification metrics (sklearn's definitions, numpy only) as a JSON-ready dict, and the scores that select
a model (early stopping and the best state).

Always computed over the full class list of the cache so that a class absent from a small validation split
still gets a row (support 0) and the confusion matrix keeps its C x C shape.
"""
from __future__ import annotations

import numpy as np

from featcache.errors import ConfigError

SELECTION_METRICS = ("macro_f1", "accuracy", "weighted_f1")  # what `--metric` may select on


def compute_metrics(y_true, y_pred, classes: list[str]) -> dict:
    """accuracy, macro_f1, weighted_f1, per_class {label: precision/recall/f1/support}, confusion_matrix.

    sklearn's definitions (zero_division=0, every label in the averages), computed from the confusion matrix
    in numpy: importing sklearn.metrics alone took ~1.4 s of a `heads train` command.
    tests/test_sklearn_parity.py checks equality with sklearn."""
    k = len(classes)
    cm = _confusion(y_true, y_pred, k)
    tp, predicted, support = np.diag(cm).astype(np.float64), cm.sum(0), cm.sum(1)
    p = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    r = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    f = _f1_per_class(cm)
    return {
        **_headline(cm, f),
        "per_class": {name: {"precision": float(p[c]), "recall": float(r[c]), "f1": float(f[c]),
                             "support": int(support[c])} for c, name in enumerate(classes)},
        "confusion_matrix": cm.tolist(),
    }


def _confusion(y_true, y_pred, num_classes: int) -> np.ndarray:
    return np.bincount(np.asarray(y_true) * num_classes + np.asarray(y_pred),
                       minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _f1_per_class(cm: np.ndarray) -> np.ndarray:
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(0) + cm.sum(1)  # 2TP + FP + FN
    return np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)


def macro_f1(y_true, y_pred, num_classes: int) -> float:
    """Fast macro-F1 (numpy only): the bias search calls this thousands of times."""
    return float(_f1_per_class(_confusion(y_true, y_pred, num_classes)).mean())


def _headline(cm: np.ndarray, f1: np.ndarray) -> dict:
    support = cm.sum(1)
    return {"accuracy": float(np.trace(cm) / max(1, cm.sum())), "macro_f1": float(f1.mean()),
            "weighted_f1": float((f1 * support).sum() / max(1, support.sum()))}


def quick_scores(y_true, y_pred, num_classes: int) -> dict:
    """The three headline numbers (zero_division=0, all classes in the macro average), for per-epoch
    validation without the per-class detail."""
    cm = _confusion(y_true, y_pred, num_classes)
    return _headline(cm, _f1_per_class(cm))


def check_selection_metric(name: str) -> str:
    """The early-stopping / best-state metric (heads.report has its own, wider list of report metrics)."""
    if name not in SELECTION_METRICS:
        raise ConfigError(f"unknown metric {name!r}; valid: {', '.join(SELECTION_METRICS)}")
    return name
