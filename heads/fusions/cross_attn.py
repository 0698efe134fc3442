"""`cross-attn`: text tokens (queries) attend over image patch tokens (keys/values); text mask pools.

Each real text token gathers the image evidence relevant to it; what the tokens gathered is averaged over the real
(unpadded) text positions and added to the mean text token (the residual of a cross-attention layer):

    h = LN(W_t mean_l t_l + W_v [sum_p a[h, p] x_p]_h),   a[h, p] = mean_l softmax_p(q_h(t_l) . k_h(x_p))

computed per sample rather than per token (heads.fusions.attention says why that is the same attention). With the
image switched off the gathered vectors are zero and the head is a text model on the mean token. With the text
switched off all queries are equal and the result is a learned attention pool of the image patches.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .attention import AttentionHead, AttentionSpace, attention_width, pooled_attention
from .base import FUSIONS, HeadConfig, HeadDims


@FUSIONS.register("cross-attn")
class CrossAttnHead(AttentionHead):
    """text tokens attend over image patches; masked text pooling"""

    def build(self, cfg: HeadConfig, dims: HeadDims) -> int:
        self.space = AttentionSpace(dims.text_dim, dims.image_dim, attention_width(cfg), cfg.attn_heads)
        # W_t and W_v as one Linear on [mean text token, every head's pooled patches]: one matmul, not two and a sum
        self.fused = nn.Linear(dims.text_dim + cfg.attn_heads * dims.image_dim, cfg.hidden)
        self.norm = nn.LayerNorm(cfg.hidden)
        return cfg.hidden

    def attend(self, text, image, mask, weights) -> torch.Tensor:
        q, k = self.space(text, image)
        mean_text = torch.matmul(weights[:, None, :], text).squeeze(1)
        gathered = torch.matmul(pooled_attention(q, k, weights), image)  # (B, heads, image_dim)
        return self.norm(self.fused(torch.cat([mean_text, gathered.flatten(1)], 1)))
