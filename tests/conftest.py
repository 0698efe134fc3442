"""Shared fixtures. `make_synthetic_cache(...)` writes a small, complete feature cache with the real schema
(via featcache.cache.store.CacheWriter) whose labels are learnable from both text and image features."""
from __future__ import annotations

import numpy as np
import pytest

from featcache.cache.store import LEGACY_CLASSES, CacheWriter
from featcache.sources.base import Sample

BACKBONE = {"name": "synthetic-text+synthetic-image", "text": "synthetic-text", "image": "synthetic-image"}


def build_synthetic_cache(path: str, n_train: int = 240, n_test: int = 40, n_invalid: int = 6, L: int = 12,
                          Dt: int = 16, Dtp: int = 16, P: int = 6, Di: int = 12, Dip: int = 20,
                          key: str = "synthetic-key-1", backbone: dict | None = None,
                          preprocessing: dict | None = None, seed: int = 0, noise: float = 1.0,
                          classes: list[str] | None = None, splits: list[tuple] | None = None,
                          extra_invalid: tuple[int, ...] = ()) -> str:
    """Rows: n_train labelled train samples (the last n_invalid of them marked invalid), then n_test unlabelled
    test samples (one of them invalid). `classes`: the class names recorded in the cache's meta, any number
    (default: none recorded, as in caches from before class names, which then read as MVSA's three).
    `splits`: [(name, rows, labelled), ...] instead of that train/test layout (e.g. train/dev/test with labelled
    test rows); the last n_invalid rows of the first split are invalid, and the last row when its split is
    unlabelled. `extra_invalid`: more rows (absolute indices, e.g. in the middle of the test split) marked invalid;
    the arrays do not change, so a cache without them is the same file otherwise. Class c shifts text features along u_c and image features along v_c; text lengths vary between
    2 and L, padded positions hold large garbage (heads must ignore it)."""
    rng = np.random.default_rng(seed)
    layout = splits or [("train", n_train, True), ("test", n_test, False)]
    k_classes = len(classes) if classes is not None else len(LEGACY_CLASSES)
    n = sum(rows for _, rows, _ in layout)
    labels = rng.integers(0, k_classes, n)
    samples = []
    first = layout[0][1]
    for k, (split, labelled) in enumerate((name, lab) for name, rows, lab in layout for _ in range(rows)):
        valid = not ((first - n_invalid <= k < first) or (not labelled and k == n - 1) or k in extra_invalid)
        samples.append(Sample(guid=str(1000 + k), split=split, label=int(labels[k]) if labelled else -1,
                              raw_text=f"text {k}", text=f"text {k}", image_path=f"/nowhere/{k}.jpg", valid=valid))
    u_tok, u_pool = rng.normal(size=(k_classes, Dt)), rng.normal(size=(k_classes, Dtp))
    v_tok, v_pool = rng.normal(size=(k_classes, Di)), rng.normal(size=(k_classes, Dip))
    lengths = rng.integers(2, L + 1, n)
    mask = np.arange(L)[None, :] < lengths[:, None]
    text_tokens = noise * rng.normal(size=(n, L, Dt)) + u_tok[labels][:, None, :]
    text_tokens[~mask] = rng.normal(scale=50.0, size=((~mask).sum(), Dt))  # garbage in the padding
    arrays = {
        "text/tokens": text_tokens.astype(np.float16),
        "text/mask": mask,
        "text/pooled": (noise * rng.normal(size=(n, Dtp)) + u_pool[labels]).astype(np.float32),
        "image/tokens": (noise * rng.normal(size=(n, P, Di)) + v_tok[labels][:, None, :]).astype(np.float16),
        "image/pooled": (noise * rng.normal(size=(n, Dip)) + v_pool[labels]).astype(np.float32),
    }
    meta = {"key": key, "backbone": backbone or BACKBONE,
            "preprocessing": preprocessing or {"clean_text": False, "max_text_len": L},
            "dataset": {"root": "/synthetic", "fingerprint": "0" * 8}, "counts": {"samples": n}}
    if classes is not None:
        meta["classes"] = list(classes)
    writer = CacheWriter(path, meta, samples, {name: a.shape for name, a in arrays.items()})
    writer.write(0, arrays, invalid=[k for k, s in enumerate(samples) if not s.valid])
    return writer.finish(meta)


@pytest.fixture
def make_synthetic_cache(tmp_path):
    """Factory: make_synthetic_cache(name="cache.h5", **build_synthetic_cache kwargs) -> path."""
    def make(name: str = "cache.h5", **kwargs) -> str:
        return build_synthetic_cache(str(tmp_path / name), **kwargs)
    return make
