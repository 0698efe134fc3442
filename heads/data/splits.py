"""Which rows train, validate and test: the stratified split of a run, its K-fold variant, and the split of an
earlier run read back by guid (stage 2's --init).

All of it is a function of (data, SplitConfig, seed) only: a run's config fixes its split.

The stratified hold-out is sklearn's `train_test_split(..., stratify=y)` in numpy, draw for draw. Why a copy:
`heads train` needs one stratified split, and importing sklearn for it (sklearn pulls in scipy) costs about
1.4 s on 2 CPU cores, a fifth of the whole command. Why draw for draw: every run directory, README table and
ablation written so far used sklearn's split, and a seed must keep meaning the same rows. The algorithm is
sklearn 1.x's StratifiedShuffleSplit (one split, integer random_state):

  1. per class, how many rows train and how many are held out: the largest-remainder rounding of the class
     shares (`_approximate_mode`), ties broken by the seeded generator;
  2. per class, in class order, a seeded permutation of its rows: the first n_train train, the next n_held
     are held out; then both lists are shuffled.

tests/test_sklearn_parity.py checks equality with sklearn itself over many seeds, ratios and class layouts.
K-fold uses sklearn's StratifiedKFold itself (only ablations with --folds pay its import).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .cache import CacheData, DataError


@dataclass
class SplitConfig:
    val_ratio: float = 0.2
    test_ratio: float = 0.0  # > 0: a stratified internal test split, scored once at the end, never for selection
    folds: int = 0  # 0: one val_ratio split; K >= 2: stratified K-fold CV and this run validates on `fold`
    fold: int = 0

    def validate(self) -> "SplitConfig":
        if not 0.0 < self.val_ratio < 1.0:
            raise DataError(f"val_ratio must be between 0 and 1 (exclusive), got {self.val_ratio}")
        if not 0.0 <= self.test_ratio < 1.0:
            raise DataError(f"test_ratio must be in [0, 1), got {self.test_ratio}")
        if self.folds and (self.folds < 2 or not 0 <= self.fold < self.folds):
            raise DataError(f"folds must be 0 (one split) or >= 2 with 0 <= fold < folds; got folds={self.folds}, "
                            f"fold={self.fold}")
        return self


@dataclass
class Split:
    train: np.ndarray  # row indices into CacheData
    val: np.ndarray
    counts: dict = field(default_factory=dict)
    test: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # internal test (test_ratio)

    def record(self, data: CacheData, **settings) -> dict:
        """split.json: the settings that made it, training class counts, and the rows by guid."""
        return {**settings, "train_per_class": self.counts["train_per_class"],
                "train": [data.guids[i] for i in self.train], "val": [data.guids[i] for i in self.val],
                "test": [data.guids[i] for i in self.test]}


def split_labelled(data: CacheData, cfg: SplitConfig, seed: int) -> Split:
    """Stratified train/val split of the labelled, valid rows; invalid labelled rows are counted, not used.

    folds=0: one split with a val_ratio share for validation. folds=K>=2: stratified K-fold (shuffled with
    `seed`) and fold `fold` validates, so K runs with folds=K, fold=0..K-1 cover every usable row exactly once
    (the ablation's --folds). test_ratio>0 first sets aside a stratified internal test share (seeded) that
    neither training nor model selection ever sees; val/folds then split the rest."""
    cfg.validate()
    labelled = data.labels >= 0
    usable = np.flatnonzero(labelled & data.valid)
    if usable.size == 0:
        raise DataError(f"{data.path} has no labelled valid samples to train on ({int(labelled.sum())} "
                        f"labelled, {int((~data.valid).sum())} invalid of {len(data)}); was it extracted from "
                        "a dataset with train.txt?")
    _check_classes(data, data.labels[usable], 2, "a stratified train/validation split is impossible")
    test = np.zeros(0, dtype=np.int64)
    if cfg.test_ratio:
        usable, test = _holdout(data, usable, cfg.test_ratio, seed, "--test-ratio")
    if cfg.folds:
        from sklearn.model_selection import StratifiedKFold  # heavy (with scipy): only --folds pays for it
        y = data.labels[usable]
        _check_classes(data, y, cfg.folds,
                       f"stratified {cfg.folds}-fold cross-validation is impossible; use fewer folds")
        kfold = StratifiedKFold(n_splits=cfg.folds, shuffle=True, random_state=seed)
        train, val = list(kfold.split(usable, y))[cfg.fold]
        train, val = usable[train], usable[val]
    else:
        train, val = _holdout(data, usable, cfg.val_ratio, seed, "--val-ratio")
    return _with_counts(data, np.sort(train), np.sort(val), np.sort(test))  # dataset order: readable split.json


def split_from_guids(data: CacheData, saved: dict, source: str) -> Split:
    """The rows of a split.json written by an earlier run (`source` names it in errors), found by guid."""
    row = {g: i for i, g in enumerate(data.guids)}
    lost = [g for g in saved["train"] + saved["val"] + saved.get("test", []) if g not in row]
    if lost:
        raise DataError(f"{len(lost)} guids of {source} are not in {data.path} (e.g. {lost[0]}): that run was "
                        "trained on another dataset")
    rows = [np.array([row[g] for g in saved.get(part, [])], dtype=np.int64) for part in ("train", "val", "test")]
    return _with_counts(data, *rows)


def _with_counts(data: CacheData, train: np.ndarray, val: np.ndarray, test: np.ndarray) -> Split:
    labelled = data.labels >= 0

    def per_class(rows):
        n = np.bincount(data.labels[rows], minlength=len(data.classes))
        return {name: int(n[c]) for c, name in enumerate(data.classes)}

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
    if test.size:
        counts.update(test=int(test.size), test_per_class=per_class(test))
    return Split(train=train, val=val, counts=counts, test=test)


def _check_classes(data: CacheData, y: np.ndarray, need: int, what: str) -> None:
    per_class = np.bincount(y, minlength=len(data.classes))
    few = [name for c, name in enumerate(data.classes) if 0 < per_class[c] < need]
    if few:
        raise DataError(f"class(es) {', '.join(few)} have fewer than {need} valid labelled samples: {what}")


def _holdout(data: CacheData, rows: np.ndarray, ratio: float, seed: int, option: str):
    """(rest, held) with a stratified `ratio` share of `rows` held out (sklearn's split, stratified_holdout)."""
    y = data.labels[rows]
    n_held, n_classes = int(round(ratio * rows.size)), int((np.bincount(y) > 0).sum())
    if n_held < n_classes or rows.size - n_held < n_classes:
        raise DataError(f"{rows.size} labelled samples with {option} {ratio} leave a split smaller than the "
                        f"{n_classes} classes; use more data or another {option}")
    _check_classes(data, y, 2, f"{option} cannot stratify")
    return stratified_holdout(rows, y, n_held, seed)


def approximate_mode(class_counts: np.ndarray, n_draws: int, rng: np.random.RandomState) -> np.ndarray:
    """Rows per class for n_draws draws: floor of the proportional share, then +1 for the classes with the
    largest remainders (ties drawn at random), until the counts sum to n_draws."""
    continuous = class_counts / class_counts.sum() * n_draws
    floored = np.floor(continuous)
    need = int(n_draws - floored.sum())
    if need > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (inds,) = np.where(remainder == value)
            add = min(len(inds), need)
            floored[rng.choice(inds, size=add, replace=False)] += 1
            need -= add
            if need == 0:
                break
    return floored.astype(int)


def stratified_holdout(rows: np.ndarray, y: np.ndarray, n_held: int, seed: int) -> tuple[np.ndarray, ...]:
    """(rest, held): `n_held` of `rows` held out with class shares of `y` kept; equal, order included, to
    `train_test_split(rows, test_size=n_held, random_state=seed, stratify=y)`. Callers check sizes first."""
    rows, y = np.asarray(rows), np.asarray(y)
    _, y_idx, class_counts = np.unique(y, return_inverse=True, return_counts=True)
    class_rows = np.split(np.argsort(y_idx, kind="stable"), np.cumsum(class_counts)[:-1])
    rng = np.random.RandomState(seed)
    n_i = approximate_mode(class_counts, rows.size - n_held, rng)
    t_i = approximate_mode(class_counts - n_i, n_held, rng)
    rest, held = [], []
    for c, members in enumerate(class_rows):
        perm = members.take(rng.permutation(class_counts[c]), mode="clip")
        rest.extend(perm[:n_i[c]])
        held.extend(perm[n_i[c]:n_i[c] + t_i[c]])
    # The final shuffles matter too: a second split of `rest` (val after --test-ratio) depends on its order.
    rest, held = rng.permutation(rest), rng.permutation(held)
    return rows[np.asarray(rest, dtype=np.int64)], rows[np.asarray(held, dtype=np.int64)]
