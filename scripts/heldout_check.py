"""Does the out-of-fold proxy predict the deployed model on rows it never saw? (docs/default_choice.md)

The proxy scores each labelled row with heads that did not train on it, but a fold head also early-stops on
its own validation fold, the rows it then scores; the deployed model (every fold head of every run averaged)
never sees the rows it predicts. This sets aside a stratified share of the labelled rows, to be trained
without (`--set split_file=...`), and compares the model trained on the rest, on that share, with the
reference run's out-of-fold scores of the same rows:

    python scripts/heldout_check.py split --oof runs/main --out runs/heldout/split.csv
    heads ablate --cache C.h5 ... --set split_file=runs/heldout/split.csv --out runs/heldout/NAME   # per cache
    heads ensemble runs/heldout/NAME/runs/... --out runs/heldout/ens
    python scripts/heldout_check.py score --run runs/heldout/ens --cache a.h5,b.h5 \
        --split-file runs/heldout/split.csv --oof runs/main
"""
from __future__ import annotations

import argparse
import csv
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from oof_choice import load, scores  # noqa: E402  (after the path: the script runs from any folder)


def guids_of(run: str) -> list[str]:
    """The guids of a run's val_predictions.csv in `oof_choice.load`'s row order (sorted)."""
    with open(os.path.join(run, "val_predictions.csv")) as f:
        return sorted(r["guid"] for r in csv.DictReader(f))


def split(oof: str, out: str, test: float, seed: int) -> None:
    """A stratified `test` share of the rows the reference run scored, as a `guid,split` file."""
    from sklearn.model_selection import train_test_split  # only this command needs it
    y, _, _ = load(os.path.join(oof, "val_predictions.csv"))
    guids = guids_of(oof)
    held = set(train_test_split(guids, test_size=test, stratify=y, random_state=seed)[1])
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        f.write("guid,split\n" + "".join(f"{g},{'test' if g in held else 'train'}\n" for g in guids))
    print(f"wrote {out}: {len(guids) - len(held)} train, {len(held)} test")


def score(run: str, caches: list[str], split_file: str, oof: str, boot: int = 2000) -> None:
    from heads import load_run  # loads torch: only this command needs it
    with open(split_file) as f:
        held = {r["guid"] for r in csv.DictReader(f) if r["split"] == "test"}
    y, p_oof, classes = load(os.path.join(oof, "val_predictions.csv"))
    guids = guids_of(oof)
    rows = np.array([g in held for g in guids])
    pred = load_run(run).predict_cache(caches, split="train")  # MVSA's labelled rows are its split 'train'
    where = {g: i for i, g in enumerate(pred.ids)}
    p_held = np.asarray(pred.proba)[[where[g] for g, r in zip(guids, rows) if r]]
    y, p_oof = y[rows], p_oof[rows]
    a, b = scores(y, p_held.argmax(1), classes), scores(y, p_oof.argmax(1), classes)
    rng = np.random.default_rng(0)
    d = np.array([scores(y[i], p_held.argmax(1)[i], classes) - scores(y[i], p_oof.argmax(1)[i], classes)
                  for i in (rng.integers(0, len(y), len(y)) for _ in range(boot))])
    lo, hi = np.percentile(d, [2.5, 97.5], axis=0)
    print(f"{rows.sum()} held-out rows | accuracy | macro-F1 | weighted-F1\n---|---|---|---")
    print("deployed model trained without them | " + " | ".join(f"{v:.4f}" for v in a))
    print(f"{oof} out of fold | " + " | ".join(f"{v:.4f}" for v in b))
    print("difference (row bootstrap, 95%) | " + " | ".join(f"{m:+.4f} [{l:+.4f}, {h:+.4f}]"
                                                        for m, l, h in zip(d.mean(0), lo, hi)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=("split", "score"))
    ap.add_argument("--oof", required=True, help="the reference run: its val_predictions.csv")
    ap.add_argument("--out", help="split: the guid,split file to write")
    ap.add_argument("--test", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--run", help="score: the run trained without the held-out rows")
    ap.add_argument("--cache", help="score: its cache(s), comma-separated")
    ap.add_argument("--split-file", help="score: the file `split` wrote")
    a = ap.parse_args()
    if a.command == "split":
        split(a.oof, a.out, a.test, a.seed)
    else:
        score(a.run, a.cache.split(","), a.split_file, a.oof)


if __name__ == "__main__":
    main()
