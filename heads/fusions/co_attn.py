"""`co-attn`: parallel co-attention (after Lu et al., 2016): one affinity between text tokens and image patches,
read both ways, then fused.

The scores s[h, l, p] = q_h(t_l) . k_h(x_p) (heads.fusions.attention) are normalised over the patches for the
text side (what each real text token gathers from the image, averaged over the tokens) and, for the image side,
over the real text tokens with the mean patch's key as the one query (what the image as a whole gathers from the
text: b[h, l] = softmax_l(mean_p k_h(x_p) . q_h(t_l))). Each side adds what it gathered to its mean token:

    h_t = LN(W_t mean_l t_l + W_vi [sum_p a[h, p] x_p]_h),    h_i = LN(W_i mean_p x_p + W_vt [sum_l b[h, l] t_l]_h)

and the classifier sees [h_t, h_i, h_t * h_i], the product giving it an explicit agreement term. Padded text
positions are excluded twice: as keys (-inf scores) and from the text mean (weight 0). A switched-off modality is
zero, so its mean, what it offers the other side and what it gathers are constants: the head reduces to the
remaining modality's own path.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .attention import AttentionHead, AttentionSpace, attention_width, pooled_attention
from .base import FUSIONS, HeadConfig, HeadDims


@FUSIONS.register("co-attn")
class CoAttnHead(AttentionHead):
    """text->image and image->text attention (masked), pooled and fused"""

    def build(self, cfg: HeadConfig, dims: HeadDims) -> int:
        nh = cfg.attn_heads
        self.space = AttentionSpace(dims.text_dim, dims.image_dim, attention_width(cfg), nh)
        # Each side's [W_mean, W_gathered] as one Linear on [its mean token, what it gathered from the other side]
        self.text_side = nn.Linear(dims.text_dim + nh * dims.image_dim, cfg.hidden)
        self.image_side = nn.Linear(dims.image_dim + nh * dims.text_dim, cfg.hidden)
        self.norm_t, self.norm_i = nn.LayerNorm(cfg.hidden), nn.LayerNorm(cfg.hidden)
        return 3 * cfg.hidden

    def attend(self, text, image, mask, weights) -> torch.Tensor:
        q, k = self.space(text, image)
        to_image = pooled_attention(q, k, weights)  # (B, nh, P): the average text token's patch weights
        to_text = pooled_attention(k.mean(2, keepdim=True), q, None, key_mask=mask)  # (B, nh, L): the mean patch's
        B, P = image.shape[:2]
        # One matmul per modality for its mean token and what the other side gathered from it (rows 1..nh)
        text_rows = torch.matmul(torch.cat([weights[:, None, :], to_text], 1), text)  # (B, 1 + nh, Dt)
        image_rows = torch.matmul(torch.cat([image.new_full((B, 1, P), 1 / P), to_image], 1), image)  # (B, 1+nh, Di)
        ht = self.norm_t(self.text_side(torch.cat([text_rows[:, 0], image_rows[:, 1:].flatten(1)], 1)))
        hi = self.norm_i(self.image_side(torch.cat([image_rows[:, 0], text_rows[:, 1:].flatten(1)], 1)))
        return torch.cat([ht, hi, ht * hi], dim=-1)
