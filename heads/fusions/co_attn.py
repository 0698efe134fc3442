"""`co-attn`: parallel co-attention (Lu et al., 2016): one affinity between text tokens and image patches, read
both ways, then fused.

The scores s[h, l, p] (heads.fusions.attention) are normalised over the patches for the text side (what each
text token gathers from the image) and over the real text tokens for the image side (what each patch gathers from
the text). Each side adds what it gathered, averaged over its own tokens, to its mean token:

    h_t = LN(W_t mean_l t_l + W_vi [sum_p a[h, p] x_p]_h),    h_i = LN(W_i mean_p x_p + W_vt [sum_l b[h, l] t_l]_h)

and the classifier sees [h_t, h_i, h_t * h_i], the product giving it an explicit agreement term. Padded text
positions are excluded twice: as keys (-inf scores) and from the text mean (weight 0). A switched-off modality is
zero, so its mean, what it offers the other side and what it gathers are constants: the head reduces to the
remaining modality's own path.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .attention import AttentionHead, AttentionSpace, attention_width, gather
from .base import FUSIONS, HeadConfig, HeadDims


@FUSIONS.register("co-attn")
class CoAttnHead(AttentionHead):
    """text->image and image->text attention (masked), pooled and fused"""

    def build(self, cfg: HeadConfig, dims: HeadDims) -> int:
        self.space = AttentionSpace(dims.text_dim, dims.image_dim, attention_width(cfg), cfg.attn_heads)
        self.text, self.image = nn.Linear(dims.text_dim, cfg.hidden), nn.Linear(dims.image_dim, cfg.hidden)
        self.value_i = nn.Linear(cfg.attn_heads * dims.image_dim, cfg.hidden)  # image gathered by the text
        self.value_t = nn.Linear(cfg.attn_heads * dims.text_dim, cfg.hidden)  # text gathered by the image
        self.norm_t, self.norm_i = nn.LayerNorm(cfg.hidden), nn.LayerNorm(cfg.hidden)
        return 3 * cfg.hidden

    def attend(self, text, image, mask, weights) -> torch.Tensor:
        q, k = self.space(text, image)
        mean_text = torch.matmul(weights[:, None, :], text).squeeze(1)
        ht = self.norm_t(self.text(mean_text) + self.value_i(gather(q, k, weights, image).flatten(1)))
        hi = self.norm_i(self.image(image.mean(1)) + self.value_t(gather(k.mean(2, keepdim=True), q, None, text, key_mask=mask).flatten(1)))
        return torch.cat([ht, hi, ht * hi], dim=-1)
