"""Classification metrics (sklearn's definitions, numpy only) as a JSON-ready dict, and the scores that select
a model (early stopping and the best state).

Always computed over the full class list of the cache so that a class absent from a small validation split
still gets a row (support 0) and the confusion matrix keeps its C x C shape.
"""
from __future__ import annotations

import numpy as np

from featcache.errors import ConfigError

SELECTION_METRICS = ("macro_f1", "accuracy", "weighted_f1", "auroc")  # what `--metric` may select on


def compute_metrics(y_true, y_pred, classes: list[str], scores=None) -> dict:
    """accuracy, macro_f1, weighted_f1, per_class {label: precision/recall/f1/support}, confusion_matrix; with
    two classes and `scores` (logits or probabilities, (n, 2)) also roc_auc of the positive class, classes[1].

    sklearn's definitions (zero_division=0, every label in the averages), computed from the confusion matrix
    in numpy: importing sklearn.metrics alone took ~1.4 s of a `heads train` command.
    tests/test_sklearn_parity.py checks equality with sklearn."""
    k = len(classes)
    cm = _confusion(y_true, y_pred, k)
    tp, predicted, support = np.diag(cm).astype(np.float64), cm.sum(0), cm.sum(1)
    p = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    r = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    f = _f1_per_class(cm)
    out = {
        **_headline(cm, f),
        "per_class": {name: {"precision": float(p[c]), "recall": float(r[c]), "f1": float(f[c]),
                             "support": int(support[c])} for c, name in enumerate(classes)},
        "confusion_matrix": cm.tolist(),
    }
    if k == 2 and scores is not None:
        out["roc_auc"] = roc_auc(y_true, positive_score(scores))
    return out


def positive_score(logits) -> np.ndarray:
    """P(class 1) of two-class logits: the softmax, computed as the logistic of the logit difference (a
    monotone function of it, so the ROC is the same either way)."""
    z = np.asarray(logits, dtype=np.float64)
    return 1.0 / (1.0 + np.exp(z[:, 0] - z[:, 1]))


def roc_auc(y_true, score) -> float | None:
    """Area under the ROC curve of `score` for label 1 vs 0: sklearn.metrics.roc_auc_score's value, from the
    Mann-Whitney rank sum (ties get their average rank, i.e. count one half). None when only one class is
    present (the area is undefined; sklearn raises)."""
    y, s = np.asarray(y_true) == 1, np.asarray(score, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    # average rank (1-based) of each run of equal scores
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], s.size]
    ranks = np.empty(s.size)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


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


def quick_scores(y_true, y_pred, num_classes: int, logits=None) -> dict:
    """The three headline numbers (zero_division=0, all classes in the macro average), for per-epoch
    validation without the per-class detail; two classes with `logits` add `auroc` (roc_auc of class 1;
    0.0 while undefined, so epochs can still be compared)."""
    cm = _confusion(y_true, y_pred, num_classes)
    out = _headline(cm, _f1_per_class(cm))
    if num_classes == 2 and logits is not None:
        out["auroc"] = roc_auc(y_true, positive_score(logits)) or 0.0
    return out


def check_selection_metric(name: str) -> str:
    """The early-stopping / best-state metric (heads.report has its own, wider list of report metrics)."""
    if name not in SELECTION_METRICS:
        raise ConfigError(f"unknown metric {name!r}; valid: {', '.join(SELECTION_METRICS)}")
    return name


def check_metric_classes(name: str, classes: list[str], cache: str) -> None:
    """auroc selects on the ROC of class 1 vs class 0: it needs a two-class cache."""
    if name == "auroc" and len(classes) != 2:
        raise ConfigError(f"--metric auroc needs a two-class task, but {cache} has {len(classes)} classes "
                          f"({', '.join(classes)}); use macro_f1, accuracy or weighted_f1")
