"""The short rich table of one run's metrics.json, printed at the end of `heads train` and `heads finetune` and
by `heads show`.

It lives with the reports because it only reads what a run directory holds (metrics.json), like the rest of
heads.report, so `heads show` needs nothing of the training code; training calls it, never the other way.
"""
from __future__ import annotations

from rich.table import Table

from .runs import run_classes


def summary_table(metrics: dict) -> Table:
    t = Table()
    t.add_column("")
    cols = [("untuned", metrics["untuned"]), ("tuned bias", metrics)] if "untuned" in metrics \
        else [("out of fold" if "crossfit" in metrics or metrics.get("out_of_fold") else "val", metrics)]
    if "test" in metrics:  # --test-ratio: the held-out split, never used for selection
        cols.append(("internal test", metrics["test"]))
    if "init_test" in metrics:  # stage 2 from an init run with a test split: that head on the same rows
        cols.append(("init head, test", metrics["init_test"]))
    for name, m in metrics.get("heldout", {}).items():  # the data's own labelled splits, scored once
        cols.append((f"{name} (held out)", m))
    for name, _ in cols:
        t.add_column(name, justify="right")
    keys = ("accuracy", "macro_f1", "weighted_f1") + (("roc_auc",) if "roc_auc" in metrics else ())
    for key in keys:  # roc_auc: two-class tasks, of class 1 (none where a split holds one class only)
        t.add_row(key, *[f"{m[key]:.4f}" if m.get(key) is not None else "-" for _, m in cols])
    for c in run_classes(metrics):
        t.add_row(f"F1 {c}", *[f"{m['per_class'][c]['f1']:.4f}" for _, m in cols])
    return t


def _title(metrics: dict) -> str:
    """What the table scores: one head's validation rows, every labelled row out of fold, or an ensemble."""
    head = f"[bold]{metrics.get('fusion', '?')} · {metrics.get('modality', '?')}[/]"
    views = f" · trained on {metrics['image_views_used']} augmented image views" \
        if metrics.get("image_views_used") else ""
    if "members" in metrics:  # heads ensemble: no training of its own
        if not metrics.get("validated", True):
            what = "members validated on different rows: no metrics of its own"
        elif metrics.get("out_of_fold"):
            what = "out-of-fold metrics of the averaged probabilities (cross-fit members)"
        else:
            what = "validation metrics of the averaged probabilities"
        return f"{head} · {len(metrics['members'])} members · {what}"
    if "crossfit" in metrics:  # heads train --folds K: each fold head stops at its own epoch
        epochs = ", ".join(str(e) for e in metrics["folds"].get("best_epoch", []))
        return f"{head} · {metrics['crossfit']}-fold cross-fit · best epochs {epochs} · out-of-fold metrics{views}"
    return f"{head} · best epoch {metrics.get('best_epoch')} of {metrics.get('epochs_run')} · validation " \
           f"metrics{views}"


def _counts_line(metrics: dict) -> str:
    n, timing = metrics.get("counts", {}), metrics.get("timing", {})
    test = f" · internal test {n['test']}" if "test" in n else ""
    test += "".join(f" · {name} {count}" for name, count in n.get("heldout", {}).items())
    rest = f" · invalid excluded {n.get('invalid_excluded')} · unlabelled {n.get('unlabelled')}"
    if "crossfit" in metrics:
        rows = f"{n.get('train')} labelled rows, each scored by the head that did not train on it{test}"
    else:
        val = f"{n.get('val')} (split {n['val_split']})" if "val_split" in n else n.get("val")
        rows = f"train {n.get('train')} · val {val}{test}"
    # cross-fit folds side by side: the run's wall time (train_s sums the folds' own, which overlap)
    side = timing.get("workers", 1) > 1
    how = f"{timing.get('workers')} folds at a time, 1 thread each" if side else f"{timing.get('threads')} threads"
    secs = timing.get("total_s") if side else timing.get("train_s")
    trained = f" · trained in {secs:.1f}s{' (folds, cache load, scoring)' if side else ''} on " \
        f"{timing.get('device')} ({how})" if secs is not None else ""
    return rows + rest + trained


def print_summary(metrics: dict, run_dir: str | None, console) -> None:
    # The title goes on its own line: a table title wraps to the (narrow) table width.
    console.print(_title(metrics))
    if "members" not in metrics or metrics.get("validated", True):
        console.print(summary_table(metrics))
    for m in metrics.get("members", []):
        f1 = "-" if m.get("macro_f1") is None else f"{m['macro_f1']:.4f}"
        console.print(f"member {m['run']} · weight {m['weight']:.3f} · its macro_f1 {f1}", highlight=False)
    if "members" not in metrics:
        console.print(_counts_line(metrics), highlight=False)
    if "crossfit" in metrics:
        f = metrics["folds"]["macro_f1"]
        console.print(f"per fold macro_f1 {f['mean']:.4f} ± {f['std']:.4f}", highlight=False)
    if run_dir:
        console.print(f"run directory: {run_dir}", highlight=False)
