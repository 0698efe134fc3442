"""The measurements behind docs/default_choice.md: cross-fit runs trained in one process (one cache load), then
out-of-fold (OOF) tables over every labelled row.

    python scripts/oof_choice.py train --cache C.h5 --out /tmp/q/runs film-s0:fusion=film,seed=0 \
        concat-s0:fusion=concat,seed=0 film-md-s0:fusion=film,modality_dropout=0.2,seed=0 ...
    python scripts/oof_choice.py table --runs /tmp/q/runs film concat gmu film+gmu ...
    python scripts/oof_choice.py logreg --cache C.h5 --out /tmp/q/runs --C 0.3,1

`train NAME:flat=value,...` is `heads train --folds 5 --no-plots --threads 1 --flat value` (any TrainConfig flat
name; folds=10 overrides K) writing run directory OUT/NAME; each run's wall time goes to OUT/results.jsonl.
`table` reads OUT/NAME-s{0,1,2}/val_predictions.csv (the OOF probabilities) for every candidate (members joined
by `+` are averaged with equal weights, `@val` weights them by their OOF macro-F1 as `heads ensemble --weighting
val` does) and prints three tables:
  1. one OOF prediction per row (mean ± std over the seeds), plain and with per-class logit offsets tuned for
     macro-F1 nested (on 4/5 of the OOF rows, applied to the other 1/5) and in-sample (what --tune-bias
     reports: tuned and scored on the same rows, optimistic);
  2. the deployed-model proxy: each row's probabilities averaged over the seeds (every head out of fold for
     that row), with row-bootstrap differences against film. A K=5 run predicts with the average of its K
     heads, so one OOF prediction per row understates it (see docs/default_choice.md).
`table ... --seeds 0,1,2,3,4` uses other seeds than 0, 1, 2. `curve NAME --seeds 0,1,2,3,4`: metrics of n of NAME's seeds averaged per row, n = 1..5 (how much averaging
more heads buys). `average NAME=RUN+RUN+... ...`: each row's probabilities averaged over any runs, also of
different caches of the same rows (text backbones), with a paired row-bootstrap interval against the first
candidate. `logreg` writes OOF probabilities of a logistic regression on L2-normalised pooled text ||
pooled image (the README's hidden-set reference), as OUT/lr-C{C}-s{seed}/val_predictions.csv.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from heads.train.bias import tune_bias  # noqa: E402  (after the path: the script runs from any folder)
from heads.train.metrics import compute_metrics  # noqa: E402

SEEDS = (0, 1, 2)


def train(cache: str, out: str, specs: list[str]) -> None:
    # Imported here: `table` needs neither torch nor the cache.
    from heads.config import TrainConfig
    from heads.data.cache import load_cache
    from heads.train.crossfit import train_crossfit
    keys = ("text_pooled", "image_pooled", "image_tokens", "text_tokens", "text_mask")
    data = load_cache(cache, keys=keys)
    types = TrainConfig().flat()
    for spec in specs:
        name, _, kv = spec.partition(":")
        flat = {"folds": 5, "plots": False, "threads": 1}
        for item in filter(None, kv.split(",")):
            k, v = item.split("=")
            flat[k] = (v in ("1", "true")) if isinstance(types[k], bool) else type(types[k])(v)
        if os.path.exists(os.path.join(out, name, "metrics.json")):
            continue
        t = time.perf_counter()
        m = train_crossfit(TrainConfig.from_flat(flat).validate(), data, os.path.join(out, name)).metrics
        rec = {"name": name, "wall_s": round(time.perf_counter() - t, 1),
               **{k: m[k] for k in ("accuracy", "macro_f1", "weighted_f1")}}
        print(json.dumps(rec), flush=True)
        with open(os.path.join(out, "results.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")


def logreg(cache: str, out: str, cs: list[float]) -> None:
    # Imported here: only this command needs scikit-learn and the cache.
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    from heads.data.cache import load_cache
    d = load_cache(cache, keys=("text_pooled", "image_pooled"))
    keep = np.flatnonzero(d.valid & (d.labels >= 0))
    parts = [d.features[k].numpy()[keep].astype(np.float64) for k in ("text_pooled", "image_pooled")]
    x = np.hstack([p / np.linalg.norm(p, axis=1, keepdims=True) for p in parts])
    y = d.labels[keep]
    for c, seed in itertools.product(cs, SEEDS):
        probs = np.zeros((len(y), len(d.classes)))
        for tr, te in StratifiedKFold(5, shuffle=True, random_state=seed).split(x, y):
            probs[te] = LogisticRegression(C=c, max_iter=2000).fit(x[tr], y[tr]).predict_proba(x[te])
        run = os.path.join(out, f"lr-C{c}-s{seed}")
        os.makedirs(run, exist_ok=True)
        with open(os.path.join(run, "val_predictions.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["guid", "label", "pred"] + [f"p_{k}" for k in d.classes])
            for g, yy, p in zip(np.asarray(d.guids)[keep], y, probs):
                w.writerow([g, d.classes[yy], d.classes[p.argmax()]] + [f"{v:.6f}" for v in p])


def load(path: str):
    """(labels, probabilities, classes) of a val_predictions.csv, rows in guid order."""
    with open(path) as f:
        rows = sorted(csv.DictReader(f), key=lambda r: r["guid"])
    classes = [k[2:] for k in rows[0] if k.startswith("p_")]
    return (np.array([classes.index(r["label"]) for r in rows]),
            np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows]), classes)


def scores(y, pred, classes) -> np.ndarray:
    m = compute_metrics(y, pred, classes)
    return np.array([m["accuracy"], m["macro_f1"], m["weighted_f1"]])


def combined(runs: str, candidate: str, seeds):
    """(y, averaged probabilities, classes) of a candidate `a+b[@val]` over these seeds."""
    names, _, weighting = candidate.partition("@")
    loaded = [load(os.path.join(runs, f"{m}-s{s}", "val_predictions.csv")) for s in seeds for m in names.split("+")]
    y, _, classes = loaded[0]
    w = np.array([scores(y, p.argmax(1), classes)[1] if weighting == "val" else 1.0 for _, p, _ in loaded])
    return y, sum(wi * p for wi, (_, p, _) in zip(w / w.sum(), loaded)), classes


def with_bias(y, p, classes, seed: int, nested: bool) -> np.ndarray:
    lp = np.log(np.clip(p, 1e-12, None))
    if not nested:
        return scores(y, (lp + tune_bias(lp, y)).argmax(1), classes)
    from sklearn.model_selection import StratifiedKFold  # only the nested variant needs it
    pred = np.zeros(len(y), dtype=int)
    for tr, te in StratifiedKFold(5, shuffle=True, random_state=100 + seed).split(lp, y):
        pred[te] = (lp[te] + tune_bias(lp[tr], y[tr])).argmax(1)
    return scores(y, pred, classes)


def boot_deltas(y, p, ref, classes, draws) -> np.ndarray:
    """(draws, 3): scores of probabilities p minus those of ref on each bootstrap draw of the rows."""
    return np.array([scores(y[i], p.argmax(1)[i], classes) - scores(y[i], ref.argmax(1)[i], classes) for i in draws])


def mean_std(rows) -> str:
    a = np.array(rows)
    return " | ".join(f"{a[:, k].mean():.4f} ± {a[:, k].std(ddof=1):.4f}" for k in range(3))


def table(runs: str, candidates: list[str], reference: str = "film", boot: int = 300, seeds=SEEDS) -> None:
    print("| candidate | accuracy | macro-F1 | weighted-F1 |\n|---|---|---|---|")
    for c in candidates:
        per_seed = [combined(runs, c, (s,)) for s in seeds]
        print(f"| {c} | {mean_std([scores(y, p.argmax(1), k) for y, p, k in per_seed])} |")
        for nested in (True, False):
            rows = [with_bias(y, p, k, s, nested) for s, (y, p, k) in zip(seeds, per_seed)]
            print(f"| {c} + bias ({'nested' if nested else 'in-sample, optimistic'}) | {mean_std(rows)} |")
    print("\n| candidate, seeds averaged per row | accuracy | macro-F1 | weighted-F1 | Δ vs "
          f"{reference} (row bootstrap mean ± sd) |\n|---|---|---|---|---|")
    y, ref, classes = combined(runs, reference, seeds)
    rng = np.random.default_rng(0)
    draws = [rng.integers(0, len(y), len(y)) for _ in range(boot)]
    for c in candidates:
        _, p, _ = combined(runs, c, seeds)
        m = scores(y, p.argmax(1), classes)
        d = boot_deltas(y, p, ref, classes, draws)
        delta = " / ".join(f"{a:+.4f} ± {b:.4f}" for a, b in zip(d.mean(0), d.std(0)))
        print(f"| {c} | {m[0]:.4f} | {m[1]:.4f} | {m[2]:.4f} | {delta} |")


def curve(runs: str, name: str, seeds) -> None:
    """Metrics of n heads averaged per row (n = 1..len(seeds)): mean ± std over every n-subset of the seeds."""
    print(f"| {name}: heads averaged per row | subsets | accuracy | macro-F1 | weighted-F1 |\n|---|---|---|---|---|")
    for n in range(1, len(seeds) + 1):
        rows = []
        for subset in itertools.combinations(seeds, n):
            y, p, classes = combined(runs, name, subset)
            rows.append(scores(y, p.argmax(1), classes))
        cells = mean_std(rows) if len(rows) > 1 else " | ".join(f"{v:.4f}" for v in rows[0])
        print(f"| {n} | {len(rows)} | {cells} |")


def average(runs: str, specs: list[str], boot: int = 1000) -> None:
    """Candidates NAME=RUN+RUN+... (run directories under `runs`, any caches of the same rows): each row's OOF
    probabilities averaged over the runs, with the paired row-bootstrap difference to the first candidate
    (mean and 95% percentile interval). Compares heads of different caches (text backbones) at equal numbers
    of averaged runs."""
    cands = {}
    for spec in specs:
        name, _, members = spec.partition("=")
        loaded = [load(os.path.join(runs, m, "val_predictions.csv")) for m in members.split("+")]
        if any(not np.array_equal(y, loaded[0][0]) for y, _, _ in loaded):
            sys.exit(f"{name}: the runs do not score the same rows")
        cands[name] = (loaded[0][0], sum(p for _, p, _ in loaded) / len(loaded), loaded[0][2])
    (y, ref, classes), first = next(iter(cands.values())), next(iter(cands))
    rng = np.random.default_rng(0)
    draws = [rng.integers(0, len(y), len(y)) for _ in range(boot)]
    print(f"| candidate | runs | accuracy | macro-F1 | weighted-F1 | Δ vs {first} (row bootstrap, 95% interval) |\n"
          "|---|---|---|---|---|---|")
    for (name, (yc, p, _)), spec in zip(cands.items(), specs):
        if not np.array_equal(yc, y):
            sys.exit(f"{name} does not score the rows of {first}")
        m = scores(y, p.argmax(1), classes)
        d = boot_deltas(y, p, ref, classes, draws)
        lo, hi = np.percentile(d, [2.5, 97.5], axis=0)
        delta = " / ".join(f"{a:+.4f} [{b:+.4f}, {c:+.4f}]" for a, b, c in zip(d.mean(0), lo, hi))
        print(f"| {name} | {spec.partition('=')[2].count('+') + 1} | {m[0]:.4f} | {m[1]:.4f} | {m[2]:.4f} | {delta} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=("train", "table", "logreg", "curve", "average"))
    ap.add_argument("items", nargs="*", help="train: NAME:flat=value,...; table: candidates; average: "
                    "NAME=RUN+RUN+...")
    ap.add_argument("--cache", default="/work/shared-cache/mvsa-default.h5")
    ap.add_argument("--out", "--runs", dest="out", default="/tmp/q/runs")
    ap.add_argument("--C", default="0.3,1")
    ap.add_argument("--seeds", help="the seeds of the candidates' runs (curve: 0,1,2,3,4; table: 0,1,2)")
    a = ap.parse_intermixed_args()
    if a.command == "train":
        train(a.cache, a.out, a.items)
    elif a.command == "curve":
        for name in a.items:
            curve(a.out, name, [int(x) for x in (a.seeds or "0,1,2,3,4").split(",")])
    elif a.command == "average":
        average(a.out, a.items)
    elif a.command == "logreg":
        logreg(a.cache, a.out, [float(c) for c in a.C.split(",")])
    else:
        table(a.out, a.items, seeds=[int(x) for x in a.seeds.split(",")] if a.seeds else SEEDS)


if __name__ == "__main__":
    main()
