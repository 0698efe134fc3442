"""A feature cache in memory: read once, sliced into fp32 batches by index, split stratified.

Everything the heads need is read from the HDF5 file in one pass (a few hundred MB for MVSA-Single) and kept
as torch tensors; token arrays stay fp16 (half the memory) and are converted to fp32 per batch, which costs
far less than any disk read per epoch. Rows are never copied into train/val subsets: a split is two index
arrays, so many configs (the ablation) can share one load.

Invalid rows (samples/valid False) are kept in memory so `predict` can still list them, but training and
validation exclude them and count how many were excluded.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from featcache.dataset import LABELS
from featcache.manifest import open_cache

from .splits import stratified_holdout

FEATURES = {  # batch key -> cache dataset
    "text_tokens": "text/tokens",
    "text_mask": "text/mask",
    "text_pooled": "text/pooled",
    "image_tokens": "image/tokens",
    "image_pooled": "image/pooled",
}
VIEWS = {  # optional (featcache extract --image-views K): K augmented views of every image, (N, K, ...)
    "image_tokens": "image_views/tokens",
    "image_pooled": "image_views/pooled",
}


class DataError(ValueError):
    """A cache that cannot be trained on (no labelled samples, a class too small to split, ...)."""


@dataclass
class CacheData:
    path: str
    meta: dict
    guids: list[str]
    splits: np.ndarray  # (N,) str: train | test
    labels: np.ndarray  # (N,) int64, -1 = unlabelled
    valid: np.ndarray  # (N,) bool
    features: dict[str, torch.Tensor]  # FEATURES keys (or the subset asked for); tokens fp16, masks bool
    views: dict[str, torch.Tensor] = field(default_factory=dict)  # VIEWS keys -> (N, K, ...) or empty
    shapes: dict[str, tuple] = field(default_factory=dict)  # every FEATURES key's shape, loaded or not
    # (load_cache fills it: dims() must not depend on which features were loaded)

    def num_views(self) -> int:
        return next(iter(self.views.values())).shape[1] if self.views else 0

    def __len__(self) -> int:
        return len(self.guids)

    def dims(self) -> dict[str, int]:
        f = self.shapes
        return {"text_dim": f["text_tokens"][-1], "text_pooled_dim": f["text_pooled"][-1],
                "image_dim": f["image_tokens"][-1], "image_pooled_dim": f["image_pooled"][-1]}

    def batch(self, idx, device: str | torch.device = "cpu", keys=None, views=None) -> dict[str, torch.Tensor]:
        """Rows `idx` as a batch dict (only `keys`, default all): floating features in fp32, masks bool.
        `views` (one int per row, 0 = clean, k = augmented view k) picks the image features per row.

        Text positions that are padding in every row of the batch are cut off. That is exact (heads ignore
        padding) and it is the cheapest speed-up there is: tweets are much shorter than max_text_len."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        keys = FEATURES if keys is None else keys
        mask, length = None, 1
        if "text_tokens" in keys or "text_mask" in keys:  # pooled-only heads skip the mask work entirely
            mask = self.features["text_mask"].index_select(0, idx)
            used = mask.any(0).nonzero()
            length = int(used[-1]) + 1 if used.numel() else 1
        out = {}
        for k in keys:
            x = mask if k == "text_mask" else self.features[k].index_select(0, idx)
            if views is not None and k in self.views:
                aug = torch.as_tensor(views) > 0
                if aug.any():
                    x[aug] = self.views[k][idx[aug], torch.as_tensor(views)[aug] - 1]
            if k in ("text_tokens", "text_mask"):
                x = x[:, :length]
            out[k] = (x if x.dtype == torch.bool else x.float()).to(device, non_blocking=True)
        return out

    def rows(self, split: str) -> np.ndarray:
        """Indices of every row of a dataset split (valid or not)."""
        return np.flatnonzero(self.splits == split)


@dataclass
class Split:
    train: np.ndarray  # row indices into CacheData
    val: np.ndarray
    counts: dict = field(default_factory=dict)
    test: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # internal test (test_ratio)


def load_cache(path: str, keys=None) -> CacheData:
    """Read a complete cache into memory: every feature, or only `keys` (a head's `inputs`: `heads train` of
    one film head then reads 120 of the default cache's 320 MB). Raises CacheError when it is unusable."""
    keys = FEATURES if keys is None else [k for k in FEATURES if k in keys]
    with open_cache(path) as r:  # a cache file or a shard manifest
        missing = [name for name in FEATURES.values() if not r.has(name)]
        if missing:
            from featcache.store import CacheError
            raise CacheError(f"{path} lacks {', '.join(missing)}; re-extract it with `featcache extract`")
        stored = r.datasets()
        feats = {k: torch.from_numpy(np.ascontiguousarray(r.array(FEATURES[k]))) for k in keys}
        views = {k: torch.from_numpy(np.ascontiguousarray(r.array(name))) for k, name in VIEWS.items()
                 if k in keys and r.has(name)}
        return CacheData(path=str(path), meta=r.meta, guids=r.strings("samples/guid"),
                         splits=np.asarray(r.strings("samples/split")),
                         labels=r.array("samples/label").astype(np.int64),
                         valid=r.array("samples/valid").astype(bool), features=feats, views=views,
                         shapes={k: tuple(stored[name][0]) for k, name in FEATURES.items()})


def split_labelled(data: CacheData, val_ratio: float, seed: int, folds: int = 0, fold: int = 0,
                   test_ratio: float = 0.0) -> Split:
    """Stratified train/val split of the labelled, valid rows; invalid labelled rows are counted, not used.

    folds=0: one split with a val_ratio share for validation. folds=K>=2: stratified K-fold (shuffled with
    `seed`) and fold `fold` validates, so K runs with folds=K, fold=0..K-1 cover every usable row exactly once
    (the ablation's --folds). test_ratio>0 first sets aside a stratified internal test share (seeded) that
    neither training nor model selection ever sees; val/folds then split the rest. All of it is a function of
    (data, arguments) only: a run's config fixes its split."""

    if not 0.0 < val_ratio < 1.0:
        raise DataError(f"val_ratio must be between 0 and 1 (exclusive), got {val_ratio}")
    if not 0.0 <= test_ratio < 1.0:
        raise DataError(f"test_ratio must be in [0, 1), got {test_ratio}")
    labelled = data.labels >= 0
    usable = np.flatnonzero(labelled & data.valid)
    if usable.size == 0:
        raise DataError(f"{data.path} has no labelled valid samples to train on ({int(labelled.sum())} "
                        f"labelled, {int((~data.valid).sum())} invalid of {len(data)}); was it extracted from "
                        "a dataset with train.txt?")
    _check_classes(data.labels[usable], 2, "a stratified train/validation split is impossible")
    test = np.zeros(0, dtype=np.int64)
    if test_ratio:
        usable, test = _holdout(usable, data.labels, test_ratio, seed, "--test-ratio")
    if folds:
        if folds < 2 or not 0 <= fold < folds:
            raise DataError(f"folds must be 0 (one split) or >= 2 with 0 <= fold < folds; got folds={folds}, "
                            f"fold={fold}")
        from sklearn.model_selection import StratifiedKFold
        y = data.labels[usable]
        _check_classes(y, folds, f"stratified {folds}-fold cross-validation is impossible; use fewer folds")
        kfold = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        train, val = list(kfold.split(usable, y))[fold]
        train, val = usable[train], usable[val]
    else:
        train, val = _holdout(usable, data.labels, val_ratio, seed, "--val-ratio")
    train, val, test = np.sort(train), np.sort(val), np.sort(test)  # dataset order: readable split.json

    def per_class(rows):
        return {LABELS[c]: int(n) for c, n in enumerate(np.bincount(data.labels[rows], minlength=len(LABELS)))}

    counts = {
        "samples": len(data),
        "labelled": int(labelled.sum()),
        "unlabelled": int((~labelled).sum()),
        "invalid": int((~data.valid).sum()),
        "invalid_excluded": int((labelled & ~data.valid).sum()),
        "train": int(train.size),
        "val": int(val.size),
        "train_per_class": per_class(train),
        "val_per_class": per_class(val),
    }
    if test_ratio:
        counts.update(test=int(test.size), test_per_class=per_class(test))
    return Split(train=train, val=val, counts=counts, test=test)


def _check_classes(y: np.ndarray, need: int, what: str) -> None:
    per_class = np.bincount(y, minlength=len(LABELS))
    few = [LABELS[c] for c in range(len(LABELS)) if 0 < per_class[c] < need]
    if few:
        raise DataError(f"class(es) {', '.join(few)} have fewer than {need} valid labelled samples: {what}")


def _holdout(rows: np.ndarray, labels: np.ndarray, ratio: float, seed: int, option: str):
    """(rest, held) with a stratified `ratio` share of `rows` held out (sklearn's split; heads.stratify)."""
    y = labels[rows]
    n_held, n_classes = int(round(ratio * rows.size)), int((np.bincount(y) > 0).sum())
    if n_held < n_classes or rows.size - n_held < n_classes:
        raise DataError(f"{rows.size} labelled samples with {option} {ratio} leave a split smaller than the "
                        f"{n_classes} classes; use more data or another {option}")
    _check_classes(y, 2, f"{option} cannot stratify")
    return stratified_holdout(rows, y, n_held, seed)
