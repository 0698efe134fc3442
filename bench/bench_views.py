"""What augmented image views cost (issue 7), on the same pairs in one run:

  extraction : `featcache extract --image-views K` vs the same extraction without views; the extra loop time
               divided by K is the cost of one view, set against the clean extraction's loop time
  loading    : `heads` loading the cache with K views vs without; the extra load time per view is set against
               the time it takes to load the clean image arrays (the same bytes as one view)

Writes bench/out/views.json. No target: the issue asks that the cost stays visible and that a view loads in
about the time of the clean image arrays.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import h5py

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import write_result  # noqa: E402
from featcache.extract.config import ExtractConfig  # noqa: E402
from featcache.extract.engine import extract  # noqa: E402
from heads.data.cache import load_cache  # noqa: E402


def loop_s(path) -> float:
    import json
    with h5py.File(path, "r") as f:
        t = json.loads(f.attrs["meta"])["timings"]
    return t["read_wait_s"] + t["model_s"] + t["write_s"]


def best_load(path, rounds) -> float:
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        load_cache(path)
        out.append(time.perf_counter() - t)
    return min(out)


def image_arrays_load(path, rounds) -> float:
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        with h5py.File(path, "r") as f:
            f["image/tokens"][:], f["image/pooled"][:]
        out.append(time.perf_counter() - t)
    return min(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "mvsa"))
    ap.add_argument("--per-file", type=int, default=160, help="rows per label file (x2 samples)")
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--aug", default="weak")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out", "views.json"))
    a = ap.parse_args()
    from rich.console import Console
    quiet = Console(file=open(os.devnull, "w"))
    with tempfile.TemporaryDirectory() as tmp:
        clean, views = os.path.join(tmp, "clean.h5"), os.path.join(tmp, "views.h5")
        ext = {"clean": [], "views": []}
        for _ in range(2):  # interleaved, best of two: the machine drifts
            extract(ExtractConfig(data=a.data, limit=a.per_file, out=clean), force=True, progress=False,
                    console=quiet)
            ext["clean"].append(loop_s(clean))
            extract(ExtractConfig(data=a.data, limit=a.per_file, out=views, image_views=a.views, image_aug=a.aug),
                    force=True, progress=False, console=quiet)
            ext["views"].append(loop_s(views))
        clean_s, views_s = min(ext["clean"]), min(ext["views"])
        per_view_s = (views_s - clean_s) / a.views
        load_clean, load_views = best_load(clean, a.rounds), best_load(views, a.rounds)
        image_load = image_arrays_load(clean, a.rounds)
        load_per_view = (load_views - load_clean) / a.views
        sizes = {"clean_mib": round(os.path.getsize(clean) / 2**20, 1),
                 "views_mib": round(os.path.getsize(views) / 2**20, 1)}
    write_result(a.out, {
        "samples": 2 * a.per_file, "views": a.views, "aug": a.aug,
        "clean_extract_s": round(clean_s, 2), "views_extract_s": round(views_s, 2),
        "extract_s_per_view": round(per_view_s, 2), "per_view_vs_clean": round(per_view_s / clean_s, 3),
        "load_clean_s": round(load_clean, 3), "load_views_s": round(load_views, 3),
        "load_s_per_view": round(load_per_view, 3), "clean_image_load_s": round(image_load, 3),
        "load_per_view_vs_clean_image": round(load_per_view / image_load, 3), **sizes,
        "note": f"{2 * a.per_file} pairs, {a.views} {a.aug} views: extraction loop time best of 2 interleaved runs; "
                f"loads best of {a.rounds}; a view holds the same bytes as the clean image arrays"})


if __name__ == "__main__":
    main()
