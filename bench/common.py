"""What every benchmark script shares: where the full default cache is, and how a result is written."""
from __future__ import annotations

import glob
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_cache() -> str | None:
    """The full MiniLM + EfficientNet-Lite0 cache: `make run`'s (efficientnet-lite0-tf, 288 px images), else the
    largest one of the default backbones at their own size (smaller ones come from --limit trials)."""
    run = os.path.join(ROOT, "cache", "mvsa-tf-288.h5")
    if os.path.exists(run):
        return run
    caches = sorted(glob.glob(os.path.join(ROOT, "cache", "mvsa-default.h5")) +
                    glob.glob(os.path.join(ROOT, "cache", "mvsa-minilm-l6_efficientnet-lite0-*.h5")),
                    key=os.path.getsize)
    return caches[-1] if caches else None


def cache_image_encoder(meta: dict):
    """The image tower a cache was extracted with (its backbone name and recorded image size), in eval mode: what
    the end-to-end references run on images decoded at its decode side."""
    from featcache.backbones import create_image, locate  # heavy: torch, only for the benches that recompute images
    name = meta["backbone"]["image"]
    return create_image(name, locate(name), image_size=meta["preprocessing"].get("image_size", 0)).eval()


def write_result(path: str, result: dict) -> None:
    """bench/out/<name>.json, read back by bench/report.py into BENCHMARKS.md; also printed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(json.dumps(result, indent=2))
