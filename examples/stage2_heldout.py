"""Stage 1 vs stage 2 on held-out rows, from finished `heads finetune --init RUN` run directories whose RUN was
trained with --test-ratio (their metrics.json hold init_test and test). Prints one markdown row per metric.

    .venv/bin/python examples/stage2_heldout.py runs/t2-film-s*
    .venv/bin/python examples/stage2_heldout.py runs/fresh-s0=runs/t1-s0 runs/fresh-s1=runs/t1-s1

`STAGE2=STAGE1` pairs a stage-2 run that trained a fresh head (no --init) on the split of a stage-1 run (the
stage-1 run's split.json as --split-file: same train, validation and internal test rows) with that run.

Validation numbers of an --init run can only go up (the init head is kept unless an epoch beats it), so the
internal test rows, never used for selection, are the ones that say whether stage 2 helped.
"""
import json
import os
import statistics as st
import sys

from scipy.stats import binomtest, ttest_rel


def load(arg: str) -> dict:
    """metrics.json of an --init run, or of a fresh run with its stage-1 run's scores filled in as the init's."""
    run, _, stage1 = arg.partition("=")
    m = json.load(open(os.path.join(run, "metrics.json")))
    if stage1:
        s1 = json.load(open(os.path.join(stage1, "metrics.json")))
        m = {**m, "init_scores": s1, "init_test": s1["test"], "test": m["heldout"]["test"]}
    return m


def main(runs):
    runs = [r.rstrip("/") for r in runs]
    ms = [load(r) for r in runs]
    missing = [r for r, m in zip(runs, ms) if "init_test" not in m]
    if missing:
        sys.exit(f"{missing[0]}: no init_test in metrics.json (its --init run had no --test-ratio)")
    fmt = lambda v: f"{st.mean(v):.4f}" + (f" ± {st.stdev(v):.4f}" if len(v) > 1 else "")
    print(f"{len(ms)} runs: {', '.join(os.path.basename(r.partition('=')[0]) for r in runs)}")
    print("| metric | val, stage 1 → 2 | internal test, stage 1 → 2 | test change: mean, up / down / same | "
          "paired t-test p | sign test p |")
    print("|---|---|---|---|---|---|")
    for key in ("macro_f1", "accuracy", "weighted_f1"):
        v1, v2 = [m["init_scores"][key] for m in ms], [m[key] for m in ms]
        t1, t2 = [m["init_test"][key] for m in ms], [m["test"][key] for m in ms]
        d = [b - a for a, b in zip(t1, t2)]
        up, down = sum(x > 0 for x in d), sum(x < 0 for x in d)
        sign = binomtest(up, up + down).pvalue if up + down else 1.0
        print(f"| {key} | {fmt(v1)} → {fmt(v2)} | {fmt(t1)} → {fmt(t2)} | {st.mean(d):+.4f}, {up} / {down} / "
              f"{len(d) - up - down} | {ttest_rel(t2, t1).pvalue:.2f} | {sign:.2f} |")
    print("per-run test macro-F1 change:", ", ".join(f"{m['test']['macro_f1'] - m['init_test']['macro_f1']:+.4f}"
                                                  for m in ms))


if __name__ == "__main__":
    main(sys.argv[1:])
