"""What every fusion head shares: its config, the registry, the fuse/classify seam, the modality switch,
and a few small layers.

A head maps one batch of cached features to logits:

    batch = {"text_tokens": (B,L,Dt), "text_mask": (B,L) bool, "text_pooled": (B,Dtp),
             "image_tokens": (B,P,Di), "image_pooled": (B,Dip)}      ->      {"logits": (B,C), ...}

in two steps (timm's forward_features / forward_head): each head's `fuse(batch)` makes one fused vector h
per sample (plus extras such as the GMU gate), and the base class owns the one classifier, `mlp`, applied
by `forward_head(h)`. The classifier is created after the head's own layers (`build`), as every head did
before the seam existed, so the random initialisation and the state-dict keys are those of older runs.

Modality handling is defined once here so that every head behaves the same way: a modality that is switched
off (`modality="text"|"image"`) or dropped for a sample (modality dropout, training only) has its *projected*
features multiplied by zero. Each head documents what a zero modality means for its own arithmetic.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from featcache.errors import ConfigError
from featcache.registry import Registry

MODALITIES = ("both", "text", "image")
FUSIONS: Registry[type["FusionHead"]] = Registry("fusion")  # filled by @FUSIONS.register in each head's file
# Set from measurements on the shared data (README); until then the cheapest token-level head.
DEFAULT_FUSION = "film"


@dataclass(frozen=True)
class HeadDims:
    """What the cache dictates: input sizes (token and pooled sizes may differ, e.g. EfficientNet: 320 vs
    1280) and the number of classes (len(cache classes))."""
    text_dim: int
    text_pooled_dim: int
    image_dim: int
    image_pooled_dim: int
    num_classes: int


@dataclass
class HeadConfig:
    """What a user chooses: which head, and its hyperparameters."""
    fusion: str = DEFAULT_FUSION
    modality: str = "both"  # both | text | image
    modality_dropout: float = 0.0  # per-sample probability of dropping ONE modality while training
    hidden: int = 128
    dropout: float = 0.1
    attn_heads: int = 1  # the attention heads (cross-attn, co-attn): one measured best (README, #17)

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise ConfigError(f"unknown modality {self.modality!r}; valid: {', '.join(MODALITIES)}")
        if not 0.0 <= self.modality_dropout < 1.0:
            raise ConfigError(f"modality_dropout must be in [0, 1), got {self.modality_dropout}")
        if self.hidden % self.attn_heads:
            raise ConfigError(f"hidden ({self.hidden}) must be divisible by attn_heads ({self.attn_heads})")


def safe_mask(mask: torch.Tensor) -> torch.Tensor:
    """A row with no valid token would make attention softmax over nothing (NaN); let it see position 0."""
    if mask.is_cuda:  # the same without `if empty.any()`: a host sync per call on a GPU
        first = torch.zeros_like(mask)
        first[:, 0] = True
        return mask | (~mask.any(1, keepdim=True) & first)
    empty = ~mask.any(1)
    if empty.any():
        mask = mask.clone()
        mask[empty, 0] = True
    return mask


class Projector(nn.Sequential):
    """LayerNorm then Linear (state-dict keys 0.* and 1.*, as the plain Sequential of older runs).

    `normed(x_hat)` is the same map on features that are already normalised without the affine (what
    the batcher computes per batch, heads.data.normstats): LN's gain and shift are folded into the Linear,
    W (g * x_hat + s) + b = (W * g) x_hat + (W s + b), so a training step skips the LayerNorm forward and
    backward over every (B, L, D) token array, the largest tensors of a step. The fold is exact in real
    arithmetic; in floating point it rounds differently from LN then Linear."""

    def normed(self, x_hat: torch.Tensor) -> torch.Tensor:
        norm, lin = self[0], self[1]
        return F.linear(x_hat, lin.weight * norm.weight, torch.addmv(lin.bias, lin.weight, norm.bias))


def projector(in_dim: int, hidden: int) -> Projector:
    # LayerNorm on the raw features first: backbones differ wildly in scale (normalised sentence
    # embeddings vs. unnormalised CNN activations), and the head should not have to learn that.
    return Projector(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden))


def project(proj: Projector, batch: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """proj on batch[key], or proj.normed on batch[key + NORMED] when the loader put the normalised features
    there instead (FusionHead.prenorm; training on the CPU)."""
    x_hat = batch.get(key + NORMED)
    return proj(batch[key]) if x_hat is None else proj.normed(x_hat)


def classifier(in_dim: int, hidden: int, num_classes: int, dropout: float) -> nn.Sequential:
    # One hidden layer: fusions such as a gated sum are not linearly separable for XOR-like interactions.
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(hidden, num_classes))


NORMED = "_normed"  # batch key suffix: the features LayerNorm-normalised without affine (heads.data.normstats)
INPUTS = ("text_tokens", "text_mask", "text_pooled", "image_tokens", "image_pooled")


TOKEN_INPUTS = ("text_tokens", "text_mask", "image_tokens")


class FusionHead(nn.Module):
    """Base class: holds the config, decides per sample which modalities a forward pass may use, and owns the
    classifier. A subclass's docstring's first line is its description in `heads fusions`."""

    # Batch keys the head reads. The data loader gathers only these: a pooled-only head then never pays for
    # copying and converting (B, L, D) token arrays.
    inputs: tuple[str, ...] = INPUTS
    # Inputs that enter a Projector (its LayerNorm) unchanged and nothing else: a training batch may carry them
    # pre-normalised as key + NORMED instead (heads.train.stage1). Token arrays only: pooled vectors are small.
    prenorm: tuple[str, ...] = ()
    # True: inference reads the prenorm inputs normalised as well (heads.infer). Film's inference reads the raw ones,
    # so that predictions of runs trained before training read normalised inputs do not move.
    normed_eval: bool = False

    def __init__(self, cfg: HeadConfig, dims: HeadDims):
        super().__init__()
        self.cfg, self.dims = cfg, dims
        width = self.build(cfg, dims)
        self.mlp = classifier(width, cfg.hidden, dims.num_classes, cfg.dropout)

    @property
    def num_classes(self) -> int:
        return self.dims.num_classes

    @classmethod
    def uses_tokens(cls) -> bool:
        """True: reads token/patch features (and masks), not only the pooled vectors."""
        return any(k in TOKEN_INPUTS for k in cls.inputs)

    @classmethod
    def description(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0]

    def build(self, cfg: HeadConfig, dims: HeadDims) -> int:  # pragma: no cover
        """Create the head's own layers (in a fixed order: it is the order of the random init); return the
        width of the fused vector h."""
        raise NotImplementedError

    def fuse(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(h (B, width), extras): the fused vector and any per-sample outputs besides the logits."""
        raise NotImplementedError  # pragma: no cover

    def forward_head(self, h: torch.Tensor) -> torch.Tensor:
        return self.mlp(h)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        h, extras = self.fuse(batch)
        return {"logits": self.forward_head(h), **extras}

    def active(self, modality: str) -> bool:
        """False when the config switches `modality` off: its features are then known to be zero, and heads
        skip projecting them (a third of the work of single-modality runs in an ablation)."""
        return self.cfg.modality in ("both", modality)

    def modality_keep(self, batch_size: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(keep_text, keep_image), float (B,) of 0/1. Never both 0: dropout removes one modality of a sample
        at most, and only in training with modality="both" (dropping the only modality would leave nothing)."""
        ones = torch.ones(batch_size, device=device)
        if self.cfg.modality == "text":
            return ones, torch.zeros_like(ones)
        if self.cfg.modality == "image":
            return torch.zeros_like(ones), ones
        p = self.cfg.modality_dropout
        if not self.training or p <= 0:
            return ones, ones
        drop = torch.rand(batch_size, device=device) < p
        drop_text = torch.rand(batch_size, device=device) < 0.5
        keep_t = (~(drop & drop_text)).float()
        keep_i = (~(drop & ~drop_text)).float()
        return keep_t, keep_i

