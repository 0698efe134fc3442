"""Stage 1 speed: `heads train --fusion film` on the full cache vs ONE end-to-end epoch that recomputes both
backbones on the same training pairs (what the seed scripts did every epoch), measured in the same run.

  head_train_s : wall time of the CLI command (fresh process: imports, cache load, training, run dir)
  head_epoch_s : median seconds of one of that command's epochs (its history.json: steps + validation)
  import_torch_s: a fresh process that only imports torch, the floor under any `heads` command
  e2e_epoch_s  : decode + text and image backbones (no grad) + film head step, over every training pair of the
                 same split, batch 32, called as featcache extract calls them (fastest here)
Target (issue 3): e2e_epoch_s / head_train_s >= 100. Writes bench/out/heads.json.
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
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common import cache_image_encoder, default_cache, write_result  # noqa: E402  (bench/ is sys.path[0])
from featcache.backbones import create_text, locate  # noqa: E402
from featcache.extract.decode import ImageRows, collate_rows  # noqa: E402
from featcache.extract.forward import cpu_image_micro, text_features  # noqa: E402
from heads.data.cache import load_cache  # noqa: E402
from heads.fusions import HeadConfig, HeadDims, create_fusion  # noqa: E402


def head_cli(cache: str, out: str) -> float:
    exe = os.path.join(os.path.dirname(sys.executable), "heads")
    t = time.perf_counter()
    subprocess.run([exe, "train", "--cache", cache, "--fusion", "film", "--seed", "0", "--out", out],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def import_torch() -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    return time.perf_counter() - t


def e2e_epoch(cache: str, run_dir: str, batch_size: int = 32) -> tuple[float, int]:
    data = load_cache(cache)
    train_guids = set(json.load(open(os.path.join(run_dir, "split.json")))["train"])
    rows = [i for i, g in enumerate(data.guids) if g in train_guids]
    meta = data.meta
    text = create_text(meta["backbone"]["text"], locate(meta["backbone"]["text"]),
                       max_len=meta["text"]["max_len"]).eval()
    image = cache_image_encoder(meta)
    root = meta["dataset"]["root"]
    texts = dict(zip(data.guids, _strings(cache)))
    head = create_fusion(HeadConfig(fusion="film"), HeadDims(**data.dims(), num_classes=len(data.classes)))
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    ds = ImageRows([f"{root}/data/{data.guids[i]}.jpg" for i in rows], [data.guids[i] for i in rows],
                   [image.transform], 40_000_000, image.decode_side())
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=0, collate_fn=collate_rows)
    labels = torch.from_numpy(data.labels)
    t = time.perf_counter()
    for batch in loader:
        idx = [rows[i] for i, _, _ in batch]
        pix = torch.stack([p[0] for _, p, _ in batch])
        with torch.no_grad():
            tx = text_features(text, text.tokenize([texts[data.guids[i]] for i in idx]))  # as extract does
            parts = [image.forward_features(p) for p in pix.split(cpu_image_micro())]  # as extract does
            im = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        out = head({"text_tokens": tx["tokens"], "text_mask": tx["mask"], "text_pooled": tx["pooled"],
                    "image_tokens": im["tokens"], "image_pooled": im["pooled"]})
        loss = torch.nn.functional.cross_entropy(out["logits"], labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - t, len(rows)


def _strings(cache):
    from featcache.cache.store import CacheReader
    with CacheReader(cache) as r:
        return r.strings("samples/text")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cache", default=default_cache(), help="the full default cache")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "out", "heads.json"))
    a = ap.parse_args()
    if not a.cache:
        sys.exit("no cache: run `make run` (or featcache extract --data ../shared/mvsa) first")
    with tempfile.TemporaryDirectory() as tmp:
        run = os.path.join(tmp, "film")
        head_s = head_cli(a.cache, run)
        metrics = json.load(open(os.path.join(run, "metrics.json")))
        epoch_s = float(np.median([h["seconds"] for h in json.load(open(os.path.join(run, "history.json")))]))
        torch_s = import_torch()
        e2e_s, n = e2e_epoch(a.cache, run)
    res = {"cache": os.path.basename(a.cache), "train_pairs": n, "head_train_s": round(head_s, 2),
           "head_inprocess": {k: round(v, 2) for k, v in metrics["timing"].items() if k.endswith("_s")},
           "head_epochs_run": metrics["epochs_run"], "head_epoch_s": round(epoch_s, 3),
           "import_torch_s": round(torch_s, 2), "e2e_epoch_s": round(e2e_s, 1),
           "speedup": round(e2e_s / head_s, 1), "epoch_speedup": round(e2e_s / epoch_s, 1),
           "threads": torch.get_num_threads(),
           "note": "head_train_s is the whole `heads train --fusion film` command (process start, imports, cache "
                   "load, all epochs with early stopping, run dir and plots); head_epoch_s one of its epochs; "
                   f"import_torch_s = {torch_s:.2f} s is a process that only imports torch; e2e_epoch_s is one "
                   "epoch over the same training pairs with both backbones recomputed on this CPU"}
    write_result(a.out, res)


if __name__ == "__main__":
    main()
