"""`cross-attn`: text tokens (queries) attend over image patch tokens (keys/values); text mask pools.

Each text token gathers the image evidence relevant to it; the fused token states are averaged over the
real (unpadded) text positions only. Padded text positions are queries whose outputs are dropped by the
masked mean, so their values never matter. With the image switched off the patch tokens are zero and every
query receives the same constant: the head reduces to a token-level text model. With the text switched off
all queries are equal and the result is an attention-weighted pool of the image patches.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .attention import CrossAttention
from .base import FusionHead, HeadConfig, classifier, masked_mean, projector, safe_mask


class CrossAttnHead(FusionHead):
    inputs = ("text_tokens", "text_mask", "image_tokens")

    def __init__(self, cfg: HeadConfig):
        super().__init__(cfg)
        self.proj_t = projector(cfg.text_dim, cfg.hidden)
        self.proj_i = projector(cfg.image_dim, cfg.hidden)
        self.block = CrossAttention(cfg.hidden, cfg.attn_heads)
        self.norm = nn.LayerNorm(cfg.hidden)
        self.mlp = classifier(cfg.hidden, cfg.hidden, cfg.num_classes, cfg.dropout)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mask = safe_mask(batch["text_mask"])
        t, i = self.project_both(batch, mask)
        x = self.block(t, i)  # image patches are all valid: no key mask
        return {"logits": self.mlp(masked_mean(self.norm(x), mask))}
