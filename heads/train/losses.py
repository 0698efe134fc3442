"""Training losses: cross-entropy, class-weighted cross-entropy, focal (a registry: `@LOSSES.register(name)` on
each builder); label smoothing; the R-Drop term.

MVSA-Single is imbalanced (neutral is ~10% of the labelled data). `weighted_ce` uses w_c ∝ 1/sqrt(freq_c)
rather than 1/freq_c: the inverse square root lifts the rare class without letting a handful of samples
dominate the gradient, which full inverse-frequency weights tend to do on small data. Weights are
normalised so that their frequency-weighted mean is 1 (the loss stays on the scale of plain CE).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from featcache.errors import ConfigError
from featcache.registry import Registry

# name -> builder(LossConfig, class_counts) -> Loss, declared with each builder below
LOSSES: Registry = Registry("loss")


def class_weights(counts, smoothing: str = "sqrt") -> torch.Tensor:
    """w_c ∝ 1/sqrt(n_c) (or 1/n_c with smoothing="none"); classes with no samples get weight 0."""
    n = np.asarray(counts, dtype=np.float64)
    w = np.zeros_like(n)
    present = n > 0
    w[present] = 1.0 / (np.sqrt(n[present]) if smoothing == "sqrt" else n[present])
    w *= n.sum() / (w * n).sum()  # E_sample[w] = 1
    return torch.tensor(w, dtype=torch.float32)


def _smoothed_nll(logp: torch.Tensor, y: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Per-sample cross-entropy against a label-smoothed target (1-s on the class, s spread uniformly)."""
    nll = -logp.gather(1, y[:, None]).squeeze(1)
    if smoothing > 0:
        nll = (1 - smoothing) * nll - smoothing * logp.mean(1)
    return nll


@dataclass
class LossConfig:
    name: str = field(default="ce", metadata={"flat": "loss"})  # a LOSSES name; flat name (CLI, grids): loss
    label_smoothing: float = 0.0
    focal_gamma: float = 2.0  # focal only

    def validate(self) -> "LossConfig":
        LOSSES.get(self.name)  # raises with the valid names
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        return self


class Loss:
    """Callable (logits, targets) -> scalar: label-smoothed cross-entropy, optionally focal-weighted per
    sample and class-weighted. Built by a LOSSES entry; stateless apart from the class weights."""

    def __init__(self, label_smoothing: float = 0.0, weights: torch.Tensor | None = None,
                 focal_gamma: float | None = None):
        self.smoothing, self.weights, self.gamma = label_smoothing, weights, focal_gamma

    def __call__(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(logits.float(), dim=-1)
        loss = _smoothed_nll(logp, y, self.smoothing)
        if self.gamma is not None:
            # Down-weight easy samples by (1 - p_true)^gamma; p_true from the unsmoothed target.
            p_true = logp.gather(1, y[:, None]).squeeze(1).exp()
            loss = (1 - p_true).pow(self.gamma) * loss
        if self.weights is not None:
            w = self.weights.to(logits.device)[y]
            return (w * loss).sum() / w.sum()
        return loss.mean()


@LOSSES.register("ce")
def cross_entropy(cfg: LossConfig, class_counts) -> Loss:
    return Loss(cfg.label_smoothing)


@LOSSES.register("weighted_ce")
def weighted_cross_entropy(cfg: LossConfig, class_counts) -> Loss:
    return Loss(cfg.label_smoothing, weights=class_weights(class_counts))


@LOSSES.register("focal")
def focal(cfg: LossConfig, class_counts) -> Loss:
    return Loss(cfg.label_smoothing, focal_gamma=cfg.focal_gamma)


def build_loss(cfg: LossConfig, class_counts) -> Loss:
    """The loss `cfg` names; `class_counts` are the training split's per-class counts (weighted_ce)."""
    return LOSSES.get(cfg.validate().name)(cfg, class_counts)


def rdrop_kl(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Symmetric KL between two dropout passes of the same batch (R-Drop, Liang et al., 2021), batch mean."""
    la, lb = F.log_softmax(logits_a.float(), -1), F.log_softmax(logits_b.float(), -1)
    kl_ab = F.kl_div(la, lb, log_target=True, reduction="batchmean")
    kl_ba = F.kl_div(lb, la, log_target=True, reduction="batchmean")
    return 0.5 * (kl_ab + kl_ba)
