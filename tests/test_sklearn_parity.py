"""heads.data.splits and heads.train.metrics re-implement sklearn (to keep sklearn's ~1.4 s import out of `heads train`);
these tests hold them to sklearn itself, so a seed keeps meaning the same split and a metric the same number."""
import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support
from sklearn.model_selection import train_test_split

from heads.train.metrics import compute_metrics
from heads.data.splits import stratified_holdout


@pytest.mark.parametrize("counts", [(1910, 954, 335), (7, 5, 2), (40, 40, 40), (3, 2), (11, 13, 2, 9)])
@pytest.mark.parametrize("ratio", [0.2, 0.1, 0.37])
def test_stratified_holdout_equals_train_test_split(counts, ratio):
    for seed in range(12):
        rng = np.random.default_rng(seed)
        y = rng.permutation(np.repeat(np.arange(len(counts)), counts))
        rows = rng.choice(10 * y.size, size=y.size, replace=False)  # row ids are not 0..n-1 in real use
        n_held = max(len(counts), int(round(ratio * y.size)))
        rest, held = stratified_holdout(rows, y, n_held, seed)
        ref_rest, ref_held = train_test_split(rows, test_size=n_held, random_state=seed, stratify=y)
        assert np.array_equal(rest, ref_rest) and np.array_equal(held, ref_held)  # order too


def test_split_labelled_matches_two_sklearn_splits(make_synthetic_cache):
    from heads.data.cache import load_cache
    from heads.data.splits import SplitConfig, split_labelled
    data = load_cache(make_synthetic_cache())
    split = split_labelled(data, SplitConfig(val_ratio=0.25, test_ratio=0.2), seed=3)
    usable = np.flatnonzero((data.labels >= 0) & data.valid)
    rest, test = train_test_split(usable, test_size=int(round(0.2 * usable.size)), random_state=3,
                                  stratify=data.labels[usable])
    train, val = train_test_split(rest, test_size=int(round(0.25 * rest.size)), random_state=3,
                                  stratify=data.labels[rest])
    for ours, ref in ((split.train, train), (split.val, val), (split.test, test)):
        assert np.array_equal(ours, np.sort(ref))


@pytest.mark.parametrize("seed", range(20))
def test_compute_metrics_equals_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    # small draws from 2 of 3 classes now and then: absent classes, zero precision or recall
    k = 2 if seed % 3 == 0 else 3
    y_true, y_pred = rng.integers(0, k, n), rng.integers(0, 3, n)
    ids = [0, 1, 2]
    m = compute_metrics(y_true, y_pred, ["negative", "neutral", "positive"])
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=ids, zero_division=0)
    assert m["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-12)
    for avg in ("macro", "weighted"):
        assert m[f"{avg}_f1"] == pytest.approx(f1_score(y_true, y_pred, labels=ids, average=avg, zero_division=0),
                                               abs=1e-12)
    for c, row in enumerate(m["per_class"].values()):
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx((p[c], r[c], f[c], s[c]))
    assert m["confusion_matrix"] == confusion_matrix(y_true, y_pred, labels=ids).tolist()
