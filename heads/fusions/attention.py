"""Text-image attention for the token-level heads (cross-attn, co-attn), computed where it is cheap.

Both heads score every real text token against every image patch,

    s[h, l, p] = q_h(t_l) . k_h(x_p) / sqrt(d)        t_l, x_p: the LayerNorm-normalised backbone tokens,

and both reduce what the attention gathers to one vector per sample with a mean. Nothing non-linear sits between
the attention's weighted sum and that mean, so the value and output projections commute with both sums:

    mean_l  W_o [ sum_p softmax_p(s[h, l, :])_p  W_v x_p ]_h  =  W [ sum_p a[h, p] x_p ]_h,
    a[h, p] = mean_l softmax_p(s[h, l, :])_p                   (the patch weights of the average text token)

and the head applies one projection to nh pooled image vectors per sample (`pooled_attention`) instead of projecting
every patch and every text token to the hidden width. Per-token work is then only the query and key
projections into the small attention space (AttentionSpace: `width` = hidden / 8 dims, not hidden), the scores
and one softmax. The old layer (heads.fusions.legacy: full-width q/kv/out projections of every token, a residual
and a LayerNorm per token before the mean) did all of that per token, and trained three to five times slower than
film per epoch; these heads train at film's speed or faster (README, Speed).

The per-token LayerNorm of the old layer was the only non-linearity this gives up; the heads apply a LayerNorm to
the pooled sum instead, and the classifier MLP follows. The attention is written out (matmul, softmax, matmul)
rather than calling `F.scaled_dot_product_attention`: its output is per query, and the weights are needed
pooled over the queries first. Padded text positions are excluded exactly: they get weight 0 in the text mean
(`text_weights`) and -inf scores as keys (`pooled_attention(..., key_mask=...)`), whatever their values.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import NORMED, FusionHead, HeadConfig, Projector, projector, safe_mask

LN_EPS = 1e-5  # nn.LayerNorm's default, as heads.data.cache normalises with
WIDTH_FRACTION = 8  # attention space width = hidden / WIDTH_FRACTION (16 of 128: measured as good as 32, README)


def attention_width(cfg: HeadConfig) -> int:
    """hidden / WIDTH_FRACTION dims, split between the heads (at least one dim each)."""
    return cfg.attn_heads * max(1, cfg.hidden // cfg.attn_heads // WIDTH_FRACTION)


class AttentionSpace(nn.Module):
    """The queries (text tokens) and keys (image patches) of the attention, in a small space of `width` dims."""

    def __init__(self, text_dim: int, image_dim: int, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"attention width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.q: Projector = projector(text_dim, width)
        self.k: Projector = projector(image_dim, width)

    def forward(self, text: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q (B,nh,L,d), k (B,nh,P,d)) from text (B,L,Dt) and image (B,P,Di) LayerNorm-normalised without affine
        (`normed_tokens`; the projectors' affine is folded into their Linear: Projector.normed). q carries the
        1/sqrt(d) of the scores, so q @ k^T and k @ q^T are the scores in either layout."""
        (B, L, _), P, nh = text.shape, image.shape[1], self.heads
        q = self.q.normed(text).view(B, L, nh, -1).transpose(1, 2)
        k = self.k.normed(image).view(B, P, nh, -1).transpose(1, 2)
        return q * q.shape[-1] ** -0.5, k


def normed_tokens(batch: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """batch[key] LayerNorm-normalised without affine: as the batcher put it (key + NORMED: training and
    inference on the CPU), or normalised here (a GPU, where batches are gathered on the device)."""
    x = batch.get(key + NORMED)
    if x is not None:
        return x
    x = batch[key]
    return F.layer_norm(x, x.shape[-1:], eps=LN_EPS)


def text_weights(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L): 1/n on a row's n real text positions, 0 on padding (safe_mask guarantees n >= 1)."""
    w = mask.to(dtype)
    return w / w.sum(1, keepdim=True)


def pooled_attention(queries: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor | None,
                     key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, nh, Lk): per head, the attention weights over the keys of the average query. Multiplied by the values
    (B, Lk, D) they give what the queries gather on average, the layer's output averaged over the queries.

    queries (B,nh,Lq,d) attend over keys (B,nh,Lk,d): softmax over the keys (padded ones, key_mask False, get -inf
    scores), then averaged over the queries with `weights` (B,Lq) (the real text positions), or a plain mean
    (weights None). The scores are made in the layout whose softmax runs over the last dim: the CPU softmax over a
    middle dim was several times slower (profiled)."""
    scores = torch.matmul(queries, keys.transpose(-1, -2))  # (B, nh, Lq, Lk)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    att = F.softmax(scores, dim=-1)
    return att.mean(2) if weights is None else torch.matmul(weights[:, None, None, :], att).squeeze(2)


class AttentionHead(FusionHead):
    """What cross-attn and co-attn share: normalised tokens, the modality switch, the text mean weights. A subclass
    implements attend(text, image, mask, weights) -> h (B, width)."""

    inputs = ("text_tokens", "text_mask", "image_tokens")
    prenorm = ("text_tokens", "image_tokens")
    normed_eval = True  # inference reads the tokens pre-normalised too (heads.infer): nothing else is computed from them

    def fuse(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        text, image = normed_tokens(batch, "text_tokens"), normed_tokens(batch, "image_tokens")
        keep_t, keep_i = self.modality_keep(text.shape[0], text.device)
        if self.cfg.modality != "both" or (self.training and self.cfg.modality_dropout > 0):
            # A switched-off or dropped modality is zero (FusionHead's rule): its text mean, its pooled values and
            # its side of the scores are then constants, so the head reduces to the other modality.
            text, image = text * keep_t[:, None, None].to(text.dtype), image * keep_i[:, None, None].to(image.dtype)
        mask = safe_mask(batch["text_mask"])
        return self.attend(text, image, mask, text_weights(mask, text.dtype)), {}

    def attend(self, text: torch.Tensor, image: torch.Tensor, mask: torch.Tensor,
               weights: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError
