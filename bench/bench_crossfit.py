"""Issue 17 speed: `heads train --fusion film --folds 5` (a cross-fit run, 5 heads) against a single
`heads train --fusion film` on the same cache, both as whole commands (fresh process: imports, ONE cache
load, training, run directory), interleaved so that load on the shared machine hits both alike.

  single_s : median wall time of `heads train --fusion film --seed 0`
  folds_s  : median wall time of `heads train --fusion film --seed 0 --folds 5`
  ratio    : folds_s / single_s (issue 17 target: <= 3x); ratios_each: the ratio of each interleaved pair
Both run this checkout's code (`python -c 'from cli import heads_app; heads_app()'`, PYTHONPATH = the
checkout), not whatever `heads` entry point is installed. Writes bench/out/crossfit.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common import default_cache, write_result  # noqa: E402  (bench/ is sys.path[0] when a script runs)

TARGET = 3.0


def heads_train(cache: str, out: str, folds: int) -> float:
    """Wall time of one `heads train` command (its own process, so the cache load and imports count)."""
    cmd = [sys.executable, "-c", "from cli import heads_app; heads_app()", "train", "--cache", cache,
           "--fusion", "film", "--seed", "0", "--out", out] + (["--folds", str(folds)] if folds else [])
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"}
    t = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=default_cache(), help="the full default cache")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved pairs (single, cross-fit)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "out", "crossfit.json"))
    a = ap.parse_args()
    if not a.cache:
        sys.exit("no cache: run `make run` (or featcache extract --data ../shared/mvsa) first")
    single, folds, in_process = [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.repeats):  # alternate which goes first: a slow spell then hits both kinds
            order = (0, a.folds) if i % 2 == 0 else (a.folds, 0)
            for k in order:
                run = os.path.join(tmp, f"r{i}-k{k}")
                (folds if k else single).append(heads_train(a.cache, run, k))
                timing = json.load(open(os.path.join(run, "metrics.json")))["timing"]
                in_process.setdefault("folds" if k else "single", []).append(
                    {key: round(v, 2) for key, v in timing.items() if key.endswith("_s")})
    single_s, folds_s = float(np.median(single)), float(np.median(folds))
    res = {"cache": os.path.basename(a.cache), "fusion": "film", "folds": a.folds, "repeats": a.repeats,
           "single_s": round(single_s, 2), "folds_s": round(folds_s, 2), "ratio": round(folds_s / single_s, 2),
           "ratios_each": [round(f / s, 2) for s, f in zip(single, folds)], "target": TARGET,
           "single_each_s": [round(s, 2) for s in single], "folds_each_s": [round(f, 2) for f in folds],
           "in_process": in_process,
           "note": f"whole `heads train --fusion film` commands, with and without --folds {a.folds}, interleaved "
                   f"{a.repeats} times (medians); each command is a fresh process loading the cache once"}
    write_result(a.out, res)


if __name__ == "__main__":
    main()
