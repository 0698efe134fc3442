"""The stratified hold-out split of sklearn's `train_test_split(..., stratify=y)`, in numpy, draw for draw.

Why a copy: `heads train` needs one stratified split, and importing sklearn for it (sklearn pulls in scipy)
costs about 1.4 s on 2 CPU cores, a fifth of the whole command. Why draw for draw: every run directory, README
table and ablation written so far used sklearn's split, and a seed must keep meaning the same rows. The
algorithm is sklearn 1.x's StratifiedShuffleSplit (one split, integer random_state):

  1. per class, how many rows train and how many are held out: the largest-remainder rounding of the class
     shares (`_approximate_mode`), ties broken by the seeded generator;
  2. per class, in class order, a seeded permutation of its rows: the first n_train train, the next n_held
     are held out; then both lists are shuffled.

tests/test_sklearn_parity.py checks equality with sklearn itself over many seeds, ratios and class layouts.
"""
from __future__ import annotations

import numpy as np


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
