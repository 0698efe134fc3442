"""The numbers a run reports and selects on, checked against values computed by hand (not against a second
copy of the same code): metrics, bias tuning, the paired comparison. Written for `make mutate` (TESTING.md)."""
from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import pytest

from heads.data.splits import _holdout
from heads.report.compare import _macro_f1_batched, _same, holm, paired_bootstrap, parse_baseline
from heads.train.bias import apply_bias, tune_bias
from heads.train.metrics import compute_metrics, macro_f1, positive_score, quick_scores, roc_auc

# 3 classes; confusion (rows true, columns predicted): [[2, 1, 0], [0, 1, 1], [1, 0, 0]]
Y = [0, 0, 0, 1, 1, 2]
P = [0, 0, 1, 1, 2, 0]
F1 = [2 * 2 / (3 + 3), 2 * 1 / (2 + 2), 0.0]  # 2TP / (2TP + FP + FN) per class


def test_compute_metrics_by_hand():
    m = compute_metrics(Y, P, ["a", "b", "c"])
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [1, 0, 0]]
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["macro_f1"] == pytest.approx(sum(F1) / 3)
    assert m["weighted_f1"] == pytest.approx((3 * F1[0] + 2 * F1[1] + 1 * F1[2]) / 6)
    assert m["per_class"]["a"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": F1[0], "support": 3})
    assert m["per_class"]["b"] == pytest.approx({"precision": 1 / 2, "recall": 1 / 2, "f1": F1[1], "support": 2})
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert "roc_auc" not in m and "roc_auc" not in compute_metrics(Y, P, ["a", "b", "c"], scores=np.eye(3)[P])
    assert quick_scores(Y, P, 3) == {k: m[k] for k in ("accuracy", "macro_f1", "weighted_f1")}
    assert macro_f1(Y, P, 3) == pytest.approx(sum(F1) / 3)
    # a class nobody has and nobody predicts: F1 0 in the average, support 0, no division warning
    m4 = compute_metrics(Y, P, ["a", "b", "c", "d"])
    assert m4["macro_f1"] == pytest.approx(sum(F1) / 4) and m4["per_class"]["d"]["support"] == 0


def test_roc_auc_by_hand_with_ties():
    y = [0, 1, 0, 1, 1]
    s = [0.1, 0.4, 0.4, 0.8, 0.2]
    # pairs (pos, neg): (0.4,0.1)=1 (0.4,0.4)=.5 (0.8,*)=2 (0.2,0.1)=1 (0.2,0.4)=0 -> 4.5 of 6
    assert roc_auc(y, s) == pytest.approx(4.5 / 6)
    assert roc_auc([1, 1], [0.2, 0.3]) is None and roc_auc([0, 0], [0.2, 0.3]) is None
    logits = np.array([[0.0, 2.0], [1.0, -1.0]])
    np.testing.assert_allclose(positive_score(logits), [1 / (1 + np.exp(-2.0)), 1 / (1 + np.exp(2.0))])
    m = compute_metrics([1, 0], [1, 0], ["neg", "pos"], scores=logits)
    assert m["roc_auc"] == 1.0
    assert quick_scores([1, 0], [1, 0], 2, logits=logits)["auroc"] == 1.0
    assert quick_scores([1, 1], [1, 1], 2, logits=logits)["auroc"] == 0.0  # undefined: 0.0, still comparable


def test_tune_bias_finds_the_offset_that_fixes_a_shifted_class():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    logits = np.eye(3)[y] * 2 + rng.normal(scale=0.4, size=(300, 3))
    logits[:, 2] -= 2.5  # class 2 is almost never predicted without an offset
    b = tune_bias(logits, y)
    assert b[0] == 0.0 and b.shape == (3,)
    assert macro_f1(y, (logits + b).argmax(1), 3) > macro_f1(y, logits.argmax(1), 3) + 0.2
    assert 1.5 <= b[2] <= 3.0
    np.testing.assert_array_equal(apply_bias(logits, b), logits + b)
    np.testing.assert_array_equal(apply_bias(logits, None), logits)
    # nothing to gain: every offset stays 0 (ties go to the smaller offset)
    assert tune_bias(np.eye(3)[y] * 5, y).tolist() == [0.0, 0.0, 0.0]


def test_batched_macro_f1_and_paired_bootstrap_by_hand():
    y, a, b = np.array(Y), np.array(P), np.array(Y)
    assert _macro_f1_batched(np.stack([y, y]), np.stack([a, b]), 3) == pytest.approx([sum(F1) / 3, 1.0])
    res = paired_bootstrap([(y, a, b)], 3, n_boot=300, seed=1)
    assert res["diff"] == pytest.approx(sum(F1) / 3 - 1.0) and res["n_boot"] == 300
    assert res["ci_lo"] <= res["diff"] <= res["ci_hi"] < 0 and res["p_le_0"] == 1.0
    tail = res["p"] * 301 / 2 - 1  # p = 2 (resamples >= 0, + 1) / (n_boot + 1): few resamples tie at 0
    assert tail == pytest.approx(round(tail)) and 0 <= round(tail) < 20
    same = paired_bootstrap([(y, a, a)], 3, n_boot=100)
    assert same["diff"] == 0.0 and same["p"] == 1.0
    two = paired_bootstrap([(y, a, b), (y, b, b)], 3, n_boot=50)  # mean over the two splits
    assert two["diff"] == pytest.approx((sum(F1) / 3 - 1.0) / 2)


def test_holm_and_baseline_parsing():
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])
    np.testing.assert_allclose(holm([0.5, 0.01]), [0.5, 0.02])
    assert parse_baseline("concat") == ("fusion", "concat")
    assert parse_baseline(" cache = raw-none ") == ("cache", "raw-none")
    assert parse_baseline("rdrop=0") == ("rdrop", "0")
    for bad in ("=x", "k=", " "):
        with pytest.raises(ValueError, match="--baseline"):
            parse_baseline(bad)
    assert _same(0.0, "0") and _same(3, "3.0") and not _same(3, "three") and not _same(1, "2")
    assert _same(False, "off") and _same(True, "on") and not _same(True, "off") and not _same(False, "1")
    assert _same("film", "film") and not _same("film", "Film")


def test_auroc_of_float32_logits_is_computed_in_float64():
    """Confident float32 logits: in float32 both probabilities round to 1.0 and tie (AUROC 0.5 instead of 1)."""
    logits = np.array([[0.0, 20.0], [0.0, 25.0], [3.0, 0.0]], dtype=np.float32)
    assert len(set(positive_score(logits).tolist())) == 3
    assert quick_scores([0, 1, 0], [1, 1, 0], 2, logits=logits)["auroc"] == 1.0


def test_bootstrap_draws_every_sample_and_absent_classes_score_zero_quietly():
    y = np.array([0, 1, 1, 1, 0, 1])
    a, b = y.copy(), y.copy()
    b[0] = 1  # the two models differ on the first sample only
    res = paired_bootstrap([(y, a, b)], 2, n_boot=200, seed=0)
    assert res["diff"] > 0 and res["ci_hi"] > 0 and res["p_le_0"] < 1.0  # resamples that hold sample 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. numpy's "'where' used without 'out'": uninitialised memory
        f1 = _macro_f1_batched(np.array([[0, 0, 1]]), np.array([[0, 0, 1]]), 4)
    assert f1.tolist() == [0.5]  # classes 2 and 3: no true and no predicted sample, F1 0 in the average


def test_bootstrap_ci_and_p_equal_the_documented_procedure_with_sklearns_f1():
    """compare.py's docstring: each resample draws samples with replacement (one draw for both models), the CI
    is the 2.5 / 97.5 percentile of the resampled differences, p = 2 min(share <= 0, share >= 0) with +1."""
    from sklearn.metrics import f1_score  # the reference only: heads never import sklearn.metrics
    rng = np.random.default_rng(5)
    y = rng.integers(0, 3, 40)
    a = np.where(rng.random(40) < 0.7, y, rng.integers(0, 3, 40))
    b = np.where(rng.random(40) < 0.6, y, rng.integers(0, 3, 40))
    n_boot, draws = 150, np.random.default_rng(11).integers(0, 40, size=(150, 40))
    f1 = lambda t, p: f1_score(t, p, average="macro", labels=[0, 1, 2], zero_division=0)  # noqa: E731
    boot = np.array([f1(y[i], a[i]) - f1(y[i], b[i]) for i in draws])
    res = paired_bootstrap([(y, a, b)], 3, n_boot=n_boot, seed=11)
    assert res["diff"] == pytest.approx(f1(y, a) - f1(y, b))
    assert [res["ci_lo"], res["ci_hi"]] == pytest.approx(np.percentile(boot, [2.5, 97.5]).tolist())
    assert res["p_le_0"] == pytest.approx(np.mean(boot <= 0))
    tail = min((boot <= 0).sum(), (boot >= 0).sum())
    assert res["p"] == pytest.approx(min(1.0, 2 * (tail + 1) / (n_boot + 1)))


def _holdout_of(counts, ratio):
    """_holdout over rows whose labels have these per-class counts (3 classes known to the data)."""
    labels = np.repeat(np.arange(len(counts)), counts)
    data = SimpleNamespace(labels=labels, classes=["a", "b", "c"])
    return _holdout(data, np.arange(labels.size), ratio, 0, "--val-ratio")


def test_holdout_size_rules_at_their_edges():
    rest, held = _holdout_of([5, 0, 5], 0.2)  # class b absent: two classes, two held rows are enough
    assert held.size == 2 and rest.size == 8 and sorted(np.r_[rest, held].tolist()) == list(range(10))
    assert _holdout_of([5, 0, 5], 0.8)[0].size == 2  # and two rows left to train on
    assert _holdout_of([2, 8], 0.5)[1].size == 5  # a class with two rows can be stratified
    for counts, ratio in (([5, 0, 5], 0.1), ([5, 0, 5], 0.9), ([1, 5], 0.2)):
        with pytest.raises(ValueError, match=r"--val-ratio .* leave a split smaller than the 2 classes"):
            _holdout_of(counts, ratio)
    with pytest.raises(ValueError, match="fewer than 2 valid labelled samples: --val-ratio cannot stratify"):
        _holdout_of([1, 9], 0.5)


def test_tune_bias_tunes_every_class_after_the_first_and_ends_at_a_coordinate_optimum():
    """Class 1 shifted down is found too; and the result is a fixed point of the search: no single offset
    on the grid raises macro-F1 (the sweeps continue while one still improves)."""
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 300)
    logits = np.eye(3)[y] * 2 + rng.normal(scale=0.4, size=(300, 3))
    logits[:, 1] -= 2.5
    b = tune_bias(logits, y)
    assert 1.5 <= b[1] <= 3.0
    grid = np.round(np.arange(-3.0, 3.0001, 0.1), 4)
    for seed in range(6):
        rng = np.random.default_rng(seed)
        y = rng.integers(0, 4, 200)
        logits = np.eye(4)[y] + rng.normal(scale=1.0, size=(200, 4)) - rng.normal(size=4)
        b = tune_bias(logits, y, sweeps=20)
        best = macro_f1(y, (logits + b).argmax(1), 4)
        for c in range(1, 4):
            for v in grid:
                trial = b.copy()
                trial[c] = v
                assert macro_f1(y, (logits + trial).argmax(1), 4) <= best + 1e-12, (seed, c, v)


def test_auroc_only_for_two_classes():
    assert "auroc" not in quick_scores(Y, P, 3, logits=np.eye(3)[P])
    assert "auroc" not in quick_scores([0, 1], [0, 1], 2)


def test_metrics_edges_one_sample_unpredicted_and_single_row_classes():
    one = compute_metrics([1], [1], ["a", "b"])
    assert one["accuracy"] == 1.0 and one["weighted_f1"] == 1.0 and one["macro_f1"] == 0.5
    # class a: 1 row, predicted once, right; class c: never predicted; class d: absent everywhere
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no division warning, no uninitialised output
        m = compute_metrics([0, 1, 1, 2], [0, 1, 1, 1], ["a", "b", "c", "d"])
        assert macro_f1([0, 1, 1, 2], [0, 1, 1, 1], 4) == m["macro_f1"]
    assert m["per_class"]["a"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    assert m["per_class"]["b"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["per_class"]["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
