"""Which rows train, validate, test and are held out (`split_labelled`, the entry point of heads.data.splits), on
small synthetic caches (no extraction): the data's own dev split with an internal test share, K-fold covering
every usable row once, data without a `train` split, a split file that leaves rows out, invalid and unlabelled
rows never used, and the refusals. Written for `make mutate` (TESTING.md); tests/test_tasks.py and
tests/test_sklearn_parity.py hold the basic layouts."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.model_selection import StratifiedKFold

from conftest import build_synthetic_cache
from heads.data.cache import DataError, load_cache
from heads.data.splits import SplitConfig, split_labelled, stratified_holdout

CLASSES = ["a", "b", "c"]


def usable(data, split: str | None = None) -> np.ndarray:
    ok = (data.labels >= 0) & data.valid
    return np.flatnonzero(ok if split is None else ok & (data.splits == split))


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """train (60, the last 4 invalid) / dev (24) / test (18), all labelled, two more invalid rows in dev and test."""
    path = build_synthetic_cache(str(tmp_path_factory.mktemp("splits") / "pub.h5"), classes=CLASSES, n_invalid=4,
                                 splits=[("train", 60, True), ("dev", 24, True), ("test", 18, True)],
                                 extra_invalid=(70, 95))
    return load_cache(path, keys=())


def test_dev_validates_and_test_ratio_takes_a_stratified_share_of_train(published):
    data = published
    s = split_labelled(data, SplitConfig(test_ratio=0.25), seed=4)
    train_rows = usable(data, "train")
    rest, held = stratified_holdout(train_rows, data.labels[train_rows], int(round(0.25 * train_rows.size)), 4)
    assert np.array_equal(s.train, np.sort(rest)) and np.array_equal(s.test, np.sort(held))
    assert np.array_equal(s.val, usable(data, "dev")) and 70 not in s.val
    assert list(s.heldout) == ["test"] and np.array_equal(s.heldout["test"], usable(data, "test"))
    assert s.source == {"validation": "dev"}
    c = s.counts
    assert (c["train"], c["val"], c["test"]) == (rest.size, 23, held.size) and c["heldout"] == {"test": 17}
    assert c["val_split"] == "dev" and c["invalid"] == 6 and c["invalid_excluded"] == 6
    assert c["samples"] == 102 and c["labelled"] == 102 and c["unlabelled"] == 0
    assert c["test_per_class"] == {k: int((data.labels[held] == j).sum()) for j, k in enumerate(CLASSES)}
    # another seed: the same dev rows, another internal test share
    other = split_labelled(data, SplitConfig(test_ratio=0.25), seed=5)
    assert np.array_equal(other.val, s.val) and not np.array_equal(other.test, s.test)


def test_the_rows_come_back_sorted_and_disjoint(published):
    for cfg in (SplitConfig(), SplitConfig(val_split="none", test_ratio=0.2), SplitConfig(folds=3, fold=1)):
        s = split_labelled(published, cfg, seed=2)
        parts = [s.train, s.val, s.test, *s.heldout.values()]
        for rows in parts:
            assert np.array_equal(rows, np.sort(rows)) and rows.dtype.kind == "i"
        joined = np.concatenate(parts)
        assert np.unique(joined).size == joined.size  # no row twice
        assert np.array_equal(np.sort(joined), usable(published))  # every usable row somewhere, no other


def test_folds_cover_the_train_rows_once_as_sklearn_and_keep_the_other_splits_held_out(published):
    data, k = published, 3
    train_rows = usable(data, "train")
    ref = list(StratifiedKFold(n_splits=k, shuffle=True, random_state=7).split(train_rows, data.labels[train_rows]))
    vals = []
    for fold in range(k):
        s = split_labelled(data, SplitConfig(folds=k, fold=fold), seed=7)  # auto: folds never take dev
        assert np.array_equal(s.train, train_rows[ref[fold][0]]) and np.array_equal(s.val, train_rows[ref[fold][1]])
        assert sorted(s.heldout) == ["dev", "test"] and s.source == {"validation": "carved"}
        assert "val_split" not in s.counts and s.test.size == 0
        vals.append(s.val)
    assert np.array_equal(np.sort(np.concatenate(vals)), train_rows)


def test_a_named_split_validates_and_train_cannot(published):
    s = split_labelled(published, SplitConfig(val_split="test"), seed=0)
    assert np.array_equal(s.val, usable(published, "test")) and np.array_equal(s.train, usable(published, "train"))
    assert list(s.heldout) == ["dev"] and s.counts["val_split"] == "test"
    with pytest.raises(DataError, match=r"--val-split train: .* splits with labels: dev \(23\), test \(17\), "
                                        r"train \(56\)"):
        split_labelled(published, SplitConfig(val_split="train"), seed=0)


def test_data_without_a_train_split(tmp_path):
    """Labelled splits 'a' and 'b', none named train: auto carves from every labelled row, nothing held out; a
    named validation split has no train rows to train on."""
    data = load_cache(build_synthetic_cache(str(tmp_path / "ab.h5"), classes=CLASSES, n_invalid=2,
                                            splits=[("a", 40, True), ("b", 30, True), ("c", 5, False)]), keys=())
    s = split_labelled(data, SplitConfig(), seed=1)
    rows = usable(data)
    rest, held = stratified_holdout(rows, data.labels[rows], int(round(0.2 * rows.size)), 1)
    assert np.array_equal(s.train, np.sort(rest)) and np.array_equal(s.val, np.sort(held))
    assert s.heldout == {} and "heldout" not in s.counts and s.source == {"validation": "carved"}
    with pytest.raises(DataError, match=r"no labelled valid rows in split 'train' to train on while validating on "
                                        r"'b'; splits with labels: a \(38\), b \(30\)"):
        split_labelled(data, SplitConfig(val_split="b"), seed=1)


def test_a_split_file_decides_and_unlisted_rows_are_not_used(published, tmp_path):
    """The file names 40 of the train rows train, 12 of them dev, 10 test rows test; everything else is unused."""
    data = published
    g = data.guids
    listed = {**{g[i]: "train" for i in range(0, 40)}, **{g[i]: "dev" for i in range(40, 52)},
              **{g[i]: "test" for i in range(60, 70)}}
    path = tmp_path / "split.csv"
    path.write_text("id,split\n" + "".join(f"{k},{v}\n" for k, v in listed.items()))
    notes = []
    s = split_labelled(data, SplitConfig(split_file=str(path)), seed=0, say=notes.append)
    assert np.array_equal(s.train, np.arange(40)) and np.array_equal(s.val, np.arange(40, 52))
    assert np.array_equal(s.heldout["test"], np.arange(60, 70)) and list(s.heldout) == ["test"]
    assert s.source["validation"] == "dev" and s.source["split_file"]["path"] == str(path)
    assert notes  # the rows the file leaves out are reported


def test_invalid_and_unlabelled_rows_are_never_used(tmp_path):
    data = load_cache(build_synthetic_cache(str(tmp_path / "c.h5"), n_train=50, n_test=20, n_invalid=5), keys=())
    s = split_labelled(data, SplitConfig(), seed=0)
    used = np.concatenate([s.train, s.val])
    assert np.array_equal(np.sort(used), usable(data)) and used.size == 45
    assert s.counts["unlabelled"] == 20 and s.counts["invalid"] == 6 and s.counts["invalid_excluded"] == 5
    assert sum(s.counts["train_per_class"].values()) == s.train.size
    assert s.counts["val_per_class"] == {k: int((data.labels[s.val] == j).sum()) for j, k in enumerate(data.classes)}


def test_refusals(tmp_path):
    none = load_cache(build_synthetic_cache(str(tmp_path / "u.h5"), splits=[("test", 12, False)], n_invalid=0),
                      keys=())
    with pytest.raises(DataError, match=r"u\.h5 has no labelled valid samples to train on \(0 labelled, 1 invalid "
                                        r"of 12\)"):
        split_labelled(none, SplitConfig(), seed=0)
    data = load_cache(build_synthetic_cache(str(tmp_path / "c.h5"), n_train=30, n_test=4), keys=())
    with pytest.raises(DataError, match="val_ratio must be between 0 and 1"):
        split_labelled(data, SplitConfig(val_ratio=1.0), seed=0)
    with pytest.raises(DataError, match="--val-split nope: .* splits with labels: train"):
        split_labelled(data, SplitConfig(val_split="nope"), seed=0)


def test_a_class_too_small_to_stratify_is_refused_naming_it(tmp_path):
    """One labelled row of class c cannot be split between train and validation; two can (one each)."""
    data = load_cache(build_synthetic_cache(str(tmp_path / "c.h5"), n_train=40, n_test=4, classes=CLASSES),
                      keys=())
    rows = usable(data)
    of_c = rows[data.labels[rows] == 2]
    data.labels[of_c[2:]] = 0
    s = split_labelled(data, SplitConfig(val_ratio=0.3), seed=0)  # two rows of c: one trains, one validates
    assert s.counts["train_per_class"]["c"] == 1 and s.counts["val_per_class"]["c"] == 1
    data.labels[of_c[1]] = 0
    with pytest.raises(DataError, match=r"^class\(es\) c have fewer than 2 valid labelled samples: a stratified "
                                        r"train/validation split is impossible$"):
        split_labelled(data, SplitConfig(), seed=0)
    with pytest.raises(DataError, match=r"labelled samples with --test-ratio 0\.99 leave a split smaller than the 3 "
                                        r"classes; use more data or another --test-ratio$"):
        split_labelled(load_cache(data.path, keys=()), SplitConfig(test_ratio=0.99), seed=0)
    with pytest.raises(DataError, match=r"^34 labelled samples with --val-ratio 0\.01 leave a split smaller than the 3 "
                                        r"classes; use more data or another --val-ratio$"):
        split_labelled(load_cache(data.path, keys=()), SplitConfig(val_ratio=0.01), seed=0)


def test_a_test_share_too_large_for_the_train_split_names_its_option(published):
    with pytest.raises(DataError, match=r"^56 labelled samples with --test-ratio 0\.99 leave a split smaller than the "
                                        r"3 classes; use more data or another --test-ratio$"):
        split_labelled(published, SplitConfig(test_ratio=0.99), seed=0)  # validating on dev, the share of train
