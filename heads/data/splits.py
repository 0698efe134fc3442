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

Splits the data ships (samples/split: train/dev/test, Hateful Memes' dev_seen/test_unseen, a manifest's own
values) or a published split file (--split-file, heads.data.split_file) decide the rows first:

  - validation: `val_split` "auto" takes the labelled rows of a split named dev, val or validation (in that
    order) when there are any; "none" never does; any other value names the split. With a validation split the
    labelled `train` rows train (no carving, no stratification: the data's own split is used as published).
  - held out: labelled rows of every other split (test, dev_unseen, ...) are scored once at the end with the
    selected head, one entry per split, never used for selection (Split.heldout).
  - otherwise today's stratified carve: from the labelled `train` rows when other splits hold labels (they
    are held out), else from every labelled row. A dataset whose labels are all in `train` (MVSA) therefore
    splits exactly as before, row for row.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .cache import CacheData, DataError
from .split_file import read_split_file

VAL_NAMES = ("dev", "val", "validation")  # what val_split "auto" looks for, in this order


@dataclass
class SplitConfig:
    val_ratio: float = 0.2
    test_ratio: float = 0.0  # > 0: a stratified internal test split, scored once at the end, never for selection
    folds: int = 0  # 0: one val_ratio split; K >= 2: stratified K-fold CV and this run validates on `fold`
    fold: int = 0
    # auto: the data's dev/val/validation split when it has labelled rows | none: carve from train | a split name
    val_split: str = "auto"
    split_file: str = ""  # a published split (id,split lines or a folder of <split>.txt id lists); "" = the cache's

    def validate(self) -> "SplitConfig":
        if not 0.0 < self.val_ratio < 1.0:
            raise DataError(f"val_ratio must be between 0 and 1 (exclusive), got {self.val_ratio}")
        if not 0.0 <= self.test_ratio < 1.0:
            raise DataError(f"test_ratio must be in [0, 1), got {self.test_ratio}")
        if self.folds and (self.folds < 2 or not 0 <= self.fold < self.folds):
            raise DataError(f"folds must be 0 (one split) or >= 2 with 0 <= fold < folds; got folds={self.folds}, "
                            f"fold={self.fold}")
        if not self.val_split:
            raise DataError("--val-split must be auto, none or a split name")
        if self.folds and self.val_split not in ("auto", "none"):
            raise DataError(f"--folds cross-validates on folds carved from train; it cannot be combined with "
                            f"--val-split {self.val_split} (use --val-split auto or none)")
        return self


@dataclass
class Split:
    train: np.ndarray  # row indices into CacheData
    val: np.ndarray
    counts: dict = field(default_factory=dict)
    test: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # internal test (test_ratio)
    heldout: dict = field(default_factory=dict)  # the data's other labelled splits: name -> rows
    source: dict = field(default_factory=dict)  # where the split came from (validation split, split file)

    def record(self, data: CacheData, **settings) -> dict:
        """split.json: the settings that made it, where it came from, training class counts, rows by guid."""
        guids = lambda rows: [data.guids[i] for i in rows]  # noqa: E731
        out = {**settings, **self.source, "train_per_class": self.counts["train_per_class"],
               "train": guids(self.train), "val": guids(self.val), "test": guids(self.test)}
        if self.heldout:
            out["heldout"] = {name: guids(rows) for name, rows in self.heldout.items()}
        return out


def split_labelled(data: CacheData, cfg: SplitConfig, seed: int, say=None) -> Split:
    """Train/val(/test) rows of the labelled, valid rows; invalid labelled rows are counted, not used.

    The data's own validation split when there is one (module docstring), else a stratified carve: folds=0:
    one split with a val_ratio share for validation. folds=K>=2: stratified K-fold (shuffled with `seed`) and
    fold `fold` validates, so K runs with folds=K, fold=0..K-1 cover every usable row exactly once (the
    ablation's --folds). test_ratio>0 first sets aside a stratified internal test share (seeded) that neither
    training nor model selection ever sees. `say` prints the split file's mismatch report."""
    cfg.validate()
    names, source = data.splits, {}
    if cfg.split_file:
        names, source = read_split_file(cfg.split_file, data, say)
    labelled = data.labels >= 0
    usable = np.flatnonzero(labelled & data.valid & (names != ""))
    if usable.size == 0:
        raise DataError(f"{data.path} has no labelled valid samples to train on ({int(labelled.sum())} "
                        f"labelled, {int((~data.valid).sum())} invalid of {len(data)}"
                        + (f", none of them in a split of --split-file {cfg.split_file}" if cfg.split_file else "")
                        + "); was it extracted from a dataset with labels (MVSA's train.txt, a manifest's label "
                        "column)?")
    val_name = _val_split(data, cfg, names[usable])
    has_train = bool((names[usable] == "train").any())
    pool = usable[names[usable] == "train"] if has_train or val_name else usable
    if pool.size == 0:
        raise DataError(f"{data.path}: no labelled valid rows in split 'train' to train on while validating "
                        f"on {val_name!r}; splits with labels: {_labelled_splits(names[usable])}")
    own = [n for n in ("train", val_name) if n]
    rest = usable[~np.isin(names[usable], own)] if (has_train or val_name) else usable[:0]
    heldout = {str(n): rest[names[rest] == n] for n in sorted(set(names[rest].tolist()))}
    source["validation"] = val_name or "carved"  # split.json: the data's split that validated, or carved
    if val_name:
        train, val = pool, usable[names[usable] == val_name]
        test = np.zeros(0, dtype=np.int64)
        if cfg.test_ratio:
            train, test = _holdout(data, train, cfg.test_ratio, seed, "--test-ratio")
    else:
        train, val, test = _carve(data, cfg, pool, seed)
    return _with_counts(data, np.sort(train), np.sort(val), np.sort(test), heldout, source)


def stratified_kfold():
    """sklearn's StratifiedKFold, imported on first use: it is heavy (with scipy, 1.5-2.5 s here) and only --folds
    pays for it. A cross-fit calls this before forking its fold workers, which then inherit the import instead
    of each paying it again (five folds on two cores: three rounds of it)."""
    from sklearn.model_selection import StratifiedKFold  # heavy (with scipy): only --folds pays for it
    return StratifiedKFold


def _carve(data: CacheData, cfg: SplitConfig, usable: np.ndarray, seed: int):
    """(train, val, test) carved from `usable` with sklearn's stratified draws (today's split, row for row)."""
    _check_classes(data, data.labels[usable], 2, "a stratified train/validation split is impossible")
    test = np.zeros(0, dtype=np.int64)
    if cfg.test_ratio:
        usable, test = _holdout(data, usable, cfg.test_ratio, seed, "--test-ratio")
    if cfg.folds:
        y = data.labels[usable]
        _check_classes(data, y, cfg.folds,
                       f"stratified {cfg.folds}-fold cross-validation is impossible; use fewer folds")
        kfold = stratified_kfold()(n_splits=cfg.folds, shuffle=True, random_state=seed)
        train, val = list(kfold.split(usable, y))[cfg.fold]
        return usable[train], usable[val], test
    train, val = _holdout(data, usable, cfg.val_ratio, seed, "--val-ratio")
    return train, val, test


def _labelled_splits(names: np.ndarray) -> str:
    values, counts = np.unique(names, return_counts=True)
    return ", ".join(f"{v} ({c})" for v, c in zip(values.tolist(), counts.tolist())) or "none"


def _val_split(data: CacheData, cfg: SplitConfig, names: np.ndarray) -> str | None:
    """The split name that validates (names: the split of every usable row), or None to carve one."""
    if cfg.val_split == "none" or (cfg.folds and cfg.val_split == "auto"):
        return None
    if cfg.val_split == "auto":
        return next((n for n in VAL_NAMES if (names == n).any()), None)
    if cfg.val_split == "train" or not (names == cfg.val_split).any():
        raise DataError(f"--val-split {cfg.val_split}: {data.path} has no labelled valid rows in a split of that "
                        f"name (other than train); splits with labels: {_labelled_splits(names)}. Use one of "
                        "them, auto or none")
    return cfg.val_split


def split_from_guids(data: CacheData, saved: dict, source: str) -> Split:
    """The rows of a split.json written by an earlier run (`source` names it in errors), found by guid."""
    row = {g: i for i, g in enumerate(data.guids)}
    lost = [g for g in saved["train"] + saved["val"] + saved.get("test", []) if g not in row]
    heldout = saved.get("heldout", {})
    lost += [g for ids in heldout.values() for g in ids if g not in row]
    if lost:
        raise DataError(f"{len(lost)} guids of {source} are not in {data.path} (e.g. {lost[0]}): that run was "
                        "trained on another dataset")
    take = lambda ids: np.array([row[g] for g in ids], dtype=np.int64)  # noqa: E731
    rows = [take(saved.get(part, [])) for part in ("train", "val", "test")]
    keep = ("validation", "split_file")
    return _with_counts(data, *rows, {n: take(ids) for n, ids in heldout.items()},
                        {k: saved[k] for k in keep if k in saved})


def _with_counts(data: CacheData, train: np.ndarray, val: np.ndarray, test: np.ndarray,
                 heldout: dict | None = None, source: dict | None = None) -> Split:
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
    heldout, source = heldout or {}, source or {}
    if source.get("validation", "carved") != "carved":  # the data's own split validated
        counts["val_split"] = source["validation"]
    if heldout:
        counts["heldout"] = {name: int(rows.size) for name, rows in heldout.items()}
    return Split(train=train, val=val, counts=counts, test=test, heldout=heldout, source=source)


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
