"""The attention heads as they were before 2026-12-07, kept so that run directories trained with them keep loading
(the compatibility policy, CHANGELOG). Nothing trains a new one: `heads train --fusion cross-attn` builds
heads.fusions.cross_attn. `load_fusion` (heads.fusions) picks one of these only when a run's saved weights have
their layers and not the current head's.

The old layer is one pre-norm cross-attention at the full hidden width: every text token and image patch is
projected to `hidden`, queries, keys and values are projected again, attention runs per token, a residual and
a LayerNorm follow per token, and the tokens are mean-pooled (masked for text). It was 3-5x slower than film per
epoch; heads.fusions.attention computes the same kind of attention per sample instead. This copy leaves out
only the old speed device that cut a batch into groups of similar text length (it changed nothing but float
rounding; the batcher and inference now order rows by length instead).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import NORMED, FusionHead, HeadConfig, HeadDims, projector, safe_mask


class CrossAttention(nn.Module):
    """x (B,Lq,H) attends over ctx (B,Lk,H), pre-norm, residual; ctx_mask (B,Lk) bool, True = may be attended to."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm_q, self.norm_kv = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.q = nn.Linear(hidden, hidden)
        self.kv = nn.Linear(hidden, 2 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, ctx_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, Lq, H = x.shape
        Lk, nh = ctx.shape[1], self.heads
        q = self.q(self.norm_q(x)).view(B, Lq, nh, H // nh).transpose(1, 2)
        k, v = self.kv(self.norm_kv(ctx)).view(B, Lk, 2, nh, H // nh).permute(2, 0, 3, 1, 4)
        scores = torch.matmul(q * (H // nh) ** -0.5, k.transpose(-1, -2))
        if ctx_mask is not None:  # padded values zeroed too: their weight is 0, but 0 * inf would be NaN
            v = v.masked_fill(~ctx_mask[:, None, :, None], 0.0)
            scores = scores.masked_fill(~ctx_mask[:, None, None, :], float("-inf"))
        att = torch.matmul(F.softmax(scores, dim=-1).to(v.dtype), v)
        return x + self.out(att.transpose(1, 2).reshape(B, Lq, H))


def mean_unpadded(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over dim 1 of (B,L,H) at mask==True positions only (`where`: inf/NaN in padding cannot leak)."""
    m = mask.unsqueeze(-1)
    total = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(1)
    return total / m.sum(1).clamp_min(1).to(x.dtype)


class LegacyTokenHead(FusionHead):
    """Both old heads: project text tokens and image patches to `hidden`, switched-off modalities as zeros."""

    inputs = ("text_tokens", "text_mask", "image_tokens")
    prenorm = ("text_tokens", "image_tokens")

    def build(self, cfg: HeadConfig, dims: HeadDims) -> int:
        self.proj_t = projector(dims.text_dim, cfg.hidden)
        self.proj_i = projector(dims.image_dim, cfg.hidden)
        return self.build_attention(cfg)

    def build_attention(self, cfg: HeadConfig) -> int:  # pragma: no cover
        raise NotImplementedError

    def projected(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(text (B,L,H), image (B,P,H), mask (B,L)) of a batch, pre-normalised inputs or not."""
        def project(proj, key):
            x_hat = batch.get(key + NORMED)
            x = batch[key] if x_hat is None else x_hat
            if not self.active(key.split("_")[0]):
                return x.new_zeros(*x.shape[:2], self.cfg.hidden, dtype=torch.float)
            return proj(x) if x_hat is None else proj.normed(x_hat)
        t, i = project(self.proj_t, "text_tokens"), project(self.proj_i, "image_tokens")
        if self.training and self.cfg.modality_dropout > 0 and self.cfg.modality == "both":
            keep_t, keep_i = self.modality_keep(t.shape[0], t.device)
            t, i = t * keep_t[:, None, None], i * keep_i[:, None, None]
        return t, i, safe_mask(batch["text_mask"])


class LegacyCrossAttnHead(LegacyTokenHead):
    """cross-attn before 2026-12-07: text tokens attend over image patches; masked text pooling"""

    def build_attention(self, cfg: HeadConfig) -> int:
        self.block = CrossAttention(cfg.hidden, cfg.attn_heads)
        self.norm = nn.LayerNorm(cfg.hidden)
        return cfg.hidden

    def fuse(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        t, i, mask = self.projected(batch)
        return mean_unpadded(self.norm(self.block(t, i)), mask), {}


class LegacyCoAttnHead(LegacyTokenHead):
    """co-attn before 2026-12-07: text->image and image->text attention (masked), pooled and fused"""

    def build_attention(self, cfg: HeadConfig) -> int:
        self.text_to_image = CrossAttention(cfg.hidden, cfg.attn_heads)
        self.image_to_text = CrossAttention(cfg.hidden, cfg.attn_heads)
        self.norm_t, self.norm_i = nn.LayerNorm(cfg.hidden), nn.LayerNorm(cfg.hidden)
        return 3 * cfg.hidden

    def fuse(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        t, i, mask = self.projected(batch)
        ht = mean_unpadded(self.norm_t(self.text_to_image(t, i)), mask)
        hi = self.norm_i(self.image_to_text(i, t, mask)).mean(1)
        return torch.cat([ht, hi, ht * hi], dim=-1), {}


LEGACY = {"cross-attn": LegacyCrossAttnHead, "co-attn": LegacyCoAttnHead}  # fusion name -> the head it replaced
