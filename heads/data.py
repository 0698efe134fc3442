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

FEATURES = {  # batch key -> cache dataset
    "text_tokens": "text/tokens",
    "text_mask": "text/mask",
    "text_pooled": "text/pooled",
    "image_tokens": "image/tokens",
    "image_pooled": "image/pooled",
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
    features: dict[str, torch.Tensor]  # FEATURES keys; tokens fp16, masks bool, pooled fp32

    def __len__(self) -> int:
        return len(self.guids)

    def dims(self) -> dict[str, int]:
        f = self.features
        return {"text_dim": f["text_tokens"].shape[-1], "text_pooled_dim": f["text_pooled"].shape[-1],
                "image_dim": f["image_tokens"].shape[-1], "image_pooled_dim": f["image_pooled"].shape[-1]}

    def batch(self, idx, device: str | torch.device = "cpu", keys=None) -> dict[str, torch.Tensor]:
        """Rows `idx` as a batch dict (only `keys`, default all): floating features in fp32, masks bool.

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


def load_cache(path: str) -> CacheData:
    """Read a complete cache into memory. Raises CacheError (from the reader) when it is unusable."""
    with open_cache(path) as r:  # a cache file or a shard manifest
        missing = [name for name in FEATURES.values() if not r.has(name)]
        if missing:
            from featcache.store import CacheError
            raise CacheError(f"{path} lacks {', '.join(missing)}; re-extract it with `featcache extract`")
        feats = {k: torch.from_numpy(np.ascontiguousarray(r.array(name))) for k, name in FEATURES.items()}
        return CacheData(path=str(path), meta=r.meta, guids=r.strings("samples/guid"),
                         splits=np.asarray(r.strings("samples/split")),
                         labels=r.array("samples/label").astype(np.int64),
                         valid=r.array("samples/valid").astype(bool), features=feats)


def split_labelled(data: CacheData, val_ratio: float, seed: int, folds: int = 0, fold: int = 0) -> Split:
    """Stratified train/val split of the labelled, valid rows; invalid labelled rows are counted, not used.

    folds=0: one split with a val_ratio share for validation. folds=K>=2: stratified K-fold (shuffled with
    `seed`) and fold `fold` validates, so K runs with folds=K, fold=0..K-1 cover every usable row exactly once
    (the ablation's --folds). Both are functions of (data, arguments) only: a run's config fixes its split."""
    from sklearn.model_selection import StratifiedKFold, train_test_split

    if not 0.0 < val_ratio < 1.0:
        raise DataError(f"val_ratio must be between 0 and 1 (exclusive), got {val_ratio}")
    labelled = data.labels >= 0
    usable = np.flatnonzero(labelled & data.valid)
    if usable.size == 0:
        raise DataError(f"{data.path} has no labelled valid samples to train on ({int(labelled.sum())} "
                        f"labelled, {int((~data.valid).sum())} invalid of {len(data)}); was it extracted from "
                        "a dataset with train.txt?")
    y = data.labels[usable]
    per_class = np.bincount(y, minlength=len(LABELS))
    small = [LABELS[c] for c in range(len(LABELS)) if 0 < per_class[c] < 2]
    if small:
        raise DataError(f"class(es) {', '.join(small)} have fewer than 2 valid labelled samples: a stratified "
                        "train/validation split is impossible")
    if folds:
        if folds < 2 or not 0 <= fold < folds:
            raise DataError(f"folds must be 0 (one split) or >= 2 with 0 <= fold < folds; got folds={folds}, "
                            f"fold={fold}")
        few = [LABELS[c] for c in range(len(LABELS)) if 0 < per_class[c] < folds]
        if few:
            raise DataError(f"class(es) {', '.join(few)} have fewer than {folds} valid labelled samples: "
                            f"stratified {folds}-fold cross-validation is impossible; use fewer folds")
        kfold = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        train, val = list(kfold.split(usable, y))[fold]
        train, val = usable[train], usable[val]
    else:
        n_val = int(round(val_ratio * usable.size))
        n_classes = int((per_class > 0).sum())
        if n_val < n_classes or usable.size - n_val < n_classes:
            raise DataError(f"{usable.size} labelled samples with val_ratio {val_ratio} leave a split smaller "
                            f"than the {n_classes} classes; use more data or another --val-ratio")
        train, val = train_test_split(usable, test_size=n_val, random_state=seed, stratify=y)
    train, val = np.sort(train), np.sort(val)  # dataset order: reproducible and readable split.json
    counts = {
        "samples": len(data),
        "labelled": int(labelled.sum()),
        "unlabelled": int((~labelled).sum()),
        "invalid": int((~data.valid).sum()),
        "invalid_excluded": int((labelled & ~data.valid).sum()),
        "train": int(train.size),
        "val": int(val.size),
        "train_per_class": {LABELS[c]: int(n) for c, n in enumerate(np.bincount(data.labels[train],
                                                                                 minlength=len(LABELS)))},
        "val_per_class": {LABELS[c]: int(n) for c, n in enumerate(np.bincount(data.labels[val],
                                                                               minlength=len(LABELS)))},
    }
    return Split(train=train, val=val, counts=counts)
