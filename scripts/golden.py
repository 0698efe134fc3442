"""Behaviour check across a change: run the same seeded commands on two revisions, compare what they wrote.

    python scripts/golden.py                       # HEAD (a temporary git worktree) vs the working tree
    python scripts/golden.py --base 3fba582        # any older revision vs the working tree
    python scripts/golden.py --quick               # skip the full-data part (a slice only)

Each side runs in its own folder with the same relative paths, so run directories and caches are byte-for-byte
comparable. What is compared: every array of every cache (exactly), cache metadata without timings, versions
and paths; each run's metrics.json (timings aside), history.json (timings aside), split.json,
val/test predictions and head weights. Reports (.md/.html/.png) and timings are not compared.

A refactor that claims "behaviour unchanged" runs this before it lands. Exit 0: the same results (format
differences, e.g. a renamed metadata field or a new config layout, are listed but allowed); 1: a result
differs (an array, a prediction, a split, a weight, a metric value). Threads are pinned (OMP_NUM_THREADS) so both sides compute the same floating-point sums.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = (REPO.parent / "shared" / "mvsa").resolve()

# Values that legitimately differ between two runs of the same code: wall times, versions, where files are.
VOLATILE = {"timing", "timings", "train_s", "seconds", "elapsed", "epoch_s", "env", "version", "git",
            "created", "written_at", "extract_s", "load_s", "samples_per_s", "path", "cache_path", "root",
            "out", "host", "time_s", "duration_s", "started", "finished"}


def commands(quick: bool) -> list[list[str]]:
    d = str(DATA)
    steps = []
    if not quick:  # full data: extract, one film head, predict
        steps += [["featcache", "extract", "--data", d, "--out", "full.h5", "--no-progress"],
                  ["heads", "train", "--cache", "full.h5", "--out", "main", "--no-plots"],
                  ["heads", "predict", "--run", "main", "--cache", "full.h5", "--split", "test",
                   "--out", "main/test_predictions.txt"]]
    steps += [
        ["featcache", "extract", "--data", d, "--limit", "300", "--text-layers", "1", "--out", "slice.h5",
         "--no-progress"],
        ["heads", "train", "--cache", "slice.h5", "--fusion", "cross-attn", "--tune-bias", "--test-ratio", "0.2",
         "--out", "s-train", "--no-plots"],
        ["heads", "predict", "--run", "s-train", "--cache", "slice.h5", "--split", "test",
         "--out", "s-train/test_predictions.txt"],
        ["heads", "finetune", "--cache", "slice.h5", "--unfreeze-text", "1", "--init", "s-train", "--epochs", "2",
         "--out", "s-ft", "--no-plots"],
        ["heads", "predict", "--run", "s-ft", "--cache", "slice.h5", "--split", "test",
         "--out", "s-ft/test_predictions.txt"],
        ["heads", "ablate", "--cache", "slice.h5", "--fusion", "concat,gmu,film", "--modality", "both,text",
         "--seeds", "0,1", "--probe", "--out", "s-ablate"],
    ]
    return steps


def record(src: Path, out: Path, quick: bool) -> None:
    """Run every command with the code at `src` (a checkout), writing into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(src), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2", MPLBACKEND="Agg")
    for cmd in commands(quick):
        app, args = cmd[0], cmd[1:]
        code = f"import sys; sys.argv[0] = {app!r}; import cli; cli.{app}_app()"
        print(f"[{src.name}] {app} {' '.join(args)}", flush=True)
        r = subprocess.run([sys.executable, "-c", code, *args], cwd=out, env=env, capture_output=True, text=True)
        (out / "log.txt").open("a").write(f"$ {app} {' '.join(args)}\n{r.stdout}{r.stderr}\n")
        if r.returncode != 0:
            sys.exit(f"{app} {' '.join(args)} failed in {out} (exit {r.returncode}):\n{r.stdout}{r.stderr}")


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items()
                if k not in VOLATILE and not k.endswith("_s") and "_s_" not in k}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _json_diff(a, b, where: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append(f"{where}.{k}: only in {'base' if k in a else 'new'}")
            else:
                out += _json_diff(a[k], b[k], f"{where}.{k}")
        return out
    return [] if a == b else [f"{where}: {str(a)[:120]} != {str(b)[:120]}"]


def _h5_diff(a: Path, b: Path) -> list[str]:
    import h5py
    import numpy as np

    diffs = []
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        names_a, names_b = [], []
        fa.visit(lambda n: names_a.append(n) if isinstance(fa[n], h5py.Dataset) else None)
        fb.visit(lambda n: names_b.append(n) if isinstance(fb[n], h5py.Dataset) else None)
        for n in sorted(set(names_a) ^ set(names_b)):
            diffs.append(f"{a.name}:/{n}: only in {'base' if n in names_a else 'new'}")
        for n in sorted(set(names_a) & set(names_b)):
            x, y = fa[n][()], fb[n][()]
            if x.shape != y.shape or not np.array_equal(x, y):
                diffs.append(f"{a.name}:/{n}: arrays differ")
        ma = _strip(json.loads(fa.attrs.get("meta", "{}")))
        mb = _strip(json.loads(fb.attrs.get("meta", "{}")))
        # New metadata fields are allowed (documented defaults); a field that changed value is not.
        for k in sorted(set(ma) & set(mb)):
            diffs += _json_diff(ma[k], mb[k], f"{a.name}:meta.{k}")
        diffs += [f"{a.name}:meta.{k}: dropped" for k in sorted(set(ma) - set(mb))]
    return diffs


def _safetensors_diff(a: Path, b: Path) -> list[str]:
    import torch
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    if set(ta) != set(tb):
        return [f"{a}: tensor names differ ({sorted(set(ta) ^ set(tb))[:4]})"]
    return [f"{a}:{k}: differs" for k in ta if not torch.equal(ta[k], tb[k])]


# Files that record how a run was set up (formats may change between versions); the rest records results.
FORMAT_FILES = ("config.json", "cache.json", "ablate.json", "best.json")


def _table_diff(fa: Path, fb: Path, rel) -> tuple[list[str], list[str]]:
    """A CSV compared column by column: a column only one side has is a format change, a differing cell in a
    shared column a result."""
    import csv

    ra, rb = (list(csv.DictReader(f.open())) for f in (fa, fb))
    cols_a, cols_b = (set(r[0]) if r else set() for r in (ra, rb))
    formats = [f"{rel}: column {c} only in {'base' if c in cols_a else 'new'}" for c in sorted(cols_a ^ cols_b)]
    shared = sorted(cols_a & cols_b)
    if len(ra) != len(rb) or any(x[c] != y[c] for x, y in zip(ra, rb) for c in shared):
        return [f"{rel}: contents differ"], formats
    return [], formats


def compare(base: Path, new: Path) -> tuple[list[str], list[str]]:
    """(result differences, format differences). Results: every cache array, prediction, split, history,
    weight file and metric value. Format: cache metadata, run configs, keys present on one side only."""
    results, formats = [], []
    for fa in sorted(base.rglob("*")):
        rel = fa.relative_to(base)
        fb = new / rel
        if fa.is_dir() or rel.name == "log.txt" or fa.suffix in (".png", ".html", ".md", ".tex", ".lock"):
            continue
        if not fb.exists():
            results.append(f"{rel}: missing in new")
        elif fa.suffix == ".h5":
            for d in _h5_diff(fa, fb):
                (formats if ":meta." in d else results).append(f"{rel.parent}/{d}")
        elif fa.suffix == ".safetensors":
            results += _safetensors_diff(fa, fb)
        elif fa.suffix == ".json":
            ja, jb = _strip(json.loads(fa.read_text())), _strip(json.loads(fb.read_text()))
            for d in _json_diff(ja, jb, str(rel)):
                (formats if rel.name in FORMAT_FILES or d.endswith(("only in base", "only in new"))
                 else results).append(d)
        elif fa.suffix in (".csv", ".txt"):
            if rel.name.startswith("summary") or rel.name.startswith("groupby"):
                continue  # holds train seconds
            if fa.read_bytes() != fb.read_bytes():
                r, f = _table_diff(fa, fb, rel) if fa.suffix == ".csv" else ([f"{rel}: contents differ"], [])
                results += r
                formats += f
    return results, formats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="HEAD", help="git revision to compare against (default HEAD)")
    ap.add_argument("--quick", action="store_true", help="the slice only, without the full-data part")
    ap.add_argument("--keep", type=Path, help="keep both output folders here (default: a temporary folder)")
    ap.add_argument("--base-out", type=Path, help="reuse outputs recorded earlier for the base side")
    ap.add_argument("--new-out", type=Path, help="reuse outputs recorded earlier for the new side")
    a = ap.parse_args()
    if not DATA.is_dir():
        sys.exit(f"the dataset is not at {DATA}")
    work = a.keep or Path(tempfile.mkdtemp(prefix="golden-"))
    base_out = a.base_out
    if base_out is None:
        tree = work / "base-src"
        if tree.exists():
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO)
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), a.base], cwd=REPO, check=True,
                       capture_output=True)
        try:
            base_out = work / "base"
            record(tree, base_out, a.quick)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO)
    new_out = a.new_out
    if new_out is None:
        new_out = work / "new"
        record(REPO, new_out, a.quick)
    results, formats = compare(base_out, new_out)
    for d in formats:
        print(f"format: {d}")
    for d in results:
        print(f"RESULT: {d}")
    print(f"{len(results)} result difference(s), {len(formats)} format difference(s) between {base_out} and "
          f"{new_out}")
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if results else 0


if __name__ == "__main__":
    sys.exit(main())
