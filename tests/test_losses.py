"""Losses, class weights, R-Drop, bias tuning and the fast metric helpers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from heads.train.bias import apply_bias, tune_bias
from heads.train.losses import LossConfig, build_loss, class_weights, rdrop_kl
from heads.train.metrics import macro_f1, quick_scores


def test_class_weights_inverse_sqrt_and_normalised():
    counts = [100, 25, 400]
    w = class_weights(counts).numpy()
    assert w[1] / w[0] == pytest.approx(2.0) and w[0] / w[2] == pytest.approx(2.0)
    assert (w * counts).sum() / sum(counts) == pytest.approx(1.0)  # E_sample[w] = 1


def test_ce_variants():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(32, 3, generator=g), torch.randint(0, 3, (32,), generator=g)
    counts = [10, 5, 20]
    loss = lambda name, **kw: build_loss(LossConfig(name, **kw), counts)  # noqa: E731
    assert loss("ce")(logits, y) == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    assert loss("ce", label_smoothing=0.1)(logits, y) == pytest.approx(
        F.cross_entropy(logits, y, label_smoothing=0.1).item(), rel=1e-6)
    w = class_weights(counts)
    assert loss("weighted_ce")(logits, y) == pytest.approx(F.cross_entropy(logits, y, weight=w).item(), rel=1e-6)
    focal0 = loss("focal", focal_gamma=0.0)(logits, y)
    assert focal0 == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    assert loss("focal")(logits, y) < focal0
    with pytest.raises(ValueError, match="valid: ce, weighted_ce, focal"):
        loss("mse")


def test_rdrop_kl():
    a = torch.randn(8, 3)
    assert rdrop_kl(a, a).item() == pytest.approx(0.0, abs=1e-7)
    assert rdrop_kl(a, torch.randn(8, 3)).item() > 0


@pytest.mark.parametrize("k,absent", [(3, None), (4, 3), (2, None)])
def test_quick_scores_match_sklearn(k, absent):
    """quick_scores and macro_f1 (per epoch, and thousands of times per bias search) against sklearn itself,
    not against compute_metrics, which shares their code: imbalanced labels, a class never predicted, and a
    class absent from both (it counts as F1 0 in the macro average: zero_division=0, every label)."""
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
    rng = np.random.default_rng(k)
    y, p = rng.integers(0, k, 200), rng.integers(0, k, 200)
    p[:60] = 0  # imbalance: class 0 over-predicted
    p[p == k - 1 - (absent is None)] = 0  # one class never predicted
    if absent is not None:
        y[y == absent], p[p == absent] = 0, 0
    labels = list(range(k))
    want = {"accuracy": accuracy_score(y, p),
            "macro_f1": f1_score(y, p, labels=labels, average="macro", zero_division=0),
            "weighted_f1": f1_score(y, p, labels=labels, average="weighted", zero_division=0)}
    logits = rng.normal(size=(200, k)) + np.eye(k)[y]
    got = quick_scores(y, p, k, logits)
    if k == 2:
        want["auroc"] = roc_auc_score(y, logits[:, 1] - logits[:, 0])
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert macro_f1(y, p, k) == pytest.approx(want["macro_f1"], abs=1e-12)


def test_tune_bias_rescues_an_under_predicted_class():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 600)
    logits = rng.normal(size=(600, 3)) + 2.0 * np.eye(3)[y]
    logits[:, 1] -= 2.5  # class 1 is almost never predicted
    before = macro_f1(y, logits.argmax(1), 3)
    b = tune_bias(logits, y)
    assert b[0] == 0 and b[1] > 1.0
    assert macro_f1(y, apply_bias(logits, b).argmax(1), 3) > before + 0.1
