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
        else [("val", metrics)]
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


def print_summary(metrics: dict, run_dir: str | None, console) -> None:
    # The title goes on its own line: a table title wraps to the (narrow) table width.
    console.print(f"[bold]{metrics.get('fusion', '?')} · {metrics.get('modality', '?')}[/] · best epoch "
                  f"{metrics.get('best_epoch')} of {metrics.get('epochs_run')} · validation metrics"
                  + (f" · trained on {metrics['image_views_used']} augmented image views"
                     if metrics.get("image_views_used") else ""))
    console.print(summary_table(metrics))
    n = metrics.get("counts", {})
    timing = metrics.get("timing", {})
    test = f" · internal test {n['test']}" if "test" in n else ""
    test += "".join(f" · {name} {count}" for name, count in n.get("heldout", {}).items())
    val = f"{n.get('val')} (split {n['val_split']})" if "val_split" in n else n.get("val")
    console.print(f"train {n.get('train')} · val {val}{test} · invalid excluded {n.get('invalid_excluded')}"
                  f" · unlabelled {n.get('unlabelled')} · trained in {timing.get('train_s', 0):.1f}s on "
                  f"{timing.get('device')} ({timing.get('threads')} threads)", highlight=False)
    if "crossfit" in metrics:  # heads train --folds K: the table scores every labelled row out of fold
        f = metrics["folds"]["macro_f1"]
        console.print(f"cross-fit: {metrics['crossfit']} fold heads, metrics on the out-of-fold predictions of every "
                      f"labelled row · per fold macro_f1 {f['mean']:.4f} ± {f['std']:.4f}", highlight=False)
    if run_dir:
        console.print(f"run directory: {run_dir}", highlight=False)
