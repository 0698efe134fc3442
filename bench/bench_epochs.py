"""Stage 1 speed per head: seconds per training epoch of every fusion at a fixed number of epochs (no early
stopping, so a head that stops sooner does not look faster), relative to film's, measured in the same run.

  <fusion>_epoch_s  : median over repeats of the median epoch of a `--epochs E --patience 0` run (history.json
                      'seconds': the training steps and the validation pass), all heads on one cache load,
                      interleaved head by head in every repeat
  attention_epoch_s : the slower of cross-attn and co-attn
  attention_vs_film : attention_epoch_s / film_epoch_s (target, issue 17: <= 1)
The batcher normalises the token features of each training batch (heads.data.normstats), inside every epoch.
Writes bench/out/epochs.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common import default_cache, write_result  # noqa: E402  (bench/ is sys.path[0] when a script runs)
from heads.config import TrainConfig  # noqa: E402
from heads.data.cache import load_cache  # noqa: E402
from heads.fusions import list_fusions  # noqa: E402
from heads.train.stage1 import train  # noqa: E402

ATTENTION = ("cross-attn", "co-attn")


def epoch_seconds(data, fusion: str, epochs: int) -> float:
    cfg = TrainConfig.from_flat(fusion=fusion, seed=0, epochs=epochs, patience=0, plots=False)
    return statistics.median(h["seconds"] for h in train(cfg, data).history)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cache", default=default_cache(), help="the full default cache")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "out", "epochs.json"))
    a = ap.parse_args()
    if not a.cache:
        sys.exit("no cache: run `make run` (or featcache extract --data ../shared/mvsa) first")
    data = load_cache(a.cache)
    fusions = list_fusions()
    runs: dict[str, list[float]] = {f: [] for f in fusions}
    for _ in range(a.repeats):
        for fusion in fusions:  # interleaved: load drifting on a shared machine hits every head alike
            runs[fusion].append(epoch_seconds(data, fusion, a.epochs))
    per_head = {f: round(statistics.median(s), 3) for f, s in runs.items()}
    film = per_head["film"]
    attention = max(per_head[f] for f in ATTENTION)
    res = {"cache": os.path.basename(a.cache), "epochs": a.epochs, "repeats": a.repeats,
           "threads": torch.get_num_threads(), **{f"{f}_epoch_s": s for f, s in per_head.items()},
           "vs_film": {f: round(s / max(film, 1e-9), 2) for f, s in per_head.items()},
           "film_epoch_s": film, "attention_epoch_s": attention,
           "attention_vs_film": round(attention / max(film, 1e-9), 2),
           "note": f"seconds per epoch of each head at {a.epochs} fixed epochs (patience 0), median "
                   f"of {a.repeats} interleaved repeats on one cache load; attention = the slower of cross-attn "
                   "and co-attn"}
    write_result(a.out, res)


if __name__ == "__main__":
    main()
