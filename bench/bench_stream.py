"""Cost as the cache grows (issue 21): seconds per epoch per 1,000 rows and peak resident memory of film and
cross-attn on the default cache tiled 1x, 10x and 50x, in memory vs streamed from disk, in the same run.

  tile          : the default cache's rows repeated T times into a new cache (cache/tiles/, written with the
                  extractor's chunk layout; built here, never committed; 50x is about 16 GB)
  mode          : memory (budget 1TB: everything read into RAM), stream (budget 0: nothing kept in memory) and
                  kept (a budget of half what the head's arrays need: streamed, with room to keep the validation
                  rows in memory, heads.data.stream) at 1x and 10x; auto (the default budget, RAM / 8, which
                  streams there) at 50x
  epoch_s       : the first epoch of a `--epochs 1 --patience 0` run (training steps + validation pass); the file
                  is evicted from the page cache (posix_fadvise DONTNEED) before every streamed run, so the epoch
                  reads the disk
  s_per_1k_rows : epoch_s[0] per 1,000 rows of the cache
  peak_rss_gb   : the run's peak resident set (ru_maxrss of the process that loads the cache and trains)
extract       : peak RSS of `featcache extract --limit L` (the process, and its decode workers) for two L
Targets: at 50x every head's peak RSS <= 4 GB with the default budget; at 10x stream / memory throughput >= 0.7;
seconds per 1,000 rows about flat from 1x to 50x (time linear in rows). Each run is its own process.
Writes bench/out/stream.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import h5py
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common import default_cache, write_result  # noqa: E402
from featcache.cache.store import row_chunk  # noqa: E402

FUSIONS = ("film", "cross-attn")
BUDGETS = {"memory": "1TB", "stream": "0", "kept": "half", "auto": "auto"}
# The largest tile (50x) runs with the default budget only, what the memory target is about (it streams there: the
# arrays exceed RAM / 8; reading 16 GB into memory is what streaming exists to avoid); the others in memory and
# streamed, the second (10x) giving the throughput ratio.


def tile(src: str, dst: str, times: int) -> str:
    """dst: src's rows `times` times (guids made unique), chunked as featcache extract chunks. Reused if present."""
    if os.path.exists(dst):
        return dst
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = dst + ".tmp"
    with h5py.File(src, "r") as s, h5py.File(tmp, "w") as d:
        for k, v in s.attrs.items():
            d.attrs[k] = v
        n = s["samples/guid"].shape[0]

        def copy(name, obj):
            if not isinstance(obj, h5py.Dataset):
                return
            shape = (obj.shape[0] * times,) + obj.shape[1:]
            if obj.dtype.kind == "O":  # strings: small, in memory
                vals = obj.asstr()[:]
                if name == "samples/guid":
                    out = [f"{g}-t{t}" if t else g for t in range(times) for g in vals]
                else:
                    out = list(vals) * times
                d.create_dataset(name, data=np.array(out, dtype=object), dtype=h5py.string_dtype())
                return
            chunks = row_chunk(shape, obj.dtype.itemsize) if obj.ndim > 1 else None
            out = d.create_dataset(name, shape=shape, dtype=obj.dtype, chunks=chunks)
            block = obj[:]
            for t in range(times):
                out[t * n:(t + 1) * n] = block
        s.visititems(copy)
    os.replace(tmp, dst)
    return dst


def evict(path: str) -> None:
    """Drop the file's pages from the page cache, so that the next read comes from the disk."""
    os.sync()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def child(cache: str, fusion: str, budget: str, epochs: int, threads: int) -> None:
    """One run in this process: prints {epochs' seconds, streamed, peak RSS}."""
    from heads.config import TrainConfig
    from heads.data.stream import load_data
    from heads.fusions import get_fusion
    from heads.train.stage1 import train
    if budget == "half":  # the arrays need twice this: streamed, with room to keep the validation rows
        budget = str(load_data(cache, keys=get_fusion(fusion).inputs, budget="0").need // 2)
    cfg = TrainConfig.from_flat(fusion=fusion, seed=0, epochs=epochs, patience=0, plots=False, threads=threads,
                                memory_budget=budget)
    t0 = time.perf_counter()
    res = train(cfg, cache)
    print(json.dumps({"epoch_s": [h["seconds"] for h in res.history], "streamed": res.metrics["data"]["streamed"],
                      "kept_rows": res.metrics["data"].get("kept_rows", 0),
                      "load_s": res.metrics["timing"]["load_s"], "total_s": time.perf_counter() - t0,
                      "macro_f1": res.metrics["macro_f1"],
                      "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def extract_child(data: str, limit: int, out: str) -> None:
    """`featcache extract --limit` in this process: prints the peak RSS of this process and of its decode workers."""
    import featcache
    t0 = time.perf_counter()
    featcache.extract(data, out, limit=limit, progress=False, force=True)
    print(json.dumps({"limit": limit, "seconds": time.perf_counter() - t0,
                      "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      "workers_peak_rss_gb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20}))


def extract_memory(data: str, limits: list[int], scratch: str) -> dict:
    """Peak memory of `featcache extract` as the dataset grows (it writes per chunk: should stay flat)."""
    out = {}
    for limit in limits:
        path = os.path.join(scratch, f"extract-{limit}.h5")
        r = subprocess.run([sys.executable, __file__, "--extract-child", data, str(limit), path],
                           capture_output=True, text=True, check=True)
        out[limit] = json.loads(r.stdout.strip().splitlines()[-1])
        os.remove(path)
        print(f"extract --limit {limit}: {out[limit]}", flush=True)
    return out


def measure(cache: str, fusion: str, mode: str, epochs: int, threads: int, script: str = __file__) -> dict:
    """One run in its own process; `script`: this file, or bench_stream.py of another checkout (--vs)."""
    if mode != "memory":
        evict(cache)
    out = subprocess.run([sys.executable, script, "--child", cache, fusion, BUDGETS[mode], str(epochs),
                          str(threads)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def versus(cache: str, other: str, fusion: str, rounds: int, threads: int, out: str) -> None:
    """This checkout's epoch in memory, streamed and kept against another checkout's streamed epoch (budget 0)
    on the same tile, interleaved `rounds` times (medians): what a change to streaming bought, on a machine
    whose speed drifts."""
    arms = {"memory": (__file__, "memory"), "stream": (__file__, "stream"), "kept": (__file__, "kept"),
            "other_stream": (os.path.join(other, "bench", "bench_stream.py"), "stream")}
    got = {k: [] for k in arms}
    for _ in range(rounds):
        for name, (script, mode) in arms.items():
            got[name].append(measure(cache, fusion, mode, 1, threads, script)["epoch_s"][0])
        print({k: round(v[-1], 2) for k, v in got.items()}, flush=True)
    med = {k: round(float(np.median(v)), 2) for k, v in got.items()}
    write_result(out, {"cache": os.path.basename(cache), "fusion": fusion, "other": os.path.abspath(other),
                       "rounds": rounds, "epoch_s": got, "median_epoch_s": med,
                       "vs_memory": {k: round(med["memory"] / v, 2) for k, v in med.items()},
                       "note": "one epoch each (training + validation), file evicted before each streamed run"})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=default_cache(), help="the full default cache")
    ap.add_argument("--tiles", default="1,10,50")
    ap.add_argument("--fusions", default=",".join(FUSIONS))
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="1: robust to other work on the shared cores")
    ap.add_argument("--scratch", default=os.path.join(ROOT, "cache", "tiles"))
    ap.add_argument("--keep", action="store_true", help="keep the tiled caches (default: delete them at the end)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "out", "stream.json"))
    ap.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "mvsa"))
    ap.add_argument("--extract-limits", default="200,1600", help="featcache extract --limit values ('' skips)")
    ap.add_argument("--vs", metavar="CHECKOUT", help="instead: this checkout against another one's streamed epoch "
                    "on the second --tiles tile (10x) with the first --fusions head, interleaved --rounds times; writes "
                    "bench/out/stream_vs.json")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--extract-child", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child[0], a.child[1], a.child[2], int(a.child[3]), int(a.child[4]))
    if a.extract_child:
        return extract_child(a.extract_child[0], int(a.extract_child[1]), a.extract_child[2])
    if not a.cache:
        sys.exit("no cache: run `make run` (or featcache extract --data ../shared/mvsa) first")
    if a.vs:
        mid = int(a.tiles.split(",")[1])
        path = tile(a.cache, os.path.join(a.scratch, f"tile{mid}x.h5"), mid)
        return versus(path, a.vs, a.fusions.split(",")[0], a.rounds, a.threads,
                      os.path.join(os.path.dirname(a.out), "stream_vs.json"))
    rows, made = {}, []
    tiles = [int(x) for x in a.tiles.split(",")]
    small, mid, big = tiles[0], tiles[1], tiles[-1]
    fusions = a.fusions.split(",")
    for t in tiles:
        path = a.cache if t == 1 else tile(a.cache, os.path.join(a.scratch, f"tile{t}x.h5"), t)
        made += [path] if t != 1 else []
        with h5py.File(path, "r") as f:
            n = f["samples/guid"].shape[0]
        for fusion in fusions:
            for mode in ("auto",) if t == big else ("memory", "stream", "kept"):
                r = measure(path, fusion, mode, a.epochs, a.threads)
                r.update(rows_in_cache=n, s_per_1k_rows=round(r["epoch_s"][0] / n * 1000, 4))
                rows[f"{t}x/{fusion}/{mode}"] = r
                print(f"{t}x {fusion} {mode}: {r}", flush=True)
    os.makedirs(a.scratch, exist_ok=True)
    limits = [int(x) for x in a.extract_limits.split(",") if x]
    extract = extract_memory(a.data, limits, a.scratch) if limits else {}
    ten = {f: rows[f"{mid}x/{f}/stream"]["epoch_s"][0] for f in fusions}
    ratio = {f: round(rows[f"{mid}x/{f}/memory"]["epoch_s"][0] / ten[f], 2) for f in fusions}
    kept = {f: round(rows[f"{mid}x/{f}/memory"]["epoch_s"][0] / rows[f"{mid}x/{f}/kept"]["epoch_s"][0], 2)
            for f in fusions}
    worst = min(ratio, key=ratio.get)
    rss = max(rows[f"{big}x/{f}/auto"]["peak_rss_gb"] for f in fusions)
    # linear in rows: seconds per 1,000 rows at the largest tile (default budget: streamed) over the smallest
    # tile streamed, worst head
    growth = {f: round(rows[f"{big}x/{f}/auto"]["s_per_1k_rows"] / rows[f"{small}x/{f}/stream"]["s_per_1k_rows"], 2)
              for f in fusions}
    slowest = max(growth, key=growth.get)
    res = {"tiles": a.tiles, "epochs": a.epochs, "threads": a.threads, "runs": rows, "extract": extract,
           "stream_vs_memory_10x": ratio, "stream_vs_memory_10x_min": ratio[worst],
           "kept_vs_memory_10x": kept,
           "memory_10x_epoch_s": round(rows[f"{mid}x/{worst}/memory"]["epoch_s"][0], 2),
           "stream_10x_epoch_s": round(ten[worst], 2),
           "peak_rss_gb_50x": round(rss, 2), "rss_target_gb": 4.0, "rss_50x_vs_target": round(rss / 4.0, 2),
           "per_1k_rows_50x_vs_1x": growth, "per_1k_rows_50x_vs_1x_max": growth[slowest],
           "s_per_1k_rows_1x": rows[f"{small}x/{slowest}/stream"]["s_per_1k_rows"],
           "s_per_1k_rows_50x": rows[f"{big}x/{slowest}/auto"]["s_per_1k_rows"],
           "note": "stream.json: film and cross-attn on the default cache tiled 1x/10x (in memory and streamed) and "
                   "50x (default budget: streamed), one epoch each (training + validation), one thread; the file "
                   "is evicted from the page cache before each streamed run; stream/memory = memory epoch seconds / "
                   "streamed with budget 0 (kept: with a budget of half what the head's arrays need, which keeps the "
                   "validation rows in memory); peak RSS of the training process"}
    write_result(a.out, res)
    if not a.keep:
        for p in made:
            os.remove(p)


if __name__ == "__main__":
    main()
