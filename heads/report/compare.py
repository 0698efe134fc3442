"""Comparisons between configurations on the SAME validation samples, from the runs' val_predictions.csv.

Paired comparison (`--baseline concat`, or any axis: `--baseline cache=raw-none`, `--baseline rdrop=0`): each
configuration against the configuration with the same values except KEY=VALUE (a bare name is a fusion).
Runs are paired by split (seed, fold): both validated on identical samples (caches of one ablation share
their split, by guid). The observed difference is the mean over pairs of macro-F1(config) -
macro-F1(baseline), i.e. exactly the difference of the two summary means when every run has a partner. Its
95% CI is a paired bootstrap over samples: each resample draws validation samples with replacement *within*
each pair (the same draw for both models, which is what makes it paired) and recomputes the mean per-pair
difference. Its two-sided bootstrap p-value is 2·min(share of resampled differences <= 0, share >= 0), with
the +1 correction ((count + 1) / (n_boot + 1)) so that no finite bootstrap claims p = 0. A grid makes many
comparisons against one baseline (48 configurations: 47), so the p-values are also Holm-adjusted over all
comparisons of the report (`p_holm`); `survives_holm` is p_holm < 0.05, the statement to make about a grid.

Modality analysis (as in the seed reports): for configurations that have text-only, image-only and fused
(`both`) runs with the same other values and split, pooled over splits: how often the two single-modality
models agree, and of the samples where exactly one of them is right, how often the fused model is right.
"""
from __future__ import annotations

import json
import os

import numpy as np

from featcache.errors import ConfigError
from featcache.outdir import atomic_file

from ..rundir import read_predictions
from .tables import write_csv


def _macro_f1_batched(y: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Macro-F1 of each row of (B, n) label/prediction arrays (same definition as metrics.compute_metrics:
    every class in the average, F1 = 0 for a class with no true and no predicted samples)."""
    B = y.shape[0]
    codes = (np.arange(B)[:, None] * num_classes + y) * num_classes + pred
    cm = np.bincount(codes.ravel(), minlength=B * num_classes ** 2).reshape(B, num_classes, num_classes)
    tp = np.diagonal(cm, axis1=1, axis2=2).astype(np.float64)
    denom = cm.sum(1) + cm.sum(2)
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return f1.mean(1)


def paired_bootstrap(groups, num_classes: int, n_boot: int = 2000, seed: int = 0) -> dict:
    """groups: [(y, pred_a, pred_b), ...], one per split, labels in range(num_classes). Returns the observed
    mean per-group macro-F1 difference a - b, the 95% percentile CI, and the bootstrap share of differences
    <= 0. Deterministic for a given seed."""
    rng = np.random.default_rng(seed)
    observed, boot = 0.0, np.zeros(n_boot)
    for y, a, b in groups:
        y, a, b = np.asarray(y), np.asarray(a), np.asarray(b)
        observed += (_macro_f1_batched(y[None], a[None], num_classes)[0]
                     - _macro_f1_batched(y[None], b[None], num_classes)[0])
        idx = rng.integers(0, len(y), size=(n_boot, len(y)))
        boot += _macro_f1_batched(y[idx], a[idx], num_classes) - _macro_f1_batched(y[idx], b[idx], num_classes)
    k = max(1, len(groups))
    observed, boot = observed / k, boot / k
    lo, hi = np.percentile(boot, [2.5, 97.5])
    tail = min(np.sum(boot <= 0), np.sum(boot >= 0))
    return {"diff": float(observed), "ci_lo": float(lo), "ci_hi": float(hi),
            "p_le_0": float(np.mean(boot <= 0)), "p": float(min(1.0, 2 * (tail + 1) / (n_boot + 1))),
            "n_boot": n_boot}


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjustment (family-wise error over all the comparisons), in the input order."""
    p = np.asarray(pvalues, dtype=np.float64)
    m = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return out


class _Preds:
    """val_predictions.csv per run, read once: (guids, labels, predictions), class names turned into label
    indices by the run's own class list."""

    def __init__(self):
        self.cache: dict[str, tuple] = {}

    def __call__(self, run) -> tuple[list, np.ndarray, np.ndarray]:
        if run.dir not in self.cache:
            rows, index = read_predictions(os.path.join(run.dir, "val_predictions.csv")), run.classes.index
            self.cache[run.dir] = ([r["guid"] for r in rows], np.array([index(r["label"]) for r in rows]),
                                   np.array([index(r["pred"]) for r in rows]))
        return self.cache[run.dir]


def _by_params(runs) -> dict[str, list]:
    out: dict[str, list] = {}
    for r in runs:
        if "probe" not in r.params:
            out.setdefault(json.dumps(r.params, sort_keys=True), []).append(r)
    return out


def parse_baseline(baseline: str) -> tuple[str, str]:
    """"concat" -> ("fusion", "concat"); "cache=raw-none" -> ("cache", "raw-none")."""
    key, _, value = baseline.partition("=") if "=" in baseline else ("fusion", "=", baseline)
    if not key.strip() or not value.strip():
        raise ConfigError(f"--baseline {baseline!r}: give a fusion name or KEY=VALUE (e.g. cache=raw-none)")
    return key.strip(), value.strip()


_MISSING = object()


def _same(a, text: str) -> bool:
    """Whether config value `a` is what `text` names: "0" names 0.0, "off" names False."""
    if isinstance(a, bool):
        return text.lower() in (("true", "on", "1", "yes") if a else ("false", "off", "0", "no"))
    if isinstance(a, (int, float)):
        try:
            return float(text) == float(a)
        except ValueError:
            return False
    return str(a) == text


def paired_comparison(runs, baseline: str, n_boot: int = 2000, seed: int = 0) -> list[dict]:
    """Each configuration against its KEY=VALUE counterpart on the same splits, best difference first."""
    preds, groups = _Preds(), _by_params(runs)
    key_name, text = parse_baseline(baseline)
    params_of = {k: json.loads(k) for k in groups}
    base_value = next((p[key_name] for p in params_of.values() if key_name in p and _same(p[key_name], text)),
                      _MISSING)
    if base_value is _MISSING:
        return []  # no run has KEY=VALUE: write_paired says so
    rows = []
    for key, members in groups.items():
        params = params_of[key]
        if key_name not in params or params[key_name] == base_value:
            continue
        base_key = json.dumps({**params, key_name: base_value}, sort_keys=True)
        if base_key not in groups:
            continue
        pairs = _pairs(members, groups[base_key], preds)
        if not pairs:
            continue
        stats = paired_bootstrap(pairs, len(members[0].classes), n_boot=n_boot, seed=seed)
        rows.append({"config": members[0].config, "baseline": groups[base_key][0].config, "pairs": len(pairs),
                     "samples": int(sum(len(p[0]) for p in pairs)), **stats,
                     "significant": bool(stats["ci_lo"] > 0 or stats["ci_hi"] < 0)})
    for row, adjusted in zip(rows, holm([row["p"] for row in rows])):
        row.update(p_holm=float(adjusted), survives_holm=bool(adjusted < 0.05))
    rows.sort(key=lambda row: -row["diff"])
    return rows


def _pairs(members, base_members, preds) -> list[tuple]:
    """(labels, predictions, baseline predictions) for each run that has a baseline run on the same split."""
    base_runs = {r.pair_key: r for r in base_members}
    pairs = []
    for r in sorted(members, key=lambda r: r.pair_key):
        partner = base_runs.get(r.pair_key)
        if partner is None:
            continue
        g_a, y_a, p_a = preds(r)
        g_b, y_b, p_b = preds(partner)
        if g_a != g_b:  # same split arguments but another cache: not the same samples
            raise ConfigError(f"{r.dir} and {partner.dir} have the same seed/fold but different validation "
                             "samples; report runs of one cache together")
        pairs.append((y_a, p_a, p_b))
    return pairs


def write_paired(rows: list[dict], csv_path: str, md_path: str, baseline: str) -> None:
    cols = ["config", "baseline", "pairs", "samples", "diff", "ci_lo", "ci_hi", "p_le_0", "p", "p_holm", "n_boot",
            "significant", "survives_holm"]
    write_csv(csv_path, cols, rows)
    key_name, value = parse_baseline(baseline)
    lines = [f"# Paired comparison against {key_name}={value}", "",
             "Δ macro-F1 = mean over splits (seed/fold) of F1(config) − F1(baseline) on the same validation "
             "samples; 95% CI from a paired bootstrap over samples (resampled within each split); p two-sided "
             f"(bootstrap), Holm p adjusted over all {len(rows)} comparisons.", "",
             "| configuration | baseline | Δ macro-F1 | 95% CI | P(Δ≤0) | p | Holm p | splits | samples |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mark = (" *" if r["significant"] else "") + (" †" if r.get("survives_holm") else "")
        lines.append(f"| {r['config']} | {r['baseline']} | {r['diff']:+.4f}{mark} | [{r['ci_lo']:+.4f}, "
                     f"{r['ci_hi']:+.4f}] | {r['p_le_0']:.3f} | {r['p']:.4f} | {r['p_holm']:.4f} | {r['pairs']} | "
                     f"{r['samples']} |")
    if not rows:
        lines.append(f"| (no configuration has a {key_name}={value} counterpart on the same splits) | | | | | | "
                     "| | |")
    survive = sum(r.get("survives_holm", False) for r in rows)
    lines += ["", "\\* the CI excludes 0 (this comparison alone). † Holm-adjusted p < 0.05: survives the "
              f"correction for {len(rows)} comparisons ({survive} of {len(rows)} do)."]
    with atomic_file(md_path, encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def modality_analysis(runs) -> list[dict]:
    """Per configuration with text-only, image-only and fused runs on the same splits: see the docstring."""
    preds, out = _Preds(), {}
    for r in runs:
        if "probe" in r.params or r.params.get("modality") not in ("both", "text", "image"):
            continue
        rest = json.dumps({k: v for k, v in r.params.items() if k != "modality"}, sort_keys=True)
        out.setdefault(rest, {}).setdefault(r.pair_key, {})[r.params["modality"]] = r
    rows = []
    for rest, splits in out.items():
        trios = [s for _, s in sorted(splits.items()) if len(s) == 3]
        if trios:
            rows.append(_modality_row(trios, preds))
    return rows


def _modality_row(trios: list[dict], preds) -> dict:
    y, t, i, b = [], [], [], []
    for s in trios:
        g, yy, pt = preds(s["text"])
        if not (preds(s["image"])[0] == g == preds(s["both"])[0]):
            raise ConfigError(f"{s['text'].dir}: text/image/both runs of one split saw different samples")
        y.append(yy), t.append(pt), i.append(preds(s["image"])[2]), b.append(preds(s["both"])[2])
    y, t, i, b = (np.concatenate(a) for a in (y, t, i, b))
    ok_t, ok_i, ok_b = t == y, i == y, b == y
    one = ok_t ^ ok_i

    def share(mask):  # how often the fused model is right among `mask` (nan: no such sample)
        return float(ok_b[mask].mean()) if mask.any() else float("nan")
    return {"config": trios[0]["both"].config, "splits": len(trios), "samples": int(len(y)),
            "acc_text": float(ok_t.mean()), "acc_image": float(ok_i.mean()), "acc_both": float(ok_b.mean()),
            "agreement": float((t == i).mean()), "exactly_one": int(one.sum()),
            "fused_right_when_one": share(one), "fused_right_text_only_right": share(ok_t & ~ok_i),
            "fused_right_image_only_right": share(ok_i & ~ok_t), "both_wrong_fused_right": share(~ok_t & ~ok_i)}


def write_modality_md(rows: list[dict], path: str) -> None:
    lines = ["# Modality analysis", "",
             "Per configuration (label shows its fused run), pooled over the splits that have text-only, "
             "image-only and fused runs: accuracies, how often the text-only and image-only models agree, and "
             "of the samples where exactly one of them is right, how often the fused model is right (overall, "
             "when only text is right, when only image is right).", "",
             "| configuration | splits | samples | acc text | acc image | acc fused | text/image agree | "
             "exactly one right | fused right (of those) | …text right | …image right | fused right, both wrong |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['splits']} | {r['samples']} | {r['acc_text']:.3f} | {r['acc_image']:.3f}"
                     f" | {r['acc_both']:.3f} | {r['agreement']:.3f} | {r['exactly_one']} | "
                     f"{r['fused_right_when_one']:.3f} | {r['fused_right_text_only_right']:.3f} | "
                     f"{r['fused_right_image_only_right']:.3f} | {r['both_wrong_fused_right']:.3f} |")
    if not rows:
        lines.append("| (no configuration has text, image and both runs on the same splits) |" + " |" * 11)
    with atomic_file(path, encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
